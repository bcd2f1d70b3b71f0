"""GRPO on the reference model (Llama-Nemotron, arXiv 2505.00949 §5; DAPO, arXiv 2503.14476;
NeMo-RL conventions), one file for the algorithm and its resumable Lightning loop.

One GRPO step:

1. **Prompts.** `prompts_per_step` problem ids from the sampler over the (pass-rate filtered)
   prompt pool: `CurriculumSampler` (progressive batching, easy -> hard) or `RandomSampler`
   (`curriculum.kind`). Each prompt is rendered under a thinking mode: "detailed thinking on"
   by default, and exactly round(`off_fraction` x prompts_per_step) prompts, chosen at random per
   step, under "detailed thinking off", so the format reward (strict tiny-world layout of the
   mode: a think block then "The answer is N." when on; the answer alone when off) is trained
   for both modes and the toggle is not forgotten. All G completions of a prompt share its mode.
2. **Rollout.** G = `group_size` completions per prompt from the rollout engine
   (`model.rollout` over the KV-cache sampler: left-padded batches, temperature/top-p, stop at
   EOS), at most `max_new_tokens` each, in chunks of `generation_batch_size` sequences.
3. **Rewards.** Through the reward protocol (`scoring.RuleScorer`): `rewards.combined_reward`
   (task "world": exact answer + strict format, weighted) in the sandboxed `RewardPool`
   (per-sample wall time and memory limits; a failed sample scores 0 and is counted by reason),
   plus DAPO's soft overlong penalty on the response length.
4. **Advantages.** Group-relative (`group_advantages`: group mean or leave-one-out baseline,
   optionally ÷ std); groups whose rewards are all equal carry no signal and are dropped
   (`loss.drop_zero_variance`), the others are trained.
5. **Updates.** `updates_per_rollout` optimizer steps on the same rollout batch (PPO epochs):
   each one spans the WHOLE batch of kept sequences, processed in micro-batches of
   `micro_batch_size` sequences whose gradients accumulate (memory only: the result equals one
   full-batch step, since every micro-batch loss is normalized by the step's global token count,
   `loss_normalizers` -> `global_tokens`). The old policy's log-probs are recomputed before the
   first update (no grad) when there is more than one update; with one update the loss is
   on-policy (ratio 1, `old_logp=None`: the same gradient without the extra forward pass). The
   clipped loss (`grpo_loss`) adds kl_beta·k3 KL to a frozen reference (the starting weights)
   when `loss.kl_beta > 0`. Log-probs use the logits ÷ `temperature`, the distribution the
   rollout sampled from (top_p < 1 truncates that distribution further; the ratio ignores it).
   When no sequence is kept (every group zero-variance) no optimizer step is taken.

Determinism and resume: the prompts of step k come from the sampler (its `state_dict` is saved
in the checkpoint's `extra`), the modes and the rollout's torch generator are seeded from
(seed, k) alone, and the reward functions are pure; so a run resumed from the checkpoint of
step k draws the same batch k+1, samples the same completions and, with the restored weights,
optimizer, scheduler and RNG states, ends with the same weights as an uninterrupted run (bit for
bit on CPU; tested). A reward sample that hits the pool's time limit under heavy load is the one
source of run-to-run difference (it scores 0 and is counted under `fail_timeout`).

Files under `out_dir`: `checkpoints/step-*/` (utils/resume.py), `metrics.csv` and
`metrics.jsonl` (one row per step, rewritten from the checkpointed history, so a resumed run
never duplicates rows), `grpo.png` (curves, `plots.plot_grpo`), `grpo_summary.json`.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import logging
import math
import random
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from ..data.chat_tokenizer import ChatTokenizer, as_chat
from ..data.curriculum import CurriculumConfig, CurriculumSampler, RandomSampler
from ..data.reasoning_world import Problem
from ..model.losses import next_token_mask
from ..utils.training import PRECISIONS, StepModule, fit_module, resolve_precision, resume_latest, stop_if_terminated
from ..model.generate import SamplingConfig
from ..model.rollout import RolloutConfig, sample_questions
from ..model.train import collate_with_validity
from ..utils.atomic import write_json_atomic, write_text_atomic
from ..utils.resume import TrainingState, latest, save_training_state
from .grpo_loss import (
    GRPOLossConfig,
    entropy,
    group_advantages,
    grpo_loss,
    keep_sequences,
    loss_normalizers,
    overlong_penalty,
    token_logprobs,
    zero_variance_groups,
)
from .rewards import TASKS, RewardConfig, answer_checker
from .sandbox import CRASH, MEMORY, TIMEOUT, TOO_LONG
from .scoring import Reference, RuleScorer, SandboxLimits, Scorer

log = logging.getLogger("nemo_plugins.grpo")

SAMPLERS = ("curriculum", "random")
FAILURE_COLUMNS = {"fail_timeout": TIMEOUT, "fail_memory": MEMORY, "fail_too_long": TOO_LONG, "fail_crash": CRASH}
# Fields that change what a step samples or optimizes: resuming with other values is another run.
_RUN_DEFINING = ("prompts_per_step", "group_size", "max_new_tokens", "temperature", "top_p", "off_fraction",
                 "seed", "loss", "rewards", "overlong", "curriculum", "leave_one_out", "normalize_std")  # fmt: skip


# ----------------------------------------------------------------------------- config


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
class LossConfig(GRPOLossConfig):
    """`GRPOLossConfig` whose errors name `grpo.loss.<field>` (it is the `loss:` section)."""

    def __post_init__(self):
        try:
            super().__post_init__()
        except ValueError as e:
            raise ValueError(f"grpo.loss.{e}") from None


@dataclass
class RewardSettings:
    """What a completion scores (`rewards.RewardConfig`, kept mutable so YAML/overrides can set
    it) and the sandbox limits of the reward pool. `workers: 0` scores in-process without limits
    (tests, debugging); otherwise `workers` processes with `timeout_s` wall time and `memory_mb`
    extra address space per sample, and completions longer than `max_chars` fail as too_long."""

    task: str = "world"
    accuracy_weight: float = 1.0
    format_weight: float = 0.1
    workers: int = 2
    timeout_s: float = 2.0
    memory_mb: float = 512.0
    max_chars: int = 4000

    def __post_init__(self):
        if self.task not in TASKS:
            _bad("rewards.task", self.task, f"one of {', '.join(TASKS)}")
        for name in ("accuracy_weight", "format_weight"):
            _number(f"rewards.{name}", getattr(self, name))
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            _bad("rewards.workers", self.workers, "an integer >= 0 (0: score in-process)")
        _number("rewards.timeout_s", self.timeout_s, lo_open=True)
        _number("rewards.memory_mb", self.memory_mb, lo_open=True)
        _positive_int("rewards.max_chars", self.max_chars)

    def reward_config(self) -> RewardConfig:
        return RewardConfig(self.task, self.accuracy_weight, self.format_weight)

    def limits(self) -> SandboxLimits:
        return SandboxLimits(self.workers, self.timeout_s, self.memory_mb, self.max_chars)

    def scorer(self) -> RuleScorer:
        """The rule-reward scorer these settings describe (close it, or use it as a context manager)."""
        return RuleScorer(self.reward_config(), self.limits())


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
class GRPOConfig:
    """Settings of one GRPO run (see the module docstring for what each step does).

    updates_per_rollout: optimizer steps per rollout batch, each over the whole batch of kept
    sequences (PPO epochs); micro_batch_size: sequences per forward/backward inside an update
    (gradient accumulation, memory only). lr / min_lr_ratio / warmup_steps: AdamW with linear
    warmup then cosine to lr·min_lr_ratio, one scheduler step per GRPO step (1.0 keeps it flat).
    log_ref_kl: keep a frozen copy of the starting weights to log KL(π ‖ π_ref) every step even
    when loss.kl_beta = 0 (a no-grad forward of the trained sequences).
    eval_every: greedy held-out accuracy (thinking on) every that many steps (0: only at the end;
    the last step is always evaluated when held-out problems are given).
    The KL weight to the frozen reference and dropping zero-variance groups are loss settings
    (`loss.kl_beta`, `loss.drop_zero_variance`); leave_one_out / normalize_std shape the advantages.
    """

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
    leave_one_out: bool = False
    normalize_std: bool = True
    log_ref_kl: bool = True
    loss: LossConfig = field(default_factory=LossConfig)
    rewards: RewardSettings = field(default_factory=RewardSettings)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    curriculum: SamplerSettings = field(default_factory=SamplerSettings)
    seed: int = 0
    ckpt_every: int = 10
    keep_last: int = 2
    eval_every: int = 0
    eval_problems: int = 250

    def __post_init__(self):
        for name, kind in (("loss", LossConfig), ("rewards", RewardSettings), ("overlong", OverlongConfig),
                           ("curriculum", SamplerSettings)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, kind(**value))
            elif type(value) is GRPOLossConfig:
                setattr(self, name, LossConfig(**asdict(value)))
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
        return self.loss.kl_beta > 0 or self.log_ref_kl


# ----------------------------------------------------------------------------- prompts and modes


def _seed_for(*parts) -> int:
    """A 63-bit seed from (seed, purpose, step): per-step randomness without state to checkpoint."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def make_sampler(pass_rates: Mapping[str, float], cfg: GRPOConfig):
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
    off = set(random.Random(_seed_for(seed, "modes", step)).sample(range(n), n_off))
    return [i not in off for i in range(n)]


# ----------------------------------------------------------------------------- rollout


@dataclass
class Rollout:
    """G completions per prompt, groups contiguous: sequence j belongs to prompt j // G."""

    prompt_ids: list[list[int]]  # per sequence
    completions: list[list[int]]  # generated tokens, EOS included when the model stopped
    texts: list[str]  # decoded completions without EOS
    thinking: list[bool]
    answers: list[int]
    truncated: list[bool]

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
    policy, tok: ChatTokenizer, problems: Sequence[Problem], thinking: Sequence[bool], cfg: GRPOConfig, seed: int,
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
    )  # fmt: skip


# ----------------------------------------------------------------------------- rewards


@dataclass
class Rewards:
    """Per-sequence rewards: total (task reward + overlong penalty) and its parts."""

    total: torch.Tensor
    accuracy: torch.Tensor  # 0/1, unweighted
    format: torch.Tensor  # 0/1, unweighted
    overlong: torch.Tensor  # <= 0
    failures: Counter


def score_rollout(roll: Rollout, scorer: Scorer, cfg: GRPOConfig) -> Rewards:
    """Rewards of every completion (`scoring` protocol), the overlong penalty added; failed samples score 0."""
    scores = scorer.score(roll.texts, [Reference(a, t) for a, t in zip(roll.answers, roll.thinking)])
    penalty = overlong_penalty(roll.lengths, cfg.overlong_max_len, cfg.overlong.buffer, cfg.overlong.penalty)
    return Rewards(total=scores.total + penalty, accuracy=scores.parts["accuracy"], format=scores.parts["format"],
                   overlong=penalty, failures=Counter(scores.failures))  # fmt: skip


# ----------------------------------------------------------------------------- update


def sequence_token_logprobs(model, ids: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(token log-probs [B, T], logits ÷ temperature) of `ids` under `model` (see grpo_loss.token_logprobs)."""
    logits = model(ids)
    if temperature != 1.0:
        logits = logits / temperature
    return token_logprobs(logits, ids), logits


def micro_batch_indices(indices: Sequence[int], size: int) -> list[list[int]]:
    return [list(indices[i : i + size]) for i in range(0, len(indices), size)]


@dataclass
class _MicroBatch:
    ids: torch.Tensor
    mask: torch.Tensor  # predicting positions of response tokens
    advantages: torch.Tensor
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None


_GLOBAL_METRICS = ("loss", "pg_loss", "kl_loss")


def _sum_metrics(acc: dict, metrics: Mapping[str, torch.Tensor], weight: float) -> None:
    for k, v in metrics.items():
        acc[k] = acc.get(k, 0.0) + float(v) * weight


def make_micro_batches(policy, reference, roll: Rollout, advantages: torch.Tensor, keep: torch.Tensor,
                       cfg: GRPOConfig, pad_id: int) -> list[_MicroBatch]:  # fmt: skip
    """Kept sequences in micro-batches (each trimmed to its own longest sequence), with the
    reference's log-probs and, when there are several updates, the old policy's (no grad)."""
    device = policy.lm_head.weight.device
    kept = [i for i in range(len(roll.completions)) if bool(keep[i])]
    out = []
    for chunk in micro_batch_indices(kept, cfg.micro_batch_size):
        ids, response = roll.sequences(chunk, pad_id)
        mb = _MicroBatch(ids.to(device), next_token_mask(response).to(device), advantages[chunk].to(device))
        with torch.no_grad():
            if cfg.updates_per_rollout > 1:
                mb.old_logp = sequence_token_logprobs(policy, mb.ids, cfg.temperature)[0]
            if reference is not None:
                mb.ref_logp = sequence_token_logprobs(reference, mb.ids, cfg.temperature)[0]
        out.append(mb)
    return out


def policy_update(
    policy, reference, optimizer, roll: Rollout, advantages: torch.Tensor, keep: torch.Tensor, cfg: GRPOConfig,
    *, pad_id: int = 0, backward=None,
) -> dict:  # fmt: skip
    """`cfg.updates_per_rollout` optimizer steps over the kept sequences of `roll` (each over all
    of them, micro-batch gradients accumulated; `backward(loss)` defaults to loss.backward()).

    Returns the step's loss metrics: means over the updates (per-token ones token-weighted over
    micro-batches; clip fraction and approx_kl are 0 on the first, on-policy update), entropy of
    the pre-update policy, grad norm before clipping. No kept token: no optimizer step.
    """
    backward = backward or (lambda loss: loss.backward())
    batches = make_micro_batches(policy, reference, roll, advantages, keep, cfg, pad_id)
    tokens = sum(loss_normalizers(mb.mask)[0] for mb in batches)
    seqs = sum(loss_normalizers(mb.mask)[1] for mb in batches)
    row = {"seqs_trained": int(keep.sum()), "tokens_trained": tokens, "updates": 0}
    if tokens == 0:  # every group had equal rewards: no signal, no step
        return {**row, "loss": 0.0, "pg_loss": 0.0, "kl_loss": 0.0}
    sums: dict[str, float] = {}
    ent_sum = 0.0
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    for update in range(cfg.updates_per_rollout):
        for mb in batches:
            logp, logits = sequence_token_logprobs(policy, mb.ids, cfg.temperature)
            loss, metrics = grpo_loss(logp, mb.old_logp, mb.ref_logp, mb.advantages, mb.mask, cfg.loss,
                                      global_tokens=tokens, global_sequences=seqs)  # fmt: skip
            backward(loss)
            n = float(metrics.pop("tokens"))
            for k in _GLOBAL_METRICS:  # already normalized by the step's global counts
                sums[k] = sums.get(k, 0.0) + float(metrics.pop(k))
            _sum_metrics(sums, metrics, n / tokens)
            if update == 0:
                with torch.no_grad():
                    ent_sum += float((entropy(logits) * mb.mask).sum())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm))
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row["updates"] += 1
    row.update({k: v / row["updates"] for k, v in sums.items()})
    row["entropy"] = ent_sum / tokens
    return row


# ----------------------------------------------------------------------------- metrics


CSV_COLUMNS = (
    "step", "lr", "reward", "reward_accuracy", "reward_format", "reward_overlong", "pass_rate", "pass_rate_on",
    "pass_rate_off", "format_rate", "len_on", "len_off", "truncated", "groups", "groups_dropped", "seqs_trained",
    "tokens_trained", "updates", "loss", "pg_loss", "kl_loss", "kl_ref", "approx_kl", "clip_fraction", "ratio_mean",
    "entropy", "grad_norm", "prompt_pass_rate", "reward_failures", *FAILURE_COLUMNS, "fail_error", "time_s",
    "eval_accuracy",
)  # fmt: skip


def _mean(x: torch.Tensor, where: torch.Tensor | None = None) -> float | None:
    x = x.float() if where is None else x[where].float()
    return float(x.mean()) if x.numel() else None


def rollout_metrics(roll: Rollout, rewards: Rewards, cfg: GRPOConfig) -> dict:
    """Reward total and by component, pass rate (share correct) overall and by mode, response
    length by mode, truncation, zero-variance groups and reward failures by reason."""
    on = torch.tensor(roll.thinking, dtype=torch.bool)
    lengths = roll.lengths
    zero = zero_variance_groups(rewards.total, cfg.group_size)
    rc = cfg.rewards
    failures = rewards.failures
    row = {
        "reward": _mean(rewards.total),
        "reward_accuracy": rc.accuracy_weight * _mean(rewards.accuracy),
        "reward_format": rc.format_weight * _mean(rewards.format),
        "reward_overlong": _mean(rewards.overlong),
        "pass_rate": _mean(rewards.accuracy),
        "pass_rate_on": _mean(rewards.accuracy, on),
        "pass_rate_off": _mean(rewards.accuracy, ~on),
        "format_rate": _mean(rewards.format),
        "len_on": _mean(lengths, on),
        "len_off": _mean(lengths, ~on),
        "truncated": _mean(torch.tensor(roll.truncated)),
        "groups": int(zero.numel()),
        "groups_dropped": int(zero.sum()) if cfg.loss.drop_zero_variance else 0,
        "groups_zero_variance": int(zero.sum()),
        "reward_failures": sum(failures.values()),
        "failures": dict(failures),
    }
    for col, reason in FAILURE_COLUMNS.items():
        row[col] = failures.get(reason, 0)
    row["fail_error"] = sum(n for r, n in failures.items() if r.startswith("error:"))
    return row


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_metrics(history: Sequence[dict], csv_path: Path, jsonl_path: Path) -> None:
    """metrics.csv (CSV_COLUMNS) and metrics.jsonl (every key), one row per step, atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for row in history:
        writer.writerow([_fmt(row.get(c)) for c in CSV_COLUMNS])
    write_text_atomic(csv_path, buffer.getvalue())
    write_text_atomic(jsonl_path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in history))


def heldout_accuracy(
    model, tok: ChatTokenizer, problems: Sequence[Problem], max_new_tokens: int, thinking: bool = True, task: str = "world"
) -> dict:
    """Greedy accuracy on held-out problems (`evaluate.task_accuracy`, answers checked by `task`'s
    verifier), JSON-ready (string keys)."""
    from ..evaluate import task_accuracy

    acc = task_accuracy(model, tok, problems, thinking=thinking, max_new_tokens=max_new_tokens,
                        verify=answer_checker(task))  # fmt: skip
    return {"accuracy": acc["accuracy"], "format_ok": acc["format_ok"], "n": acc["n"],
            "by_difficulty": {str(d): a for d, a in acc["by_difficulty"].items()}}  # fmt: skip


# ----------------------------------------------------------------------------- Lightning module


@dataclass
class _Paths:
    out_dir: Path

    checkpoints = property(lambda self: self.out_dir / "checkpoints")
    metrics_csv = property(lambda self: self.out_dir / "metrics.csv")
    metrics_jsonl = property(lambda self: self.out_dir / "metrics.jsonl")
    plot = property(lambda self: self.out_dir / "grpo.png")
    summary = property(lambda self: self.out_dir / "grpo_summary.json")


class GRPOModule(StepModule):
    """The policy trained by GRPO (manual optimization); one Lightning batch = one GRPO step
    (the batch is only the step index: the prompts come from the sampler inside the step, so a
    Lightning prefetch never advances the sampler past the checkpoint)."""

    def __init__(
        self, policy, reference, tok: ChatTokenizer, problems: Mapping[str, Problem], sampler, cfg: GRPOConfig,
        paths: _Paths, resume: TrainingState | None, eval_problems: Sequence[Problem], rewarder: Scorer | None = None,
    ):  # fmt: skip
        super().__init__(policy, cfg, paths, resume)
        self.policy = policy
        self.reference = reference.requires_grad_(False).eval() if reference is not None else None
        self.tok, self.problems, self.sampler = as_chat(tok), problems, sampler
        self.eval_problems = list(eval_problems)
        self.rewarder = rewarder
        self.pad_id = as_chat(tok).pad_id
        extra = resume.extra if resume is not None else {}
        self.history: list[dict] = list(extra.get("history", []))
        self.eval_history: list[dict] = list(extra.get("eval_history", []))
        self.last_batch: list[str] = []

    def train(self, mode: bool = True):
        """Lightning puts the whole module in train mode; the reference stays in eval."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    # -- one step

    def training_step(self, batch, batch_idx):
        t0 = time.perf_counter()
        ids, roll, rewards = self.sample(self.step_count)
        cfg = self.cfg
        advantages = group_advantages(rewards.total, cfg.group_size, leave_one_out=cfg.leave_one_out,
                                      normalize_std=cfg.normalize_std)  # fmt: skip
        keep = keep_sequences(rewards.total, cfg.group_size, cfg.loss)
        lr = self.lr_schedulers().get_last_lr()[0]
        update = policy_update(self.policy, self.reference, self.optimizers(), roll, advantages, keep, cfg,
                               pad_id=self.pad_id, backward=self.manual_backward)  # fmt: skip
        with warnings.catch_warnings():  # a step without an update (all groups dropped) is expected
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step")
            self.lr_schedulers().step()
        self.step_count += 1
        row = {"step": self.step_count, "lr": lr, **rollout_metrics(roll, rewards, cfg), **update,
               "prompt_pass_rate": self.sampler.mean_pass_rate(ids), "levels": self.sampler.batch_composition(ids),
               "batch": hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]}  # fmt: skip
        self.finish_step(row, t0)

    def sample(self, step: int) -> tuple[list[str], Rollout, Rewards]:
        """Step `step`'s prompts (from the sampler), modes and completions (seeded by (seed, step)), scored."""
        cfg = self.cfg
        ids = self.sampler.next_batch()
        self.last_batch = list(ids)
        problems = [self.problems[i] for i in ids]
        thinking = choose_modes(len(problems), cfg.off_fraction, cfg.seed, step)
        roll = rollout(self.policy, self.tok, problems, thinking, cfg, _seed_for(cfg.seed, "rollout", step))
        return ids, roll, score_rollout(roll, self.rewarder, cfg)

    def finish_step(self, row: dict, t0: float) -> None:
        """Held-out evaluation when due, metrics files, checkpoint and plot when due."""
        last = self.step_count == self.cfg.steps
        if self.eval_problems and ((self.cfg.eval_every and self.step_count % self.cfg.eval_every == 0) or last):
            self.eval_history.append({"step": self.step_count, **self.evaluate()})
            row["eval_accuracy"] = self.eval_history[-1]["accuracy"]
        row["time_s"] = time.perf_counter() - t0
        self.history.append(row)
        write_metrics(self.history, self.paths.metrics_csv, self.paths.metrics_jsonl)
        if self.step_count % self.cfg.ckpt_every == 0 or last:
            self.save()
            self.write_plot()

    # -- evaluation and checkpoints

    def evaluate(self) -> dict:
        return heldout_accuracy(self.policy, self.tok, self.eval_problems, self.cfg.max_new_tokens, task=self.cfg.rewards.task)

    def write_plot(self):
        from .plots import plot_grpo

        plot_grpo(self.history, self.eval_history, self.paths.plot)

    def save(self):
        extra = {
            "history": self.history,
            "eval_history": self.eval_history,
            "config": asdict(self.cfg),
            "sampler": self.sampler.state_dict(),
        }
        save_training_state(
            self.paths.checkpoints, self.step_count, self.policy, self.optimizers(), self.lr_schedulers(),
            extra, keep_last=self.cfg.keep_last,
        )  # fmt: skip


# ----------------------------------------------------------------------------- entry point


def _check_resumable(state: TrainingState, cfg: GRPOConfig) -> None:
    """Warn when a resumed run's settings would not continue the checkpointed run."""
    saved, now = state.extra.get("config", {}), json.loads(json.dumps(asdict(cfg)))
    changed = [k for k in _RUN_DEFINING if k in saved and saved[k] != now[k]]
    if changed:
        log.warning("resuming %s with changed %s: the run will not match an uninterrupted one", state.path, changed)


def run_grpo(
    policy,
    tokenizer: ChatTokenizer,
    problems: Sequence[Problem] | Mapping[str, Problem],
    pass_rates: Mapping[str, float],
    cfg: GRPOConfig,
    out_dir: str | Path,
    *,
    eval_problems: Sequence[Problem] = (),
    reference=None,
    rewarder: RuleScorer | None = None,
    initial_eval: Mapping | None = None,
    progress: bool = False,
    callbacks: Sequence[L.Callback] = (),
) -> dict:
    """Train `policy` in place by GRPO for `cfg.steps` steps (resuming from the newest checkpoint
    in `out_dir/checkpoints` if there is one) and return a summary (steps, start step, history,
    held-out evaluations, paths).

    problems: the prompt pool as {problem_id: Problem} (or a list, ids from `curriculum.problem_id`);
    only the ids in `pass_rates` are sampled, so pass `filter_by_pass_rate(...).kept` rates here.
    reference: the frozen model for the KL (default: a copy of `policy` as given, i.e. before any
    resume, so it is the run's starting point); not kept when kl_beta = 0 and log_ref_kl is off.
    eval_problems: held-out problems for greedy accuracy (thinking on) every `eval_every` steps
    and at the end (at most `cfg.eval_problems` of them).
    rewarder: a `scoring.RuleScorer` to share between runs (`cfg.rewards.scorer()`; the caller
    closes it); default: one for this call, closed at the end.
    initial_eval: the starting model's held-out result (`heldout_accuracy`), recorded as step 0
    of a fresh run's evaluations; without it, a run with eval_every > 0 measures it itself.
    """
    from ..data.curriculum import problems_by_id

    by_id = dict(problems) if isinstance(problems, Mapping) else problems_by_id(problems)
    missing = [i for i in pass_rates if i not in by_id]
    if missing:
        raise ValueError(f"pass_rates: {len(missing)} ids are not among the problems (first: {missing[0]!r})")
    paths = _Paths(Path(out_dir))
    if cfg.needs_reference and reference is None:
        reference = copy.deepcopy(policy)
    if not cfg.needs_reference:
        reference = None
    sampler = make_sampler({i: pass_rates[i] for i in pass_rates}, cfg)
    resume = resume_latest(paths.checkpoints, policy, "grpo")
    if resume is not None:
        _check_resumable(resume, cfg)
        sampler.load_state_dict(resume.extra["sampler"])
    else:
        L.seed_everything(cfg.seed, verbose=False)
    start = resume.step if resume is not None else 0
    held_out = list(eval_problems)[: cfg.eval_problems]
    module = GRPOModule(policy, reference, tokenizer, by_id, sampler, cfg, paths, resume, held_out)
    if resume is None and held_out and (initial_eval is not None or cfg.eval_every):
        module.eval_history = [{"step": 0, **(initial_eval if initial_eval is not None else module.evaluate())}]
    if start < cfg.steps:
        want = (cfg.rewards.reward_config(), cfg.rewards.limits())
        if rewarder is not None and (rewarder.config, rewarder.limits) != want:
            raise ValueError(f"rewarder {rewarder.config}, {rewarder.limits} differs from grpo.rewards {cfg.rewards}")
        own = rewarder is None
        module.rewarder = rewarder or cfg.rewards.scorer()
        try:
            _fit(module, cfg, start, progress, callbacks)
        finally:
            if own:
                module.rewarder.close()
    policy.eval()
    return _summary(module, paths, start)


def _fit(module: GRPOModule, cfg: GRPOConfig, start: int, progress: bool, callbacks) -> None:
    loader = DataLoader(list(range(start, cfg.steps)), batch_size=None, shuffle=False, collate_fn=lambda step: step)
    trainer = fit_module(
        module, loader, callbacks=list(callbacks),
        accelerator="auto", devices=1, precision=resolve_precision(cfg.precision), max_epochs=1, max_steps=-1,
        logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
        num_sanity_val_steps=0, use_distributed_sampler=False,
    )  # fmt: skip
    stop_if_terminated(trainer, "grpo")


def _summary(module: GRPOModule, paths: _Paths, start: int) -> dict:
    if module.history and not paths.plot.is_file():
        module.write_plot()
    last = latest(paths.checkpoints)
    summary = {
        "steps": module.step_count,
        "start_step": start,
        "history": module.history,
        "eval_history": module.eval_history,
        "final_eval": module.eval_history[-1] if module.eval_history else None,
        "metrics_csv": str(paths.metrics_csv),
        "metrics_jsonl": str(paths.metrics_jsonl),
        "plot": str(paths.plot),
        "checkpoint_dir": str(paths.checkpoints),
        "last_checkpoint": str(last) if last is not None else None,
    }
    write_json_atomic(paths.summary, summary)
    return summary
