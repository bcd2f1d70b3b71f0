"""Rule-based GRPO rewards: answer accuracy (math, multiple choice, the tiny world) and format.

Every function is pure: (completion text, reference, thinking mode) -> reward. Only the answer
region counts: the text after the last `</think>` (cut at any later `<think>`), or the whole
text when there is no think block; an answer that only appears inside the (possibly unclosed)
think block earns nothing, as in `data.reasoning_world`.

Parsing model output can be slow or memory hungry (math-verify/sympy on `9^{9^{9^{9}}}`, deeply
nested parentheses), so run these functions through `sandbox.RewardPool` (or `reward_pool`
below), which enforces a wall time and memory limit per sample. `math_accuracy` disables
math-verify's own signal-based timeouts for that reason (they would turn a timeout into a silent
0 the pool cannot count, and they fail outside the main thread); called in-process it has no
time limit.

Code execution: math-verify turns LaTeX into sympy through an ANTLR grammar (no `eval`), and
its plain-expression path (sympy `parse_expr`, which does `eval`) only ever sees digits,
operators and parentheses (its regex admits nothing else). As defense in depth,
`check_answer` rejects Python-looking, over-long or deeply nested answers before parsing.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass
from functools import partial

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from nemo_plugins.data import reasoning_world
from nemo_plugins.data.chat import THINK_END, THINK_START

TASKS = ("math", "choice", "world")
MAX_ANSWER_CHARS = 512  # longer final answers are rejected before parsing
MAX_ANSWER_DEPTH = 10  # deeper ( [ { nesting is rejected: ANTLR parse time grows steeply with it
FORBIDDEN_IN_ANSWER = ("__", "import", "lambda", "`")  # Python-looking text never reaches a parser

_BOXED = "\\boxed"
_ANSWER_TEXT_RE = re.compile(r"The answer is:?[ \t]*([^\n]+?)[ \t]*\.?[ \t]*$", re.MULTILINE)
_MATH_EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


class RejectedAnswer(ValueError):
    """A final answer refused before parsing (too long, too deeply nested, or Python-looking)."""


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


def extract_final_answer(text: str) -> str | None:
    """The final answer in the answer region, or None.

    The last `\\boxed{...}` (balanced braces, nested allowed) wins; without a box, the tiny
    world's "The answer is N." (`reasoning_world.extract_answer`), then the same phrase with any
    answer up to the end of its line ("The answer is 1/2."). Empty answers count as none.
    """
    region = answer_region(text)
    found, boxed = last_boxed(region)
    if found:
        return (boxed or "").strip() or None
    world = reasoning_world.extract_answer(region)
    if world is not None:
        return str(world)
    matches = _ANSWER_TEXT_RE.findall(region)
    return (matches[-1].strip() or None) if matches else None


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


def check_answer(answer: str) -> str:
    """`answer` unchanged if it is safe to hand to a parser; else raise RejectedAnswer saying why."""
    if len(answer) > MAX_ANSWER_CHARS:
        raise RejectedAnswer(f"answer has {len(answer)} chars > MAX_ANSWER_CHARS={MAX_ANSWER_CHARS}")
    depth = nesting_depth(answer)
    if depth > MAX_ANSWER_DEPTH:
        raise RejectedAnswer(f"answer nests brackets {depth} deep > MAX_ANSWER_DEPTH={MAX_ANSWER_DEPTH}")
    bad = [s for s in FORBIDDEN_IN_ANSWER if s in answer]
    if bad:
        raise RejectedAnswer(f"answer contains forbidden text {bad}")
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

    Raises RejectedAnswer for an unsafe final answer and ValueError for a reference that does
    not parse (a data bug, not a model failure); the sandbox counts both as failures.
    """
    answer = extract_final_answer(completion)
    if answer is None:
        return 0.0
    gold = _parse_math(str(reference))
    if not gold:
        raise ValueError(f"reference {reference!r} does not parse as math")
    pred = _parse_math(check_answer(answer))
    return 1.0 if pred and verify(gold, pred, timeout_seconds=None) else 0.0


_LETTER_PHRASE_RE = re.compile(r"(?i:answer)(?:\s+is)?\s*[:：]?\s*\(?([A-Z])\)?(?![A-Za-z0-9])")
_LETTER_PAREN_RE = re.compile(r"\(([A-Z])\)")
_LETTER_BARE_RE = re.compile(r"\(?([A-Z])\)?\.?")
_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")


def _boxed_letter(content: str) -> str | None:
    inner = _TEXT_WRAP_RE.sub(r"\1", content).strip()
    m = _LETTER_BARE_RE.fullmatch(inner)
    return m.group(1) if m else None


def extract_choice(completion: str) -> str | None:
    """The chosen letter A-Z in the answer region, or None.

    Accepted forms, first that applies wins: the last `\\boxed{B}` (also `\\boxed{(B)}`,
    `\\boxed{\\text{B}}`; a box holding anything else means no choice); the last "Answer: B" /
    "answer is B" / "The answer is (B)." (case-insensitive "answer", upper-case letter); a region
    that is only the letter ("B", "(B)", "B."); the last "(B)" anywhere in the region.
    """
    region = answer_region(completion)
    found, boxed = last_boxed(region)
    if found:
        return _boxed_letter(boxed) if boxed is not None else None
    for finder in (
        lambda: _LETTER_PHRASE_RE.findall(region),
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
    world's exact integer; its format reward is the strict `is_well_formatted`).
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
    """accuracy_weight * accuracy + format_weight * format, with both components."""
    accuracy = _ACCURACY[config.task](completion, reference)
    fmt = _format_for(config.task, completion, thinking)
    total = config.accuracy_weight * accuracy + config.format_weight * fmt
    return RewardBreakdown(total=total, accuracy=accuracy, format=fmt)


def reward_pool(config: RewardConfig = RewardConfig(), **pool_kwargs):
    """A `sandbox.RewardPool` computing `combined_reward` on (completion, reference, thinking) items.

    Failed samples (timeout, memory, too long, errors) score ZERO_REWARD; `pool_kwargs` go to
    RewardPool (workers, timeout_s, memory_mb, max_chars, ...).
    """
    from nemo_plugins.rl.sandbox import RewardPool

    pool_kwargs.setdefault("failure_value", ZERO_REWARD)
    return RewardPool(partial(combined_reward, config=config), **pool_kwargs)
