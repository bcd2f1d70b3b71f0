"""The reward protocol: `score(completions, references) -> Scores`, one total per completion, its
named parts and the failures counted by reason, so an RL loop scores the same way whatever
stands behind it. `RuleScorer` is the first implementation: the rule rewards of `rewards.py`
(`combined_reward`: answer accuracy + format) in the sandboxed `sandbox.RewardPool`.
`JudgeScorer` is the second: an LLM judge (`rl.judge`) checks the answer of reward task "judge"
(free-form answers no rule reads), with the rule format reward beside it. `InstructionScorer`
adds whether each completion followed its instruction (`rl.instructions`) to either one's task
reward (RLOO's instruction following). The third, a reward model's score, is
`reward_model.RewardModelScorer`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch

from .instructions import instruction_followed
from .judge import JudgeConfig, LLMJudge
from .rewards import RULE_TASKS, ZERO_REWARD, RewardConfig, combined_reward, format_reward, warmup_completions
from .sandbox import TOO_LONG, RewardPool, direct_map


@dataclass(frozen=True)
class Reference:
    """What one completion is scored against: its prompt's answer and thinking mode, the
    instruction spec its prompt carries (`data.instructions`; None: no instruction) and the
    question it answers (the judge and a reward model read it; "": not given)."""

    answer: str | int
    thinking: bool
    instruction: str | None = None
    question: str = ""


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
        if config.task not in RULE_TASKS:
            raise ValueError(f"RuleScorer: task {config.task!r} has no rule (expected one of {', '.join(RULE_TASKS)}); "
                             "task 'judge' is scored by JudgeScorer")  # fmt: skip
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


class JudgeScorer:
    """Reward task "judge": accuracy_weight x (the judge says CORRECT, 0/1) + format_weight x
    `format_reward` (the mode's layout: a think block or none, and a non-empty answer).

    The judge sees the question, the reference and the completion's answer region (`rl.judge`),
    `judge.concurrency` calls at a time. A call that fails (timeout, HTTP error, no verdict) scores
    0 on accuracy and is counted by its reason, as a sandbox failure is; a completion longer than
    `limits.max_chars` is not sent and scores 0 (counted as too_long). The format check is pure
    string work bounded by max_chars, so it runs in-process. `config` (task "judge", the weights)
    and `limits` are what the loop checks against its settings."""

    def __init__(self, config: RewardConfig, judge: JudgeConfig | LLMJudge, limits: SandboxLimits = SandboxLimits()):
        if config.task != "judge":
            raise ValueError(f"JudgeScorer: task {config.task!r}, expected 'judge' (rule tasks use RuleScorer)")
        self.config, self.limits = config, limits
        self.judge = judge if isinstance(judge, LLMJudge) else LLMJudge(judge)

    def score(self, completions: Sequence[str], references: Sequence[Reference]) -> Scores:
        """Total and parts ("accuracy": the judge's verdict, "format"), failures counted by reason."""
        if len(completions) != len(references):
            raise ValueError(f"{len(completions)} completions, {len(references)} references: expected equal")
        fits = [len(text) <= self.limits.max_chars for text in completions]
        items = [(r.question, str(r.answer), text) for text, r, ok in zip(completions, references, fits) if ok]
        verdicts, failures = self.judge.score(items)
        judged = iter(verdicts)
        accuracy = torch.tensor([next(judged) if ok else 0.0 for ok in fits], dtype=torch.float32)
        fmt = torch.tensor([format_reward(text, r.thinking) if ok else 0.0
                            for text, r, ok in zip(completions, references, fits)], dtype=torch.float32)  # fmt: skip
        failures = Counter(failures)
        if not all(fits):
            failures[TOO_LONG] += fits.count(False)
        total = self.config.accuracy_weight * accuracy + self.config.format_weight * fmt
        return Scores(total, {"accuracy": accuracy, "format": fmt}, failures)

    def close(self) -> None:
        pass

    def __enter__(self) -> JudgeScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InstructionScorer:
    """`instruction_weight` x (instruction followed, 0/1) + the task reward of `task` (a
    `RuleScorer` or `JudgeScorer`: accuracy_weight x accuracy + format_weight x format).

    The instruction check is pure string work, linear in the text and bounded by the sandbox's
    `max_chars`, so it runs in-process; a completion whose task part fails in the pool scores 0 on
    the task and is still checked for its instruction. Exposes `config` and `limits` of the task
    scorer (the loop checks them against its settings). Every reference must carry an instruction."""

    def __init__(self, task: RuleScorer | JudgeScorer, instruction_weight: float = 1.0):
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
