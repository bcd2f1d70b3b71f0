"""The reward protocol: `score(completions, references) -> Scores`, one total per completion, its
named parts and the failures counted by reason, so an RL loop scores the same way whatever
stands behind it. `RuleScorer` is the first implementation: the rule rewards of `rewards.py`
(`combined_reward`: answer accuracy + format) in the sandboxed `sandbox.RewardPool`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch

from .rewards import ZERO_REWARD, RewardConfig, combined_reward, warmup_completions
from .sandbox import RewardPool, direct_map


@dataclass(frozen=True)
class Reference:
    """What one completion is scored against: its prompt's answer and thinking mode."""

    answer: str | int
    thinking: bool


@dataclass
class Scores:
    """Per-completion rewards [N] (float32): `total`, its unweighted `parts` by name, and the
    completions that could not be scored, counted by reason (each of them scores 0)."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]
    failures: Counter


class Scorer(Protocol):
    """Anything that scores completions: rule rewards today, a judge or a reward model later."""

    def score(self, completions: Sequence[str], references: Sequence[Reference]) -> Scores: ...


@dataclass(frozen=True)
class SandboxLimits:
    """`workers` processes (0: in-process, no limits), each sample with `timeout_s` CPU time and
    `memory_mb` extra address space; completions longer than `max_chars` fail as too_long."""

    workers: int = 2
    timeout_s: float = 2.0
    memory_mb: float = 512.0
    max_chars: int = 4000


class RuleScorer:
    """`combined_reward` under `config` for each completion, in a sandboxed `RewardPool` (started
    on first use, so a resumed run with nothing left to train never starts workers) or in-process.
    Use as a context manager, or close()."""

    def __init__(self, config: RewardConfig, limits: SandboxLimits = SandboxLimits()):
        self.config, self.limits = config, limits
        self.fn = partial(combined_reward, config=config)
        self.pool: RewardPool | None = None

    def _pool(self) -> RewardPool:
        if self.pool is None:
            lim = self.limits
            self.pool = RewardPool(self.fn, workers=lim.workers, timeout_s=lim.timeout_s, memory_mb=lim.memory_mb,
                                   max_chars=lim.max_chars, failure_value=ZERO_REWARD,
                                   warmup=warmup_completions(self.config.task))  # fmt: skip
        return self.pool

    def score(self, completions: Sequence[str], references: Sequence[Reference]) -> Scores:
        """Total and parts ("accuracy", "format": 0/1 each) of every completion; failures score 0."""
        if len(completions) != len(references):
            raise ValueError(f"{len(completions)} completions, {len(references)} references: expected equal")
        items = [(text, ref.answer, ref.thinking) for text, ref in zip(completions, references)]
        if self.limits.workers > 0:
            values, failures = self._pool().map(items)
        else:
            values, failures = direct_map(self.fn, items, max_chars=self.limits.max_chars, failure_value=ZERO_REWARD)

        def column(name: str) -> torch.Tensor:
            return torch.tensor([getattr(v, name) for v in values], dtype=torch.float32)

        return Scores(column("total"), {"accuracy": column("accuracy"), "format": column("format")}, Counter(failures))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def __enter__(self) -> RuleScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
