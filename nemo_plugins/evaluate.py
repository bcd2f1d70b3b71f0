"""Task accuracy of a model on tiny-world problems, by difficulty and reasoning mode."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

from .data.chat_tokenizer import ChatTokenizer
from .data.reasoning_world import Problem, is_correct, is_well_formatted
from .model.generate import SamplingConfig
from .model.llama import HeteroLlamaForCausalLM
from .model.rollout import RolloutConfig, sample_questions


def check_answers(verify: Callable[[str, Problem], bool], texts: Sequence[str], problems: Sequence[Problem]) -> list[bool]:
    """`verify(text, problem)` for each pair, in order. A verifier with a `many(texts, problems)`
    method checks them all in one call instead (the LLM judge's: its requests run concurrently)."""
    if len(texts) != len(problems):
        raise ValueError(f"{len(texts)} responses, {len(problems)} problems: expected equal")
    many = getattr(verify, "many", None)
    if many is not None:
        return [bool(ok) for ok in many(texts, problems)]
    return [bool(verify(t, p)) for t, p in zip(texts, problems)]


def task_accuracy(
    model: HeteroLlamaForCausalLM,
    tok: ChatTokenizer,
    problems: Sequence[Problem],
    *,
    thinking: bool | None = True,
    batch_size: int = 64,
    max_new_tokens: int = 64,
    progress: bool = False,
    verify: Callable[[str, Problem], bool] = is_correct,
) -> dict:
    """Greedy-decode each problem's prompt (`model.rollout`, `batch_size` prompts per call); report
    accuracy (`verify`, default the tiny world's exact answer) overall and per difficulty.

    Returns {"accuracy", "format_ok", "n", "by_difficulty": {d: accuracy}}.
    """
    if not problems:
        raise ValueError("task_accuracy: no problems given")
    cfg = RolloutConfig(SamplingConfig(max_new_tokens=max_new_tokens), batch_size=batch_size)
    done = sample_questions(model, tok, [p.question for p in problems], thinking, cfg, progress=progress, desc="evaluate")
    correct: dict[int, list[bool]] = defaultdict(list)
    formatted = 0
    for p, text, ok in zip(problems, done.texts, check_answers(verify, done.texts, problems)):
        correct[p.difficulty].append(ok)
        formatted += bool(thinking is not None and is_well_formatted(text, bool(thinking)))
    every = [c for cs in correct.values() for c in cs]
    return {
        "accuracy": sum(every) / len(every),
        "format_ok": formatted / len(every),
        "n": len(every),
        "by_difficulty": {d: sum(cs) / len(cs) for d, cs in sorted(correct.items())},
    }
