"""Rule-based GRPO rewards: answer accuracy (math, multiple choice, the tiny world) and format.

The fourth reward task, "judge", has no rule: an LLM judge (`rl.judge`) checks its free-form
answers. Here it only has its reference check (a non-blank text) and the generic format reward.

Every function is pure: (completion text, reference, thinking mode) -> reward. Only the answer
region counts: the text after the last `</think>` (cut at any later `<think>`), or the whole
text when there is no think block; an answer that only appears inside the (possibly unclosed)
think block earns nothing, as in `data.reasoning_world`.

Parsing model output can be slow or memory hungry (math-verify/sympy on `9^{9^{9^{9}}}`, deeply
nested parentheses), so run these functions through `sandbox.RewardPool`, which enforces a CPU time (and wall time) and memory limit per sample. `math_accuracy` disables
math-verify's own signal-based timeouts for that reason (they would turn a timeout into a silent
0 the pool cannot count, and they fail outside the main thread); called in-process it has no
time limit.

Code execution: math-verify turns LaTeX into sympy through an ANTLR grammar (no `eval`), and
its plain-expression path (sympy `parse_expr`, which does `eval`) only ever sees digits,
operators and parentheses (its regex admits nothing else). As defense in depth,
`check_answer` rejects Python-looking, over-long or deeply nested answers before parsing.

References get the same limits (`check_reference`, `check_references`): a bad reference is a data
error, raised once per prompt before training, not a timeout on every sample.

Every pattern that reads model output runs in linear time: phrases are found with plain-text
regexes and the text around them is cut with string operations, since patterns with adjacent
overlapping quantifiers (`is[ \t]*(.+?)[ \t]*$`) backtrack in polynomial time on a long run of
spaces, which a model can write.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from nemo_plugins.data import reasoning_world
from nemo_plugins.data.chat import THINK_END, THINK_START

RULE_TASKS = ("math", "choice", "world")  # answers a rule checks (`combined_reward`, `answer_checker`)
TASKS = (*RULE_TASKS, "judge")  # every reward task; "judge": free-form answers an LLM judge checks
MAX_ANSWER_CHARS = 512  # longer final answers are rejected before parsing
MAX_ANSWER_DEPTH = 10  # deeper ( [ { nesting is rejected: ANTLR parse time grows steeply with it
FORBIDDEN_IN_ANSWER = ("__", "import", "lambda", "`")  # Python-looking text never reaches a parser

_BOXED = "\\boxed"
_ANSWER_PHRASE_RE = re.compile("the answer is", re.IGNORECASE)  # plain text: a linear-time search
_WORLD_FORM_RE = re.compile(r"(-?[0-9]+)\.(?![0-9])")  # "N." as in the tiny world's "The answer is N."
_MATH_EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


class RejectedAnswer(ValueError):
    """A final answer refused before parsing (too long, too deeply nested, or Python-looking)."""


class BadReference(ValueError):
    """A reference that cannot be scored against (see `check_reference`): a data error."""


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that its timeouts are off; the sandbox enforces them instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


# --------------------------------------------------------------------------- extraction


def answer_region(text: str) -> str:
    """Text after the last `</think>`, cut at any later `<think>`: only there may the answer live."""
    if THINK_END in text:
        text = text.rsplit(THINK_END, 1)[1]
    return text.split(THINK_START, 1)[0]


def _balanced_braces(text: str, open_at: int) -> str | None:
    """Content of the `{...}` group opening at `open_at` (escaped `\\{ \\}` do not count), or None if unclosed."""
    depth, i = 0, open_at
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> tuple[bool, str | None]:
    """(found, content) of the last `\\boxed{...}`; content is None when that box is unclosed.

    A `\\boxed` not followed by `{` (after spaces) is skipped. The last box decides: a truncated
    final box is not rescued by an earlier complete one (that would reward hedging).
    """
    end = len(text)
    while (pos := text.rfind(_BOXED, 0, end)) >= 0:
        j = pos + len(_BOXED)
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            return True, _balanced_braces(text, j)
        end = pos
    return False, None


def _answer_after_phrase(region: str) -> str | None:
    """The answer stated by the last "the answer is" (any case) in `region`, or None.

    Right after the phrase (and an optional ":"), an integer followed by "." is the answer, as
    in the tiny world ("The answer is 5. Check: ..." -> "5"); otherwise the rest of the line,
    without one final "." ("The answer is 1/2." -> "1/2"). String operations, not one regex over
    the line: see the module docstring.
    """
    last = None
    for last in _ANSWER_PHRASE_RE.finditer(region):
        pass
    if last is None:
        return None
    line_end = region.find("\n", last.end())
    rest = region[last.end() : line_end if line_end >= 0 else len(region)].strip()
    rest = rest.removeprefix(":").lstrip()
    world = _WORLD_FORM_RE.match(rest)
    if world:
        return world.group(1)
    return rest.removesuffix(".").rstrip() or None


def extract_final_answer(text: str) -> str | None:
    """The final answer in the answer region, or None.

    The last `\\boxed{...}` (balanced braces, nested allowed) wins; without a box, the last
    "the answer is" (case-insensitive) with its answer (`_answer_after_phrase`: "The answer is
    55." -> "55", "so the answer is 1/2." -> "1/2"). Empty answers count as none.
    """
    region = answer_region(text)
    found, boxed = last_boxed(region)
    if found:
        return (boxed or "").strip() or None
    return _answer_after_phrase(region)


def nesting_depth(text: str) -> int:
    """Maximum nesting depth of ( [ { in `text` (unbalanced closers are ignored)."""
    depth = best = 0
    for c in text:
        if c in "([{":
            depth += 1
            best = max(best, depth)
        elif c in ")]}" and depth:
            depth -= 1
    return best


def _limit_problem(text: str) -> str | None:
    """Which parse limit `text` breaks (length, nesting depth, forbidden text), or None."""
    if len(text) > MAX_ANSWER_CHARS:
        return f"has {len(text)} chars > MAX_ANSWER_CHARS={MAX_ANSWER_CHARS}"
    depth = nesting_depth(text)
    if depth > MAX_ANSWER_DEPTH:
        return f"nests brackets {depth} deep > MAX_ANSWER_DEPTH={MAX_ANSWER_DEPTH}"
    bad = [s for s in FORBIDDEN_IN_ANSWER if s in text]
    return f"contains forbidden text {bad}" if bad else None


def check_answer(answer: str) -> str:
    """`answer` unchanged if it is safe to hand to a parser; else raise RejectedAnswer saying why."""
    problem = _limit_problem(answer)
    if problem:
        raise RejectedAnswer(f"answer {problem}")
    return answer


# --------------------------------------------------------------------------- accuracy


def _parse_math(answer: str) -> list:
    """math-verify parse of one bare answer (boxed so the LaTeX extractor takes all of it)."""
    return parse(
        f"{_BOXED}{{{answer}}}",
        extraction_config=_MATH_EXTRACTION,
        parsing_timeout=None,  # the sandbox enforces time; see module docstring
    )


def math_accuracy(completion: str, reference: str | int | float) -> float:
    """1.0 if the final answer is symbolically equal to `reference` (1/2 == 0.5 == \\frac{1}{2}), else 0.0.

    Raises RejectedAnswer for an unsafe final answer and BadReference for a reference that
    breaks the same limits or does not parse (a data bug, not a model failure; see
    `check_references`); the sandbox counts both as failures.
    """
    answer = extract_final_answer(completion)
    if answer is None:
        return 0.0
    gold = _math_reference(reference)
    pred = _parse_math(check_answer(answer))
    return 1.0 if pred and verify(gold, pred, timeout_seconds=None) else 0.0


_ANSWER_WORD_RE = re.compile("answer", re.IGNORECASE)
_SPACES_RE = re.compile(r"\s*")
_LETTER_AT_RE = re.compile(r"\(?([A-Z])\)?(?![A-Za-z0-9])")
_LETTER_PAREN_RE = re.compile(r"\(([A-Z])\)")
_LETTER_BARE_RE = re.compile(r"\(?([A-Z])\)?\.?")
_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")


def _boxed_letter(content: str) -> str | None:
    inner = _TEXT_WRAP_RE.sub(r"\1", content).strip()
    m = _LETTER_BARE_RE.fullmatch(inner)
    return m.group(1) if m else None


def _skip_spaces(text: str, i: int) -> int:
    return _SPACES_RE.match(text, i).end()


def _letter_after_answer(region: str, i: int) -> str | None:
    """The letter of "answer is (B)" / "Answer: B" / "answer B" whose "answer" ends at `i`, or None.

    Parsed step by step (spaces, optional "is", optional colon, spaces, letter): each run of
    spaces is read once, where one regex with `\\s*` on both sides of optional parts backtracks
    in quadratic time on a long run of spaces.
    """
    j = _skip_spaces(region, i)
    if j > i and region[j : j + 2].lower() == "is":
        j = _skip_spaces(region, j + 2)
    if region[j : j + 1] in (":", "："):
        j = _skip_spaces(region, j + 1)
    m = _LETTER_AT_RE.match(region, j)
    return m.group(1) if m else None


def _phrase_letters(region: str) -> list[str]:
    """The letters of all "answer is B" phrases in `region`, in order."""
    letters = (_letter_after_answer(region, m.end()) for m in _ANSWER_WORD_RE.finditer(region))
    return [x for x in letters if x]


def extract_choice(completion: str) -> str | None:
    """The chosen letter A-Z in the answer region, or None.

    Accepted forms, first that applies wins: the last `\\boxed{B}` (also `\\boxed{(B)}`,
    `\\boxed{\\text{B}}`; a box holding anything else means no choice); the last "Answer: B" /
    "answer is B" / "The answer is (B)." (case-insensitive "answer is", upper-case letter); a
    region that is only the letter ("B", "(B)", "B."); the last "(B)" anywhere in the region.
    """
    region = answer_region(completion)
    found, boxed = last_boxed(region)
    if found:
        return _boxed_letter(boxed) if boxed is not None else None
    for finder in (
        lambda: _phrase_letters(region),
        lambda: [m.group(1)] if (m := _LETTER_BARE_RE.fullmatch(region.strip())) else [],
        lambda: _LETTER_PAREN_RE.findall(region),
    ):
        letters = finder()
        if letters:
            return letters[-1]
    return None


def _check_letter(reference_letter: str) -> str:
    letter = reference_letter.strip().upper() if isinstance(reference_letter, str) else None
    if not letter or len(letter) != 1 or not "A" <= letter <= "Z":
        raise ValueError(f"reference_letter must be one letter A-Z, got {reference_letter!r}")
    return letter


def choice_accuracy(completion: str, reference_letter: str) -> float:
    """1.0 if the chosen letter (see `extract_choice`) equals `reference_letter`, else 0.0."""
    return 1.0 if extract_choice(completion) == _check_letter(reference_letter) else 0.0


def world_accuracy(completion: str, reference: int | str) -> float:
    """Tiny-world exact match: "The answer is N." after thinking equals the integer `reference`."""
    return 1.0 if reasoning_world.extract_answer(completion) == int(reference) else 0.0


def answer_checker(task: str):
    """`verify(completion, problem) -> bool` for held-out accuracy and pass rates under `task`:
    the tiny world's exact integer match, or this task's accuracy reward against `problem.answer`
    (in-process: `check_answer` bounds what reaches the parser)."""
    if task == "world":
        return reasoning_world.is_correct
    if task == "judge":
        raise ValueError("task='judge': its answers are checked by the LLM judge (`RewardSettings.verifier()`), "
                         f"not a rule; a rule checks one of {', '.join(RULE_TASKS)}")
    reward = {"math": math_accuracy, "choice": choice_accuracy}.get(task)
    if reward is None:
        raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)}")

    def verify(completion: str, problem) -> bool:
        try:
            return reward(completion, problem.answer) == 1.0
        except ValueError:  # a rejected or unparsable answer is a wrong one
            return False

    return verify


# --------------------------------------------------------------------------- references


def _short(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _math_reference(reference: str | int | float) -> list:
    """math-verify parse of a math reference; BadReference if it breaks the answer limits (they
    bound parse time) or math-verify cannot parse it (a bare string back is its fallback, not a parse)."""
    text = str(reference)
    problem = _limit_problem(text)
    if problem is None:
        gold = _parse_math(text)
        if gold and not isinstance(gold[0], str):
            return gold
        problem = "does not parse as math"
    raise BadReference(f"reference {_short(text)} {problem}")


def _is_integer(value) -> bool:
    """True for an int or a string `int()` takes (world_accuracy's `int(reference)`), not a bool or float."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return False
    try:
        int(value)
    except ValueError:
        return False
    return True


def _reference_problem(reference, task: str) -> str | None:
    """Why `reference` cannot be scored for `task` (see `check_reference`), or None."""
    if task == "world":
        return None if _is_integer(reference) else f"reference {reference!r} is not an integer"
    if task == "judge":  # any answer the judge can read: a non-blank text (or number)
        ok = isinstance(reference, (str, int, float)) and not isinstance(reference, bool) and str(reference).strip()
        return None if ok else f"reference {reference!r} is not a non-blank text"
    try:
        if task == "math":
            _math_reference(reference)
        else:
            _check_letter(reference)
    except ValueError as exc:  # BadReference, or _check_letter's ValueError
        return str(exc)
    return None


def check_reference(reference, task: str, where: str) -> None:
    """Raise BadReference "<where>: <what is wrong>" if `reference` cannot be scored for `task`.

    math: the limits of `check_answer` (length, nesting depth, forbidden text) and a math-verify
    parse to an expression; choice: one letter A-Z; world: an integer; judge: a non-blank text.
    `where` names the data (e.g. "prompt p17"), so one bad reference fails once, up front,
    instead of every sample failing (or timing out) in the reward pool. In-process, without a
    time limit: `check_references` runs it in the sandbox with one.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    problem = _reference_problem(reference, task)
    if problem:
        raise BadReference(f"{where}: {problem}")


def check_references(references: Mapping, task: str, timeout_s: float = 1.0, workers: int = 2) -> None:
    """`check_reference` on every `{prompt_id: reference}`; raise BadReference naming the first
    bad prompt (and how many are bad). Call once per prompt pool, before training.

    Math references are checked in a `sandbox.RewardPool`, so each must also parse within
    `timeout_s` (keep it below the reward pool's: every sample parses its reference again); the
    limits do not bound everything (`|` bars are not nesting, and 50 of them on each side of a
    number take seconds to parse). Not caught: a reference that parses fast but compares slowly
    with some answers (`9^{9^{9^{9}}}`, `\\prod_{k=0}^{2022}(x-k)` against 0); those samples time
    out one by one. Other tasks need no parser, so no pool is started.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    keys, refs = list(references), list(references.values())
    if task == "math" and refs:
        from nemo_plugins.rl.sandbox import RewardPool

        warmup = [(_WARMUP_REFERENCE, task)]
        with RewardPool(_reference_problem, workers=workers, timeout_s=timeout_s, max_chars=None, warmup=warmup) as pool:
            outcomes = pool.map_outcomes([(r, task) for r in refs])
        problems = [
            o.value if not o.failure else f"reference {_short(str(r))} failed to parse in the sandbox: "
            f"{o.failure} (timeout_s={timeout_s}, memory_mb={pool.memory_mb})"
            for r, o in zip(refs, outcomes)
        ]
    else:
        problems = [_reference_problem(r, task) for r in refs]
    bad = [(k, p) for k, p in zip(keys, problems) if p]
    if bad:
        more = f" (and {len(bad) - 1} more prompts with bad references)" if len(bad) > 1 else ""
        raise BadReference(f"prompt {bad[0][0]}: {bad[0][1]}{more}")


# --------------------------------------------------------------------------- format


def format_reward(completion: str, thinking: bool) -> float:
    """1.0 if the completion has the layout of its reasoning mode, else 0.0.

    Thinking on: exactly one well-formed `<think>...</think>` at the very start
    (`reasoning_world.has_think_block`) and a non-empty answer after it. Thinking off: no think
    tag at all and a non-empty answer. The answer's own form is not checked here (the tiny
    world's strict form is `reasoning_world.is_well_formatted`, used for task "world").
    """
    if thinking:
        if not reasoning_world.has_think_block(completion):
            return 0.0
        tail = completion.split(THINK_END, 1)[1]
    else:
        if THINK_START in completion or THINK_END in completion:
            return 0.0
        tail = completion
    return 1.0 if tail.strip() else 0.0


# --------------------------------------------------------------------------- combined


@dataclass(frozen=True)
class RewardConfig:
    """What a completion is scored on: the task's accuracy and the mode's format, weighted.

    task: "math" (math-verify equivalence), "choice" (letter match) or "world" (the tiny
    world's exact integer; its format reward is the strict `is_well_formatted`); "judge": the
    accuracy comes from an LLM judge (`judge.JudgeScorer`), the format from `format_reward`, so
    `combined_reward` (the rule path) refuses it.
    """

    task: str = "math"
    accuracy_weight: float = 1.0
    format_weight: float = 0.1

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"RewardConfig.task must be one of {TASKS}, got {self.task!r}")
        for name in ("accuracy_weight", "format_weight"):
            w = getattr(self, name)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"RewardConfig.{name} must be a finite number >= 0, got {w!r}")


@dataclass(frozen=True)
class RewardBreakdown:
    """A completion's total reward and its unweighted components (each 0.0 or 1.0)."""

    total: float
    accuracy: float
    format: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


ZERO_REWARD = RewardBreakdown(0.0, 0.0, 0.0)
_ACCURACY = {"math": math_accuracy, "choice": choice_accuracy, "world": world_accuracy}


def _format_for(task: str, completion: str, thinking: bool) -> float:
    if task == "world":
        return 1.0 if reasoning_world.is_well_formatted(completion, thinking) else 0.0
    return format_reward(completion, thinking)


def combined_reward(
    completion: str, reference: str | int, thinking: bool, config: RewardConfig = RewardConfig()
) -> RewardBreakdown:
    """accuracy_weight * accuracy + format_weight * format, with both components (rule tasks)."""
    if config.task not in _ACCURACY:
        raise ValueError(f"combined_reward: task {config.task!r} has no rule (expected one of {', '.join(RULE_TASKS)})")
    accuracy = _ACCURACY[config.task](completion, reference)
    fmt = _format_for(config.task, completion, thinking)
    total = config.accuracy_weight * accuracy + config.format_weight * fmt
    return RewardBreakdown(total=total, accuracy=accuracy, format=fmt)



_WARMUP_REFERENCE = "\\frac{1}{2}"  # exercises math-verify's LaTeX parser and sympy once


def warmup_completions(task: str) -> tuple:
    """`combined_reward` items a reward worker computes before taking work: math-verify's first
    parse in a process takes about a second (grammar and sympy set-up), which would otherwise
    count against the first sample's time limit. Other tasks need no parser, so none."""
    if task != "math":
        return ()
    return ((f"{THINK_START}half{THINK_END}The answer is \\boxed{{{_WARMUP_REFERENCE}}}.", _WARMUP_REFERENCE, True),)
