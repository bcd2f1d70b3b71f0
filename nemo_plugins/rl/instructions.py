"""The verifier of the instructions of `data.instructions`: did a completion follow its
instruction? Pure, in-process and linear in the text (string splits and counts, no regex that
can backtrack), so hostile completions cost nothing more than their length; texts longer than
`max_chars` do not follow any instruction. The task answer is not checked here (the rule
reward does that); this is the instruction part of the RLOO reward (`scoring.InstructionScorer`).
"""

from __future__ import annotations

from ..data.chat import THINK_END, THINK_START
from ..data.instructions import parse_spec

MAX_CHARS = 20_000


def _answer_part(text: str) -> str | None:
    """The text after a leading well-formed think block, the whole text when it has no think tag,
    None when the tags are malformed (unclosed, repeated, or not at the start)."""
    starts, ends = text.count(THINK_START), text.count(THINK_END)
    if starts == 0 and ends == 0:
        return text
    if starts == 1 and ends == 1 and text.startswith(THINK_START) and text.index(THINK_END) > 0:
        return text.split(THINK_END, 1)[1]
    return None


def shows_steps(text: str) -> bool:
    """One well-formed think block at the very start with a non-empty trace, then a non-empty answer."""
    if not (text.startswith(THINK_START) and text.count(THINK_START) == 1 and text.count(THINK_END) == 1):
        return False
    trace, _, answer = text[len(THINK_START) :].partition(THINK_END)
    return bool(trace.strip()) and bool(answer.strip())


def within_words(text: str, n: int) -> bool:
    """1 to n whitespace-separated words in the whole text."""
    return 1 <= len(text.split()) <= n


def in_brackets(text: str) -> bool:
    """The answer part (after a well-formed think block, if any) is one pair of square brackets
    around non-empty content: "[The answer is 5.]"."""
    part = _answer_part(text)
    if part is None:
        return False
    part = part.strip()
    return (part.startswith("[") and part.endswith("]") and part.count("[") == 1 and part.count("]") == 1
            and bool(part[1:-1].strip()))  # fmt: skip


def instruction_followed(completion: str, spec: str, max_chars: int = MAX_CHARS) -> bool:
    """Whether `completion` follows the instruction `spec` ("steps", "max_words:N", "brackets";
    ValueError for another spec). A non-string or a text over `max_chars` follows nothing."""
    kind, n = parse_spec(spec)
    if not isinstance(completion, str) or len(completion) > max_chars:
        return False
    if kind == "steps":
        return shows_steps(completion)
    if kind == "max_words":
        return within_words(completion, n)
    return in_brackets(completion)
