"""A tiny reasoning world: multi-step integer arithmetic with verifiable answers.

A problem is a left-nested expression over single-digit operands,

    What is ((7 + 5) * 3) - 4?

solved step by step ("7 + 5 = 12", "12 * 3 = 36", "36 - 4 = 32"). Difficulty is the
number of operations. Every intermediate value stays in 0..99 so a tiny model can
learn the task, and the answer can be checked exactly, which is what SFT evaluation
and GRPO rewards need.
"""

import operator
import random
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

from nemo_plugins.data.chat import THINK_END, THINK_START, render_example

DIFFICULTIES = (1, 2, 3, 4, 5)
MIN_VALUE, MAX_VALUE = 0, 99  # every intermediate value stays in this range
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
STEP_SEP = "\n"  # between steps inside the think block

_ANSWER_RE = re.compile(r"The answer is (-?[0-9]+)\.(?![0-9])")


@dataclass(frozen=True)
class Problem:
    question: str
    steps: tuple[str, ...]  # "a op b = c", one per operation
    answer: int
    difficulty: int  # number of operations


# -----------------------------------------------------------------------------
# generation


def _draw_operand(rng: random.Random, op: str) -> int:
    return rng.randint(2, 5) if op == "*" else rng.randint(1, 9)


def _draw_step(rng: random.Random, a: int) -> tuple[str, int, int]:
    """Draw (op, b, a op b), re-drawing until the result stays in range.

    Always terminates: from any value in range either "+ 1" or "- 1" stays in range.
    """
    while True:
        op = rng.choice("+-*")
        b = _draw_operand(rng, op)
        c = OPS[op](a, b)
        if MIN_VALUE <= c <= MAX_VALUE:
            return op, b, c


def generate_problem(rng: random.Random, difficulty: int) -> Problem:
    """One problem with `difficulty` operations, drawn from `rng`."""
    if difficulty < 1:
        raise ValueError(f"difficulty must be >= 1, got {difficulty}")
    a = rng.randint(1, 9)
    expr, steps = str(a), []
    for i in range(difficulty):
        op, b, c = _draw_step(rng, a)
        expr = f"{expr} {op} {b}" if i == 0 else f"({expr}) {op} {b}"
        steps.append(f"{a} {op} {b} = {c}")
        a = c
    return Problem(question=f"What is {expr}?", steps=tuple(steps), answer=a, difficulty=difficulty)


def _check_difficulties(difficulties: Iterable[int]) -> tuple[int, ...]:
    difficulties = tuple(difficulties)
    if not difficulties or any(d < 1 for d in difficulties):
        raise ValueError(f"difficulties must be a non-empty tuple of ints >= 1, got {difficulties}")
    return difficulties


def generate_problems(n: int, seed: int, difficulties: Iterable[int] = DIFFICULTIES) -> list[Problem]:
    """`n` problems, difficulty drawn uniformly from `difficulties`; same seed, same list."""
    difficulties = _check_difficulties(difficulties)
    rng = random.Random(seed)
    return [generate_problem(rng, rng.choice(difficulties)) for _ in range(n)]


def draw_unique(rng: random.Random, n: int, difficulties: Iterable[int], seen: set[str]) -> list[Problem]:
    """`n` problems with questions not in `seen` and distinct from each other, split evenly across
    `difficulties` (earlier levels take the remainder), shuffled; their questions are added to `seen`.

    Raises ValueError if a level cannot supply enough new questions.
    """
    difficulties = _check_difficulties(difficulties)
    k = len(difficulties)
    out: list[Problem] = []
    for i, d in enumerate(difficulties):
        need = n // k + (i < n % k)
        got, tries = 0, 0
        while got < need:
            tries += 1
            if tries > 100 * need + 1000:
                raise ValueError(f"cannot draw {need} new unique problems of difficulty {d}")
            p = generate_problem(rng, d)
            if p.question not in seen:
                seen.add(p.question)
                out.append(p)
                got += 1
    rng.shuffle(out)
    return out


def split_problems(
    seed: int, n_train: int, n_eval: int, difficulties: Iterable[int] = DIFFICULTIES
) -> tuple[list[Problem], list[Problem]]:
    """Disjoint (train, eval) sets: no eval question ever appears in train.

    Eval has unique questions split evenly across difficulty levels (earlier levels
    take the remainder), so per-level accuracy is comparable. Train draws levels
    uniformly and may repeat questions (difficulty 1 has only 162 distinct ones).
    Raises ValueError if a level cannot supply enough unique eval questions.
    """
    difficulties = _check_difficulties(difficulties)
    seen: set[str] = set()
    eval_set = draw_unique(random.Random(f"{seed}/eval"), n_eval, difficulties, seen)

    rng = random.Random(f"{seed}/train")
    train_set: list[Problem] = []
    for _ in range(n_train):
        d = rng.choice(difficulties)
        for _ in range(10_000):
            p = generate_problem(rng, d)
            if p.question not in seen:
                break
        else:
            raise ValueError(f"eval set holds (nearly) every difficulty-{d} question; lower n_eval")
        train_set.append(p)
    return train_set, eval_set


# -----------------------------------------------------------------------------
# responses


def answer_text(answer: int) -> str:
    return f"The answer is {answer}."


def reasoning_response(p: Problem) -> str:
    """Thinking-on target: the steps inside a think block, then the answer."""
    return f"{THINK_START}{STEP_SEP.join(p.steps)}{THINK_END}{answer_text(p.answer)}"


def direct_response(p: Problem) -> str:
    """Thinking-off target: the answer only."""
    return answer_text(p.answer)


def response_for(p: Problem, thinking: bool) -> str:
    return reasoning_response(p) if thinking else direct_response(p)


def chat_texts(problems: Iterable[Problem]) -> Iterator[str]:
    """Full rendered conversations (both reasoning modes) for e.g. tokenizer training."""
    for p in problems:
        for thinking in (True, False):
            prompt, response = render_example(p.question, response_for(p, thinking), thinking)
            yield prompt + response


# -----------------------------------------------------------------------------
# verification


def _answer_region(text: str) -> str:
    """Text after the last </think>, cut at any later <think>: only there may the answer live."""
    if THINK_END in text:
        text = text.rsplit(THINK_END, 1)[1]
    return text.split(THINK_START, 1)[0]


def extract_answer(text: str) -> int | None:
    """The last "The answer is N." outside the think block, or None.

    An answer that only appears inside the (possibly unterminated) think block does
    not count: the model must commit to it after thinking.
    """
    matches = _ANSWER_RE.findall(_answer_region(text))
    return int(matches[-1]) if matches else None


def is_correct(text: str, problem: Problem) -> bool:
    return extract_answer(text) == problem.answer


def has_think_block(text: str) -> bool:
    """True iff text starts with exactly one well-formed <think>...</think> (may be empty)."""
    return (
        text.startswith(THINK_START)
        and text.count(THINK_START) == 1
        and text.count(THINK_END) == 1
        and text.index(THINK_END) > 0
    )


def is_well_formatted(text: str, thinking: bool) -> bool:
    """Strict format check for the mode: [think block when thinking] + exactly "The answer is N."."""
    if thinking:
        if not has_think_block(text):
            return False
        tail = text.split(THINK_END, 1)[1]
    else:
        if THINK_START in text or THINK_END in text:
            return False
        tail = text
    return _ANSWER_RE.fullmatch(tail.strip()) is not None
