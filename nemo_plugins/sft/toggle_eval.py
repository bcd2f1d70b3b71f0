"""Does the model obey the reasoning toggle? Greedy answers under "detailed thinking on" and "off".

Per mode, over the same problems:
- adherence: on, the response starts with exactly one well-formed `<think>…</think>` block and
  has non-blank text (the answer) after it (`reasoning_world.has_think_block` plus that check);
  off, the response holds no think tag at all;
- format_ok: the stricter `reasoning_world.is_well_formatted` (adherence and exactly
  "The answer is N." as the answer part), reported beside adherence, which does not need it;
- accuracy: `extract_answer` equals the problem's answer (answers inside a think block never count);
- enters_mode: the first step of the toggle alone: on, the response opens with `<think>`; off,
  as adherence (no think tag). A response cut at max_new_tokens inside its think block enters
  the mode but does not adhere;
- truncated: the share of responses cut at max_new_tokens (no stop token);
- mean_response_tokens: generated tokens, the stop token excluded; n: problems.

Decoding is greedy, with an optional repetition penalty (`SamplingConfig.repetition_penalty`):
a small model's greedy thinking trace can loop on one sentence until it is cut, which no prompt
format fixes. Thinking-off answers can have their own penalty (`repetition_penalty_off`), as
model cards give each mode its own decoding: off answers are short, and a penalty meant to break
long traces' loops pushes them off their likeliest tokens.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

from ..data.chat import THINK_END, THINK_START
from ..data.chat_tokenizer import ChatTokenizer
from ..data.reasoning_world import Problem, has_think_block, is_correct, is_well_formatted
from ..evaluate import check_answers
from ..model.generate import SamplingConfig
from ..model.llama import HeteroLlamaForCausalLM
from ..model.rollout import RolloutConfig, sample_questions

MODES = {"on": True, "off": False}


def follows_toggle(text: str, thinking: bool) -> bool:
    """On: one think block at the start and an answer part after it. Off: no think tag."""
    if not thinking:
        return THINK_START not in text and THINK_END not in text
    return has_think_block(text) and bool(text.split(THINK_END, 1)[1].strip())


def enters_mode(text: str, thinking: bool) -> bool:
    """On: the response opens with a think tag. Off: it has no think tag."""
    return text.lstrip().startswith(THINK_START) if thinking else follows_toggle(text, False)


def mode_scores(
    problems: Sequence[Problem], texts: Sequence[str], lengths: Sequence[int], thinking: bool,
    verify: Callable[[str, Problem], bool] = is_correct, stopped: Sequence[bool] | None = None,
) -> dict:  # fmt: skip
    """Adherence, mode entry, format, accuracy (`verify`; overall and per difficulty), mean length,
    truncation (when `stopped` says which responses ended with a stop token) and n for one mode."""
    if len(problems) != len(texts) or len(texts) != len(lengths):
        raise ValueError(f"{len(problems)} problems, {len(texts)} responses, {len(lengths)} lengths: expected equal")
    if not problems:
        raise ValueError("evaluate_toggle: no problems given")
    n = len(problems)
    correct = check_answers(verify, texts, problems)
    by_level: dict[int, list[bool]] = defaultdict(list)
    for p, c in zip(problems, correct):
        by_level[p.difficulty].append(c)
    return {
        "adherence": sum(follows_toggle(t, thinking) for t in texts) / n,
        "enters_mode": sum(enters_mode(t, thinking) for t in texts) / n,
        "truncated": None if stopped is None else sum(not s for s in stopped) / n,
        "format_ok": sum(is_well_formatted(t, thinking) for t in texts) / n,
        "accuracy": sum(correct) / n,
        "accuracy_by_difficulty": {str(d): sum(cs) / len(cs) for d, cs in sorted(by_level.items())},
        "mean_response_tokens": sum(lengths) / n,
        "n": n,
    }


def greedy_responses(
    model: HeteroLlamaForCausalLM, tok: ChatTokenizer, problems: Sequence[Problem], thinking: bool, *,
    batch_size: int, max_new_tokens: int, repetition_penalty: float = 1.0,
) -> tuple[list[str], list[int], list[bool]]:  # fmt: skip
    """(texts, token counts, stopped) of greedy responses to each problem's prompt (`model.rollout`),
    stop token dropped; `stopped` is False where max_new_tokens cut the response."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
    cfg = RolloutConfig(sampling, batch_size=batch_size)
    done = sample_questions(model, tok, [p.question for p in problems], thinking, cfg)
    return done.texts, done.lengths, done.stopped


def evaluate_toggle(
    model: HeteroLlamaForCausalLM, tokenizer: ChatTokenizer, problems: Sequence[Problem], *,
    batch_size: int = 64, max_new_tokens: int = 64, verify: Callable[[str, Problem], bool] = is_correct,
    repetition_penalty: float = 1.0, repetition_penalty_off: float | None = None,
) -> dict:  # fmt: skip
    """{"on": scores, "off": scores} (see `mode_scores`) from greedy answers to the same problems;
    thinking-off answers decode with `repetition_penalty_off` (None: `repetition_penalty`)."""
    if not problems:
        raise ValueError("evaluate_toggle: no problems given")
    if batch_size < 1:
        raise ValueError(f"evaluate_toggle: batch_size={batch_size}, expected >= 1")
    off = repetition_penalty if repetition_penalty_off is None else repetition_penalty_off
    penalties = {True: repetition_penalty, False: off}
    out = {}
    for mode, thinking in MODES.items():
        texts, lengths, stopped = greedy_responses(
            model, tokenizer, problems, thinking, batch_size=batch_size, max_new_tokens=max_new_tokens,
            repetition_penalty=penalties[thinking],
        )
        out[mode] = mode_scores(problems, texts, lengths, thinking, verify, stopped)
    return out


__all__ = ["enters_mode", "evaluate_toggle", "follows_toggle", "mode_scores"]
