"""The rollout engine: prompts -> n completions each, the one path from chat prompt to decoded text.

Evaluation (`evaluate.task_accuracy`), toggle evaluation (`sft.toggle_eval`), pass-rate
estimation (`rl.pass_rates`) and GRPO's rollout (`rl.grpo`) all render prompts, repeat each n
times, generate in batches with the KV-cache sampler (`generate.generate`) and decode; they do
it here. It lives in model/, not rl/: evaluation and the SFT stage use it too, and a layer only
imports the layers below it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from ..data.chat_tokenizer import ChatTokenizer, as_chat
from .generate import SamplingConfig, generate


@dataclass(frozen=True)
class RolloutConfig:
    """How to sample: `sampling` (temperature 0 is greedy), `n` completions per prompt,
    `batch_size` sequences (prompt x completion) per generate call, and `seed` for a torch
    generator on the model's device (None: no generator, which greedy decoding never needs)."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    n: int = 1
    batch_size: int = 64
    seed: int | None = None

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"rollout n={self.n}: expected >= 1")
        if self.batch_size < 1:
            raise ValueError(f"rollout batch_size={self.batch_size}: expected >= 1")


@dataclass
class Completions:
    """n completions per prompt, groups contiguous: completion j answers prompt j // n."""

    n: int
    prompt_ids: list[list[int]]  # per completion
    ids: list[list[int]]  # generated tokens, the stop token included when the model stopped
    texts: list[str]  # decoded, the stop token dropped
    lengths: list[int]  # generated tokens, the stop token not counted
    stopped: list[bool]  # False where max_new_tokens cut the completion


def with_stop_tokens(sampling: SamplingConfig, stops: Sequence[int]) -> SamplingConfig:
    """`sampling` with the `stops` it lacks appended: a completion always ends at the tokenizer's EOS."""
    missing = tuple(t for t in stops if t not in sampling.stop_token_ids)
    return replace(sampling, stop_token_ids=(*sampling.stop_token_ids, *missing)) if missing else sampling


def render_prompts(
    tok: ChatTokenizer, questions: Sequence[str], thinking: bool | None | Sequence[bool | None]
) -> list[list[int]]:
    """Chat prompt ids of each question, under one thinking mode or one mode per question."""
    tok = as_chat(tok)
    modes = thinking if isinstance(thinking, Sequence) else [thinking] * len(questions)
    if len(modes) != len(questions):
        raise ValueError(f"{len(questions)} questions, {len(modes)} thinking modes: expected equal")
    return [tok.prompt_ids(q, t) for q, t in zip(questions, modes)]


def sample(
    model, tok: ChatTokenizer, prompt_ids: Sequence[Sequence[int]], cfg: RolloutConfig, *,
    progress: bool = False, desc: str = "rollout",
) -> Completions:  # fmt: skip
    """`cfg.n` completions of each prompt (already rendered ids), in eval mode (restored after).

    The prompts are repeated n times in place and cut into generate calls of `cfg.batch_size`
    sequences; one generator, seeded once with `cfg.seed`, serves every call, so a result depends
    on (weights, prompts, cfg) alone.
    """
    tok = as_chat(tok)
    sampling = with_stop_tokens(cfg.sampling, tok.stop_ids)
    stops = set(sampling.stop_token_ids)
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(cfg.seed)
    sequences = [list(p) for p in prompt_ids for _ in range(cfg.n)]
    ids: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(sequences), cfg.batch_size), desc=desc, disable=not progress):
            chunk = sequences[start : start + cfg.batch_size]
            ids += generate(model, chunk, sampling, pad_id=tok.pad_id, generator=generator)
    finally:
        model.train(was_training)
    stopped = [bool(c) and c[-1] in stops for c in ids]
    kept = [c[:-1] if s else c for c, s in zip(ids, stopped)]
    return Completions(n=cfg.n, prompt_ids=sequences, ids=ids, texts=[tok.decode(c) for c in kept],
                       lengths=[len(c) for c in kept], stopped=stopped)  # fmt: skip


def sample_questions(
    model, tok: ChatTokenizer, questions: Sequence[str], thinking: bool | None | Sequence[bool | None],
    cfg: RolloutConfig, **kw,
) -> Completions:  # fmt: skip
    """`sample` on the chat prompts of `questions` (see `render_prompts`)."""
    return sample(model, tok, render_prompts(tok, questions, thinking), cfg, **kw)
