"""Verifiable instructions appended to problems, for instruction-following RL (RLOO).

A problem of any set (the tiny world's `Problem`, a CHAMP or JSONL `TaskProblem`) gains one
instruction at the end of its user prompt, from a small fixed set that any byte-level tokenizer
can spell and that `rl.instructions.instruction_followed` checks exactly:

- `steps`:     "Show your steps." — one well-formed think block at the start with a non-empty
  trace, then a non-empty answer;
- `max_words`: "Answer in at most N words." — 1 to N whitespace-separated words in the whole
  response (think block included), N from `max_words` choices;
- `brackets`:  "Put your answer in brackets." — the answer part (after any think block) is
  wrapped in one pair of square brackets, e.g. "[The answer is 5.]" (so the task's own answer
  check still finds "The answer is 5." inside).

The instruction travels with the problem as a spec string ("steps", "max_words:4",
"brackets"), so a reward can check it without seeing the prompt. The task answer is checked by
the problem set's own verifier, as before. Which instruction a problem gets is deterministic in
(seed, the problem's question), and the kinds are dealt evenly over a list of problems, so
held-out accuracy per kind is measured on comparable counts.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

INSTRUCTION_KINDS = ("steps", "max_words", "brackets")
TEXTS = {
    "steps": "Show your steps.",
    "max_words": "Answer in at most {n} words.",
    "brackets": "Put your answer in brackets.",
}


@dataclass(frozen=True)
class InstructedProblem:
    """A problem with an instruction appended: `question` is the original question, a space and
    the instruction's text; `instruction` its spec; `base_question` the question without it.
    Carries the original's answer, difficulty, id and steps, so the task verifier, held-out
    accuracy by difficulty and prompt ids work as for the original."""

    question: str
    answer: str | int
    difficulty: int
    instruction: str
    base_question: str
    id: str = ""
    steps: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return parse_spec(self.instruction)[0]


def parse_spec(spec: str) -> tuple[str, int | None]:
    """(kind, n) of an instruction spec; ValueError naming the spec when it is not one."""
    if not isinstance(spec, str):
        raise ValueError(f"instruction spec {spec!r}: expected a string such as 'steps' or 'max_words:4'")
    kind, _, arg = spec.partition(":")
    if kind not in INSTRUCTION_KINDS:
        raise ValueError(f"instruction spec {spec!r}: kind {kind!r} is not one of {', '.join(INSTRUCTION_KINDS)}")
    if kind == "max_words":
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"instruction spec {spec!r}: expected max_words:N with an integer N >= 1")
        return kind, int(arg)
    if arg:
        raise ValueError(f"instruction spec {spec!r}: {kind} takes no argument")
    return kind, None


def instruction_text(spec: str) -> str:
    kind, n = parse_spec(spec)
    return TEXTS[kind].format(n=n)


def augment(problem, spec: str) -> InstructedProblem:
    """`problem` (any object with question and answer; difficulty, id, steps if it has them)
    with the instruction `spec` appended to its question."""
    question = problem.question
    return InstructedProblem(
        question=f"{question.rstrip()} {instruction_text(spec)}", answer=problem.answer,
        difficulty=getattr(problem, "difficulty", 0), instruction=spec, base_question=question,
        id=str(getattr(problem, "id", "")), steps=tuple(getattr(problem, "steps", ())),
    )  # fmt: skip


def check_choices(kinds: Sequence[str], max_words: Sequence[int], where: str = "rloo") -> None:
    """ValueError naming `<where>.instructions` / `<where>.max_words` when they are not usable."""
    if not kinds or any(k not in INSTRUCTION_KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"{where}.instructions={list(kinds)!r}: expected a non-empty list of distinct kinds "
                         f"from {', '.join(INSTRUCTION_KINDS)}")  # fmt: skip
    bad = [n for n in max_words if isinstance(n, bool) or not isinstance(n, int) or n < 1]
    if "max_words" in kinds and (not max_words or bad):
        raise ValueError(f"{where}.max_words={list(max_words)!r}: expected a non-empty list of integers >= 1")


def augment_all(problems: Sequence, kinds: Sequence[str], max_words: Sequence[int], seed: int,
                tag: str = "instructions") -> list[InstructedProblem]:  # fmt: skip
    """Each problem with one instruction: kinds dealt in turn over the problems in a shuffled
    order (so each kind gets len/k of them, the remainder to the first kinds), max_words' N drawn
    from `max_words`; deterministic in (seed, tag, the questions in order)."""
    check_choices(kinds, max_words)
    digest = hashlib.sha256("\n".join(p.question for p in problems).encode()).hexdigest()[:16]
    rng = random.Random(f"{seed}/{tag}/{digest}")
    order = list(range(len(problems)))
    rng.shuffle(order)
    specs: list[str | None] = [None] * len(problems)
    for rank, i in enumerate(order):
        kind = kinds[rank % len(kinds)]
        specs[i] = f"max_words:{rng.choice(list(max_words))}" if kind == "max_words" else kind
    return [augment(p, s) for p, s in zip(problems, specs)]
