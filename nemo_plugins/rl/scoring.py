"""The reward protocol: `score(completions, references) -> Scores`, one total per completion, its
named parts and the failures counted by reason, so an RL loop scores the same way whatever
stands behind it. `RuleScorer` is the first implementation: the rule rewards of `rewards.py`
(`combined_reward`: answer accuracy + format) in the sandboxed `sandbox.RewardPool`.
`InstructionScorer` adds whether each completion followed its instruction (`rl.instructions`)
to a `RuleScorer`'s task reward (RLOO's instruction following).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch

from .instructions import instruction_followed
from .rewards import ZERO_REWARD, RewardConfig, combined_reward, warmup_completions
from .sandbox import RewardPool, direct_map


@dataclass(frozen=True)
class Reference:
    """What one completion is scored against: its prompt's answer and thinking mode, and the
    instruction spec its prompt carries (`data.instructions`; None: no instruction)."""

    answer: str | int
    thinking: bool
    instruction: str | None = None


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


class InstructionScorer:
    """`instruction_weight` x (instruction followed, 0/1) + the task reward of `task` (a
    `RuleScorer`: accuracy_weight x accuracy + format_weight x format, in its sandboxed pool).

    The instruction check is pure string work, linear in the text and bounded by the sandbox's
    `max_chars`, so it runs in-process; a completion whose task part fails in the pool scores 0 on
    the task and is still checked for its instruction. Exposes `config` and `limits` of the task
    scorer (the loop checks them against its settings). Every reference must carry an instruction."""

    def __init__(self, task: RuleScorer, instruction_weight: float = 1.0):
        if not (isinstance(instruction_weight, (int, float)) and instruction_weight >= 0):
            raise ValueError(f"instruction_weight={instruction_weight!r}: expected a number >= 0")
        self.task, self.instruction_weight = task, float(instruction_weight)
        self.config, self.limits = task.config, task.limits

    def score(self, completions: Sequence[str], references: Sequence[Reference]) -> Scores:
        """Total and parts ("instruction", plus the task scorer's "accuracy" and "format")."""
        missing = [i for i, r in enumerate(references) if r.instruction is None]
        if missing:
            raise ValueError(f"reference {missing[0]} has no instruction: InstructionScorer scores instructed prompts")
        task = self.task.score(completions, references)
        followed = torch.tensor([float(instruction_followed(c, r.instruction, self.limits.max_chars))
                                 for c, r in zip(completions, references)], dtype=torch.float32)  # fmt: skip
        return Scores(task.total + self.instruction_weight * followed, {"instruction": followed, **task.parts},
                      task.failures)  # fmt: skip

    def close(self) -> None:
        self.task.close()

    def __enter__(self) -> InstructionScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
