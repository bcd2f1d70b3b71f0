"""What one RL step samples and how it is scored: the step's prompts (curriculum or random
order), their thinking modes, G completions per prompt from the rollout engine, and their
rewards through the reward protocol plus DAPO's overlong penalty. All of it depends on
(seed, step) and the weights alone, which is what makes a resumed run match an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..data.chat_tokenizer import ChatTokenizer
from ..data.curriculum import CurriculumSampler, RandomSampler
from ..data.reasoning_world import Problem
from ..model.rollout import RolloutConfig, sample_questions
from ..model.train import collate_with_validity
from .config import LoopConfig
from .grpo_loss import overlong_penalty
from .scoring import Reference, Scorer


def seed_for(*parts) -> int:
    """A 63-bit seed from (seed, purpose, step): per-step randomness without state to checkpoint."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def make_sampler(pass_rates: Mapping[str, float], cfg: LoopConfig):
    """The prompt sampler over `pass_rates`' ids (curriculum or random, per `cfg.curriculum.kind`)."""
    if cfg.prompts_per_step > len(pass_rates):
        raise ValueError(
            f"grpo.prompts_per_step={cfg.prompts_per_step}: expected <= the number of training prompts "
            f"({len(pass_rates)} after filtering)"
        )
    ccfg = cfg.curriculum.curriculum_config(cfg.prompts_per_step, cfg.steps, cfg.seed)
    kind = CurriculumSampler if cfg.curriculum.kind == "curriculum" else RandomSampler
    return kind(dict(pass_rates), ccfg)


def choose_modes(n: int, off_fraction: float, seed: int, step: int) -> list[bool]:
    """Thinking flag per prompt of step `step`: round(off_fraction·n) prompts off, at random."""
    n_off = round(off_fraction * n)
    off = set(random.Random(seed_for(seed, "modes", step)).sample(range(n), n_off))
    return [i not in off for i in range(n)]


@dataclass
class Rollout:
    """G completions per prompt, groups contiguous: sequence j belongs to prompt j // G."""

    prompt_ids: list[list[int]]  # per sequence
    completions: list[list[int]]  # generated tokens, EOS included when the model stopped
    texts: list[str]  # decoded completions without EOS
    thinking: list[bool]
    answers: list[int]
    truncated: list[bool]
    instructions: list[str | None] | None = None  # per sequence, the prompt's instruction spec (RLOO)
    questions: list[str] | None = None  # per sequence, the question asked (the judge reads it)

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(c) for c in self.completions], dtype=torch.long)

    def sequences(self, indices: Sequence[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (ids, response_mask) of prompt + completion for the chosen sequences."""
        examples = []
        for i in indices:
            prompt, completion = self.prompt_ids[i], self.completions[i]
            examples.append((prompt + completion, [0] * len(prompt) + [1] * len(completion)))
        ids, mask, _ = collate_with_validity(examples, pad_id)
        return ids, mask


def rollout(
    policy, tok: ChatTokenizer, problems: Sequence[Problem], thinking: Sequence[bool], cfg: LoopConfig, seed: int,
) -> Rollout:
    """Sample `cfg.group_size` completions per problem under its thinking mode (`model.rollout`, its
    generator seeded with `seed`)."""
    G = cfg.group_size
    engine = RolloutConfig(cfg.sampling, n=G, batch_size=cfg.generation_batch_size, seed=seed)
    done = sample_questions(policy, tok, [p.question for p in problems], thinking, engine)
    return Rollout(
        prompt_ids=done.prompt_ids, completions=done.ids, texts=done.texts,
        thinking=[t for t in thinking for _ in range(G)], answers=[p.answer for p in problems for _ in range(G)],
        truncated=[not s for s in done.stopped],
        instructions=[getattr(p, "instruction", None) for p in problems for _ in range(G)],
        questions=[p.question for p in problems for _ in range(G)],
    )  # fmt: skip


@dataclass
class Rewards:
    """Per-sequence rewards: total (task reward + overlong penalty) and its parts."""

    total: torch.Tensor
    accuracy: torch.Tensor  # 0/1, unweighted
    format: torch.Tensor  # 0/1, unweighted
    overlong: torch.Tensor  # <= 0
    failures: Counter
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # every part the scorer gave, by name


def score_rollout(roll: Rollout, scorer: Scorer, cfg: LoopConfig) -> Rewards:
    """Rewards of every completion (`scoring` protocol), the overlong penalty added; failed samples score 0."""
    instructions = roll.instructions or [None] * len(roll.texts)
    questions = roll.questions or [""] * len(roll.texts)
    refs = [Reference(a, t, i, q) for a, t, i, q in zip(roll.answers, roll.thinking, instructions, questions)]
    scores = scorer.score(roll.texts, refs)
    penalty = overlong_penalty(roll.lengths, cfg.overlong_max_len, cfg.overlong.buffer, cfg.overlong.penalty)
    return Rewards(total=scores.total + penalty, accuracy=scores.parts["accuracy"], format=scores.parts["format"],
                   overlong=penalty, failures=Counter(scores.failures), parts=dict(scores.parts))  # fmt: skip
