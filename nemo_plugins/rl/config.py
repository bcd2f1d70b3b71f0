"""Settings every RL loop shares (`rl.loop`): steps and batch shape, sampling, optimizer,
rewards, the overlong penalty, prompt ordering, checkpoints and evaluation. An algorithm's config
extends `LoopConfig` with its own fields (GRPO: `grpo.GRPOConfig`). Errors name the YAML key
(`grpo.<field>`; `rpo.RPOConfig` renames them `rpo.<field>`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from ..data.curriculum import CurriculumConfig
from ..model.generate import SamplingConfig
from ..utils.training import PRECISIONS
from .judge import JudgeConfig, LLMJudge
from .rewards import TASKS, RewardConfig, answer_checker
from .scoring import JudgeScorer, RuleScorer, SandboxLimits

SAMPLERS = ("curriculum", "random")


def _bad(name: str, value, expected: str):
    raise ValueError(f"grpo.{name}={value!r}: expected {expected}")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _bad(name, value, "a positive integer")


def _number(name: str, value, lo: float = 0.0, lo_open: bool = False, hi: float = math.inf) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        upper = f" and <= {hi}" if hi < math.inf else ""
        _bad(name, value, f"a finite number {'>' if lo_open else '>='} {lo}{upper}")


@dataclass
class ScoringSettings:
    """The rule rewards' weights (`rewards.RewardConfig`) and the sandbox limits of the reward pool,
    for a task given elsewhere. `workers: 0` scores in-process without limits (tests, debugging);
    otherwise `workers` processes with `timeout_s` CPU time and `memory_mb` extra address space
    per sample, and completions longer than `max_chars` fail as too_long. The RL loops use them
    as `RewardSettings`; the Aligner reward server, which reads the task from its prompt file, as is."""

    accuracy_weight: float = 1.0
    format_weight: float = 0.1
    workers: int = 2
    timeout_s: float = 2.0
    memory_mb: float = 512.0
    max_chars: int = 4000

    def __post_init__(self):
        for name in ("accuracy_weight", "format_weight"):
            _number(f"rewards.{name}", getattr(self, name))
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            _bad("rewards.workers", self.workers, "an integer >= 0 (0: score in-process)")
        _number("rewards.timeout_s", self.timeout_s, lo_open=True)
        _number("rewards.memory_mb", self.memory_mb, lo_open=True)
        _positive_int("rewards.max_chars", self.max_chars)

    def reward_config_for(self, task: str) -> RewardConfig:
        return RewardConfig(task, self.accuracy_weight, self.format_weight)

    def limits(self) -> SandboxLimits:
        return SandboxLimits(self.workers, self.timeout_s, self.memory_mb, self.max_chars)


@dataclass
class JudgeSettings:
    """The LLM judge of reward task "judge" (`judge.JudgeConfig`): an OpenAI-compatible endpoint
    `base_url` (e.g. http://host:8000/v1, a vLLM or NIM server) serving `model`. The API key is
    read from the environment variable `api_key_env`, never from a config file. Each call gets
    `timeout_s` and `retries` retries; `concurrency` calls run at once; the judge sees at most
    `max_answer_chars` of a completion's answer."""

    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 30.0
    retries: int = 2
    concurrency: int = 4
    max_answer_chars: int = 4000

    def judge_config(self) -> JudgeConfig:
        """These settings as the judge client's config (the other `JudgeConfig` fields at their
        defaults); ValueError naming the `grpo.rewards.judge.*` key that is unset or bad."""
        for name in ("base_url", "model"):
            if getattr(self, name) is None:
                _bad(f"rewards.judge.{name}", None, "a value with rewards.task=judge (the judge's endpoint "
                     "and model, e.g. base_url=http://localhost:8000/v1)")
        try:
            return JudgeConfig(**asdict(self))
        except ValueError as e:  # "JudgeConfig.<field> ..." -> the YAML key
            raise ValueError(str(e).replace("JudgeConfig.", "grpo.rewards.judge.", 1)) from None


@dataclass
class RewardSettings(ScoringSettings):
    """What a completion scores: the reward `task` (one of `rewards.TASKS`, kept mutable so
    YAML/overrides can set it) with `ScoringSettings`' weights and sandbox limits; for task
    "judge", the `judge` that checks answers (`JudgeSettings`, required then)."""

    task: str = "world"
    judge: JudgeSettings = field(default_factory=JudgeSettings)

    def __post_init__(self):
        if self.task not in TASKS:
            _bad("rewards.task", self.task, f"one of {', '.join(TASKS)}")
        if isinstance(self.judge, Mapping):
            self.judge = JudgeSettings(**self.judge)
        if self.task == "judge":
            self.judge.judge_config()  # validates the judge's keys
        super().__post_init__()

    def reward_config(self) -> RewardConfig:
        return self.reward_config_for(self.task)

    def scorer(self) -> RuleScorer | JudgeScorer:
        """The scorer these settings describe: rule rewards in the sandbox, or the LLM judge for task
        "judge" (close it, or use it as a context manager)."""
        if self.task == "judge":
            return JudgeScorer(self.reward_config(), self.judge.judge_config(), self.limits())
        return RuleScorer(self.reward_config(), self.limits())

    def verifier(self):
        """`verify(text, problem) -> bool` for held-out accuracy and pass rates: the task's rule
        (`rewards.answer_checker`), or for task "judge" a `JudgeVerifier` (which also checks many
        answers at once, concurrently)."""
        if self.task != "judge":
            return answer_checker(self.task)
        return JudgeVerifier(LLMJudge(self.judge.judge_config()))


def run_key(cfg, report_only: Sequence[str] = ()) -> dict:
    """The settings that name a stage's run directory: `asdict(cfg)` without the `report_only`
    fields, and without `rewards.judge` unless the task is "judge" (a setting a run never reads
    must not make it another run; runs from before the judge existed keep their directories)."""
    key = {k: v for k, v in asdict(cfg).items() if k not in report_only}
    rewards = key.get("rewards")
    if isinstance(rewards, dict) and rewards.get("task") != "judge":
        rewards.pop("judge", None)
    return key


class JudgeVerifier:
    """`verify(text, problem) -> bool`: the judge says CORRECT for `problem.answer` (a failed call is
    False, and counted in `judge.failures`); `many(texts, problems)` asks about all of them,
    `concurrency` calls at a time (`evaluate.check_answers` uses it)."""

    def __init__(self, judge: LLMJudge):
        self.judge = judge

    def __call__(self, text: str, problem) -> bool:
        return self.judge.judge(problem.question, str(problem.answer), text).reward == 1.0

    def many(self, texts, problems) -> list[bool]:
        rewards, _ = self.judge.score([(p.question, str(p.answer), t) for t, p in zip(texts, problems, strict=True)])
        return [r == 1.0 for r in rewards]


@dataclass
class OverlongConfig:
    """DAPO soft overlong penalty added to the reward: 0 up to max_len − buffer generated tokens,
    then linear down to −penalty at max_len (a truncated response gets the full −penalty).
    max_len None means max_new_tokens; penalty 0 switches it off."""

    max_len: int | None = None
    buffer: int = 8
    penalty: float = 0.5

    def __post_init__(self):
        if self.max_len is not None:
            _positive_int("overlong.max_len", self.max_len)
        if isinstance(self.buffer, bool) or not isinstance(self.buffer, int) or self.buffer < 0:
            _bad("overlong.buffer", self.buffer, "an integer >= 0")
        if self.max_len is not None and self.buffer > self.max_len:
            _bad("overlong.buffer", self.buffer, f"<= overlong.max_len ({self.max_len})")
        _number("overlong.penalty", self.penalty)


@dataclass
class SamplerSettings:
    """Prompt ordering: kind "curriculum" (`CurriculumSampler`, Gaussian over pass-rate levels
    moving from easy to hard over the run) or "random" (`RandomSampler`, uniform). The other
    fields are `CurriculumConfig`'s; its batch_size is grpo.prompts_per_step, total_batches
    grpo.steps and seed grpo.seed."""

    kind: str = "curriculum"
    num_levels: int | None = None
    level_edges: list[float] | None = None
    std: float = 1.0
    centre_start: float = 0.0
    centre_end: float = 1.0
    without_replacement: bool = True

    def __post_init__(self):
        if self.kind not in SAMPLERS:
            _bad("curriculum.kind", self.kind, f"one of {', '.join(SAMPLERS)}")
        self.curriculum_config(1, 1, 0)  # validates the shared fields

    def curriculum_config(self, batch_size: int, total_batches: int, seed: int) -> CurriculumConfig:
        fields = {k: v for k, v in asdict(self).items() if k != "kind"}
        try:
            return CurriculumConfig(batch_size=batch_size, total_batches=total_batches, seed=seed, **fields)
        except ValueError as e:
            raise ValueError(f"grpo.{e}") from None


@dataclass
class LoopConfig:
    """Settings of one RL run on the shared loop (see `rl.loop` for what each step does).

    Each step samples `group_size` completions of `prompts_per_step` prompts (at most
    `max_new_tokens` each, `temperature` / `top_p`, `generation_batch_size` sequences per generate
    call; a share `off_fraction` of the prompts under "detailed thinking off").
    updates_per_rollout: optimizer steps per rollout batch, each over the whole batch of kept
    sequences (PPO epochs); micro_batch_size: sequences per forward/backward inside an update
    (gradient accumulation, memory only). lr / min_lr_ratio / warmup_steps: AdamW with linear
    warmup then cosine to lr·min_lr_ratio, one scheduler step per RL step (1.0 keeps it flat).
    log_ref_kl: keep a frozen copy of the starting weights to log KL(π ‖ π_ref) every step even
    when the algorithm has no KL term (a no-grad forward of the trained sequences).
    eval_every: greedy held-out accuracy (thinking on) every that many steps (0: only at the end;
    the last step is always evaluated when held-out problems are given).
    """

    # Fields that change what a step samples or optimizes: resuming with other values is another run.
    run_defining: ClassVar[tuple[str, ...]] = (
        "prompts_per_step", "group_size", "max_new_tokens", "temperature", "top_p", "off_fraction", "seed",
        "rewards", "overlong", "curriculum",
    )  # fmt: skip

    steps: int = 20
    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    off_fraction: float = 0.0
    generation_batch_size: int = 256
    updates_per_rollout: int = 1
    micro_batch_size: int = 64
    lr: float = 2e-4
    min_lr_ratio: float = 1.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: str = "auto"
    log_ref_kl: bool = True
    rewards: RewardSettings = field(default_factory=RewardSettings)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    curriculum: SamplerSettings = field(default_factory=SamplerSettings)
    seed: int = 0
    ckpt_every: int = 10
    keep_last: int = 2
    eval_every: int = 0
    eval_problems: int = 250

    def __post_init__(self):
        for name, kind in (("rewards", RewardSettings), ("overlong", OverlongConfig), ("curriculum", SamplerSettings)):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, kind(**value))
        for name in ("steps", "prompts_per_step", "max_new_tokens", "generation_batch_size",
                     "updates_per_rollout", "micro_batch_size", "ckpt_every"):  # fmt: skip
            _positive_int(name, getattr(self, name))
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            _bad("group_size", self.group_size, "an integer >= 2 (a group needs a baseline)")
        for name in ("keep_last", "warmup_steps", "eval_every", "eval_problems", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _bad(name, value, "an integer >= 0")
        _number("temperature", self.temperature, lo_open=True)
        _number("top_p", self.top_p, lo_open=True, hi=1.0)
        _number("off_fraction", self.off_fraction, hi=1.0)
        _number("lr", self.lr, lo_open=True)
        _number("min_lr_ratio", self.min_lr_ratio, hi=1.0)
        _number("weight_decay", self.weight_decay)
        _number("grad_clip", self.grad_clip)
        if self.precision not in PRECISIONS:
            _bad("precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        if self.overlong.max_len is not None and self.overlong.max_len > self.max_new_tokens:
            _bad("overlong.max_len", self.overlong.max_len, f"<= grpo.max_new_tokens ({self.max_new_tokens})")
        if self.overlong.buffer > self.overlong_max_len:
            _bad("overlong.buffer", self.overlong.buffer, f"<= the overlong max_len ({self.overlong_max_len})")

    @property
    def overlong_max_len(self) -> int:
        return self.overlong.max_len if self.overlong.max_len is not None else self.max_new_tokens

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p)

    @property
    def needs_reference(self) -> bool:
        """Whether the loop keeps a frozen reference (an algorithm with a KL term adds its own reason)."""
        return self.log_ref_kl
