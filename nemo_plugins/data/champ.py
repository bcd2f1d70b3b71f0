"""CHAMP competition math as SFT pairs, GRPO prompts and distillation text.

CHAMP (Mao et al. 2024, "CHAMP: A Competition-level Dataset for Fine-Grained Analyses of LLMs'
Mathematical Reasoning Capabilities"; PyPI `champ-dataset`, MIT) has 270 problems in five
categories (Number-Theory 80, Inequality 50, Polynomial 50, Sequence 50, Combinatorics 40), each
with a final answer, a human step-by-step solution, the concepts and hints it uses, and LLM
conversations. It is small, real and verifiable: a data source for the reasoning-toggle SFT
(human steps as the thinking trace), for GRPO prompts with math rewards, and for held-out scoring.

Where the data lives: the package ships one JSON file, `champ_dataset/dataset_files/v0.json`
(72 MB, almost all of it the 72 LLM conversations per problem), shaped
`{"problems": {id: problem}, "concepts": {id: ...}, "hints": {id: ...}}`. A problem has
`identifier` ("P_Number-Theory_12"), `category`, `_raw_text` / `_text` (the statement with / without
CHAMP's `@@math@@` markers), `_raw_answer` / `_answer` (same for the answer), `solution.steps[]`
(`_raw_text`, `_text`, `ch_idxs`), `ch_list` (concept "C_..." and hint "H_..." ids),
`fws_annotations` and `conversations`. `load_champ` reads the JSON file directly (no import of
the package's code, no network) and keeps the marker-free texts.

Answers are plain text with ASCII math: "239", "2^(n-1)", "C(10, 5), or equivalently 252",
"0 is the only possible value", "The limit exists and is equal to 2", "No", ... math-verify
parses most of these *to something*, but not to what they mean ("The limit exists and is equal
to 2" becomes a product of letters; "sum_(i=1)^n i^3, or equivalently ..." becomes 1), so using
them as math references directly would reward wrong answers. `champ_reference` therefore derives
a short math-verifiable reference from the marked-up answer by a few rules (module constants
below): take the math of "X, or equivalently Y" (Y) and "X, or approximately Y" (X); drop
remarks "(i.e., ...)"; take N from "N is the only possible value", "The limit exists and is
equal to N", "..., with a period of N", "N values", "At most N ...", "Exactly one ..."; join
lists of values into "a, b, c" (solutions with several variables in parentheses); write
C(n, k), floor(x), sum_(i=1)^n as LaTeX. Three answers that math-verify cannot read are
replaced by hand (`REFERENCE_OVERRIDES`). Answers that are words (yes / no, "No integer
solutions", "The sequence is not periodic", ...) get no reference (None): they can be trained
on, not scored by math rewards. In v0, 212 of 270 problems get a reference.

Uses: `champ_sft_examples` (thinking on: human steps in the think block, then the final answer;
off: the final answer alone; every answer ends with `\\boxed{...}`), `champ_prompts` (GRPO
prompts, task "math", only problems with a reference), `champ_documents` (statement + solution
text) and `champ_split` (a stable train / held-out split by problem id, `text_data.is_heldout`).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from os import PathLike
from pathlib import Path

from .prompts import PromptRecord, make_prompt_record
from .sft_data import ChatExample, paired_examples
from .text_data import Document, split_documents

CHAMP_REQUIREMENT = "champ-dataset==1.0.0"
CHAMP_PACKAGE = "champ_dataset"
CHAMP_VERSION = "v0"
CHAMP_SIZE = 270

# Prepended to every problem statement (None or "" for the bare statement).
DEFAULT_INSTRUCTION = "Solve the following math problem. Put the final answer inside \\boxed{}."

# Hand-written references for v0 answers math-verify cannot read (an ellipsis product, ± inside
# products, a chained equality).
REFERENCE_OVERRIDES = {
    "P_Polynomial_2": "a(1+\\sqrt{2}), a(1-\\sqrt{2}), a(1+\\sqrt{5})/2, a(1-\\sqrt{5})/2",
    "P_Polynomial_46": "\\prod_{k=0}^{2022}(x-k)",
    "P_Number-Theory_44": "x=0, y=0",
}


@dataclass(frozen=True)
class ChampProblem:
    """One CHAMP problem.

    `answer` is CHAMP's final answer as written (markers removed); `reference` its
    math-verifiable form (`champ_reference`), None for word answers; `raw_answer` keeps CHAMP's
    `@@math@@` markers; `hints` are the texts of the concepts and hints CHAMP attaches, in order.
    """

    id: str
    statement: str
    answer: str
    steps: tuple[str, ...]
    category: str
    reference: str | None
    raw_answer: str
    hints: tuple[str, ...] = ()


# ============================================================================ loading


def champ_data_file(version: str = CHAMP_VERSION) -> Path:
    """The installed package's dataset JSON; ImportError naming the requirement when it is missing."""
    spec = importlib.util.find_spec(CHAMP_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"CHAMP needs the {CHAMP_REQUIREMENT!r} package (in the `dev` extra): "
            f"pip install -c constraints.txt {CHAMP_REQUIREMENT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "dataset_files" / f"{version}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CHAMP data file for version {version!r} not found in {CHAMP_PACKAGE}")
    return path


def _field(d: dict, key: str, where: str):
    if key not in d or d[key] is None:
        raise ValueError(f"CHAMP data: {where} has no {key!r} (unexpected file layout)")
    return d[key]


def _ch_text(data: dict, ch_id: str, where: str) -> str:
    table = {"C": "concepts", "H": "hints"}.get(ch_id[:1])
    entry = data.get(table, {}).get(ch_id) if table else None
    if entry is None:
        raise ValueError(f"CHAMP data: {where} names unknown concept/hint {ch_id!r}")
    return _field(entry, "_text", ch_id)


def _problem(data: dict, key: str, p: dict) -> ChampProblem:
    pid = _field(p, "identifier", key)
    if pid != key:
        raise ValueError(f"CHAMP data: problem {key!r} has identifier {pid!r}")
    raw_steps = _field(_field(p, "solution", pid), "steps", pid)
    steps = tuple(_field(s, "_text", f"{pid} step {i}") for i, s in enumerate(raw_steps))
    raw_answer = _field(p, "_raw_answer", pid)
    return ChampProblem(
        id=pid,
        statement=_field(p, "_text", pid),
        answer=_field(p, "_answer", pid),
        steps=steps,
        category=_field(p, "category", pid),
        reference=REFERENCE_OVERRIDES.get(pid) or champ_reference(raw_answer),
        raw_answer=raw_answer,
        hints=tuple(_ch_text(data, c, pid) for c in p.get("ch_list") or ()),
    )


@lru_cache(maxsize=4)
def _load(path: str) -> tuple[ChampProblem, ...]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    problems = _field(data, "problems", path)
    return tuple(_problem(data, k, p) for k, p in problems.items())


def load_champ(path: str | PathLike | None = None) -> list[ChampProblem]:
    """All CHAMP problems in the dataset's order (by category, then number), from the installed
    package's JSON (or a copy of that file at `path`). Parsed once per process (about 1 s)."""
    return list(_load(str(Path(path) if path is not None else champ_data_file())))


# ============================================================================ references

_NUMBER = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?")
_MATH_SEG = re.compile(r"@@(.*?)@@", re.S)
_REMARK = re.compile(r"^(.*?)\s+\((?:i\.e\.|none\b|no\b).*\)$", re.S)
_SEPARATOR = re.compile(r"\s*,\s*(?:and\s+|or\s+)?|\s+(?:and|or)\s+")
_EXTRACTORS = (  # (pattern, group holding the reference), tried in order on the remark-free answer
    (re.compile(r"^(.+?), or (?:equivalently|an equivalent form such as) (.+)$"), 2),
    (re.compile(r"^(.+?), or approximately .+$"), 1),
    (re.compile(r"^(.+?) is the only possible value$"), 1),
    (re.compile(r"^The limit exists and is equal to (.+)$"), 1),
    (re.compile(r"^The only possible value for the limit is (.+)$"), 1),
    (re.compile(r"^.*, with a period of (.+)$"), 1),
    (re.compile(r"^(?:At most|At least|Exactly) (\S+)(?: [A-Za-z-]+)*$"), 1),
    (re.compile(r"^(\S+)(?: [a-z]+){1,2}$"), 1),  # "98 values", "@@n@@ times"
)
_WORD_NUMBERS = {"one": "1"}


def _balanced(text: str, open_at: int) -> int | None:
    """Index of the `)` closing the `(` at open_at, or None."""
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return None


def _split_top(text: str, sep: str = ",") -> list[str]:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += {"(": 1, ")": -1}.get(c, 0)
        if c == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _replace_calls(text: str, name: str, render) -> str:
    """Replace every `name(args)` (not part of a longer word) with render(args)."""
    out, pos = [], 0
    pattern = re.compile(rf"(?<![A-Za-z\\]){name}\(")
    while (m := pattern.search(text, pos)) is not None:
        close = _balanced(text, m.end() - 1)
        if close is None:
            break
        out.append(text[pos : m.start()] + render(text[m.end() : close]))
        pos = close + 1
    return "".join(out) + text[pos:]


def ascii_math_to_latex(expr: str) -> str:
    """CHAMP's ASCII math in the LaTeX math-verify reads: C(n, k), floor(x), sum_(i=1)^n, −.

    Everything else (^( ), sqrt( ), n!, ±) math-verify already reads as written.
    """
    expr = expr.replace("\u2212", "-")

    def binom(args: str) -> str:
        parts = _split_top(args)
        return f"\\binom{{{parts[0].strip()}}}{{{parts[1].strip()}}}" if len(parts) == 2 else f"C({args})"

    expr = _replace_calls(expr, "C", binom)
    expr = _replace_calls(expr, "floor", lambda a: f"(\\lfloor {ascii_math_to_latex(a)} \\rfloor)")
    return re.sub(r"(?<![A-Za-z\\])sum_\(([^()]*)\)\^(\w+)", r"\\sum_{\1}^{\2}", expr)


def _value(part: str) -> str | None:
    """One value: a whole `@@math@@` segment, a plain number or "one"; else None."""
    part = part.strip()
    m = re.fullmatch(r"@@([^@]+)@@", part)
    if m:
        return m.group(1).strip()
    if _NUMBER.fullmatch(part):
        return part
    return _WORD_NUMBERS.get(part.lower())


def _value_list(text: str) -> str | None:
    """"a, b and c" / "@@x=1, y=1@@ and @@x=3, y=2@@" as "a, b, c" / "(x=1, y=1), (x=3, y=2)"."""
    segments = _MATH_SEG.findall(text)
    masked = text
    for i, seg in enumerate(segments):  # number the segments so separators inside them are kept
        masked = masked.replace(f"@@{seg}@@", f"@@{i}@@", 1)
    items = []
    for part in _SEPARATOR.split(masked.strip()):
        m = re.fullmatch(r"@@(\d+)@@", part.strip())
        if m:
            item = segments[int(m.group(1))].strip()
        elif _NUMBER.fullmatch(part.strip()):
            item = part.strip()
        else:
            return None
        if "," in item and not (item.startswith("(") and item.endswith(")")):
            item = f"({item})"
        items.append(item)
    return ", ".join(items) if len(items) > 1 else None


def champ_reference(raw_answer: str) -> str | None:
    """A math-verifiable reference for a CHAMP answer in its `@@math@@` markup, or None for a
    word answer (rules in the module doc). Lists and solution tuples become "a, b" / "(x=1, y=2), ..."."""
    text = raw_answer.strip()
    if text.endswith("..."):
        return None
    m = _REMARK.match(text)
    if m:
        text = m.group(1).strip()
    ref = _value(text)
    if ref is None:
        for pattern, group in _EXTRACTORS:
            m = pattern.match(text)
            if m and (ref := _value(m.group(group))) is not None:
                break
    if ref is None:
        ref = _value_list(text)
    if ref is None or "..." in ref:
        return None
    return ascii_math_to_latex(ref)


# ============================================================================ uses


def _prompt_text(p: ChampProblem, instruction: str | None) -> str:
    return f"{instruction}\n\n{p.statement}" if instruction else p.statement


ANSWER_WORDINGS = ("champ", "plain")


def champ_answer_text(p: ChampProblem, wording: str = "champ") -> str:
    """The final answer as the model should write it, ending in `\\boxed{...}.`

    "The answer is \\boxed{R}." when the answer is a single math value R; CHAMP's wording then
    the reference ("0 is the only possible value, so the answer is \\boxed{0}.") when the
    reference was extracted from words; "The answer is \\boxed{<answer>}." for word answers.
    `wording="plain"` drops CHAMP's wording: "The answer is \\boxed{R}." whenever there is a
    reference, so no answer reads like a step of a trace.
    """
    if wording not in ANSWER_WORDINGS:
        raise ValueError(f"answer wording {wording!r}: expected one of {', '.join(ANSWER_WORDINGS)}")
    if p.reference is None:
        return f"The answer is \\boxed{{{p.answer}}}."
    if wording == "plain" or _value(p.raw_answer) is not None or p.id in REFERENCE_OVERRIDES:
        return f"The answer is \\boxed{{{p.reference}}}."
    return f"{p.answer}, so the answer is \\boxed{{{p.reference}}}."


def champ_solution_text(p: ChampProblem, step_sep: str = "\n", *, conclude: bool = False) -> str:
    """The human solution, steps joined by `step_sep` (the thinking trace of the SFT pair).

    `conclude` appends CHAMP's answer as a plain last step, "So the answer is <answer>.", so that
    every trace ends on the same unboxed sentence before `</think>`: the boxed answer sentence,
    which ends the turn in both modes, then only ever follows a closed think block.
    """
    steps = (*p.steps, f"So the answer is {p.answer.rstrip('.')}.") if conclude else p.steps
    return step_sep.join(steps)


def champ_sft_examples(
    problems: Iterable[ChampProblem],
    *,
    instruction: str | None = DEFAULT_INSTRUCTION,
    step_sep: str = "\n",
    conclude: bool = False,
    wording: str = "champ",
) -> list[ChatExample]:
    """(thinking-on, thinking-off) `ChatExample`s for every problem, flat: on, off, on, off, ...

    On: `<think>` human steps `</think>` then `champ_answer_text`; off: `champ_answer_text` alone.
    `conclude`: end each trace with the answer as a plain step (`champ_solution_text`);
    `wording`: of the answer part (`champ_answer_text`).
    The user turn is `instruction` + blank line + statement. meta holds the CHAMP id.
    """
    out: list[ChatExample] = []
    for p in problems:
        out.extend(
            paired_examples(
                _prompt_text(p, instruction),
                champ_solution_text(p, step_sep, conclude=conclude),
                champ_answer_text(p, wording),
                category=p.category,
                meta={"dataset": "champ", "id": p.id},
            )
        )
    return out


def champ_prompts(
    problems: Iterable[ChampProblem], *, instruction: str | None = DEFAULT_INSTRUCTION
) -> list[PromptRecord]:
    """GRPO prompts (task "math", reference = `ChampProblem.reference`, id = CHAMP id) for the
    problems that have a reference; word-answer problems are left out (math rewards cannot
    score them)."""
    return [
        make_prompt_record(_prompt_text(p, instruction), p.reference, "math", id=p.id)
        for p in problems
        if p.reference is not None
    ]


def champ_documents(problems: Iterable[ChampProblem], step_sep: str = "\n") -> list[Document]:
    """One text document per problem (id = CHAMP id): statement, blank line, solution steps,
    blank line, final answer sentence."""
    return [
        Document(p.id, f"{p.statement}\n\n{champ_solution_text(p, step_sep)}\n\n{champ_answer_text(p)}")
        for p in problems
    ]


def champ_split(
    problems: Sequence[ChampProblem], fraction: float = 0.1, seed: int = 0
) -> tuple[list[ChampProblem], list[ChampProblem]]:
    """(train, heldout) by `text_data.is_heldout(problem.id, fraction, seed)`; order kept."""
    return split_documents(problems, fraction, seed, key=lambda p: p.id)


__all__ = [
    "CHAMP_REQUIREMENT",
    "CHAMP_SIZE",
    "ChampProblem",
    "DEFAULT_INSTRUCTION",
    "REFERENCE_OVERRIDES",
    "ascii_math_to_latex",
    "ANSWER_WORDINGS",
    "champ_answer_text",
    "champ_data_file",
    "champ_documents",
    "champ_prompts",
    "champ_reference",
    "champ_sft_examples",
    "champ_solution_text",
    "champ_split",
    "load_champ",
]
