"""GRPO (Llama-Nemotron, arXiv 2505.00949 §5; DAPO, arXiv 2503.14476; NeMo-RL conventions) on
the shared RL loop (`rl.loop`): its config, how it prepares a scored rollout, and its loss.

A GRPO step, as the loop runs it:

1. **Prompts.** `prompts_per_step` problem ids from the prompt sampler over the (pass-rate
   filtered) pool: `CurriculumSampler` (progressive batching, easy -> hard) or `RandomSampler`
   (`curriculum.kind`). Each prompt is rendered under "detailed thinking on" by default, and
   exactly round(`off_fraction` x prompts_per_step) prompts, chosen at random per step, under
   "detailed thinking off", so the format reward (strict tiny-world layout of the mode) is
   trained for both modes. All G completions of a prompt share its mode.
2. **Rollout.** G = `group_size` completions per prompt from the rollout engine (`model.rollout`).
3. **Rewards.** Through the reward protocol (`scoring.RuleScorer`: exact answer + strict format,
   weighted, in the sandboxed reward pool; a failed sample scores 0 and is counted by reason),
   plus DAPO's soft overlong penalty on the response length.
4. **Prepare** (here, `GRPO.prepare`). Group-relative advantages (`group_advantages`: group mean
   or leave-one-out baseline, optionally ÷ std). Groups whose rewards are all equal carry no
   signal; with `loss.drop_zero_variance` they are dropped and the step trains on the remaining
   groups only (nothing refills the batch: this is not DAPO's dynamic sampling, which samples
   more prompts until the batch is full of groups with signal).
5. **Update.** `updates_per_rollout` optimizer steps over the whole batch of kept sequences
   (`rl.update`) through the clipped loss (`grpo_loss.GRPOLoss`), which adds kl_beta·k3 KL to a
   frozen reference (the starting weights) when `loss.kl_beta > 0`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch

from ..data.chat_tokenizer import ChatTokenizer
from ..data.reasoning_world import Problem
from .config import LoopConfig
from .experience import Rewards, Rollout
from .grpo_loss import GRPOLoss, GRPOLossConfig, group_advantages, keep_sequences, zero_variance_groups
from .loop import Prepared, run_loop
from .scoring import RuleScorer
from .update import apply_updates, train_batches


@dataclass
class LossConfig(GRPOLossConfig):
    """`GRPOLossConfig` whose errors name `grpo.loss.<field>` (it is the `loss:` section)."""

    def __post_init__(self):
        try:
            super().__post_init__()
        except ValueError as e:
            raise ValueError(f"grpo.loss.{e}") from None


@dataclass
class GRPOConfig(LoopConfig):
    """Settings of one GRPO run: the loop's (`config.LoopConfig`) plus the advantages'
    (`leave_one_out`: baseline = mean of the other G−1 rewards instead of the group mean;
    `normalize_std`: ÷ the group's std) and the loss's (`loss`: clip range, the KL weight to the
    frozen reference `kl_beta`, aggregation, dropping zero-variance groups)."""

    run_defining: ClassVar[tuple[str, ...]] = (*LoopConfig.run_defining, "loss", "leave_one_out", "normalize_std")

    leave_one_out: bool = False
    normalize_std: bool = True
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self):
        if isinstance(self.loss, Mapping):
            self.loss = LossConfig(**self.loss)
        elif type(self.loss) is GRPOLossConfig:
            self.loss = LossConfig(**asdict(self.loss))
        super().__post_init__()

    @property
    def needs_reference(self) -> bool:
        return self.loss.kl_beta > 0 or self.log_ref_kl


@dataclass
class GRPO:
    """GRPO's parts for the loop: group-relative advantages, zero-variance groups dropped, the clipped loss."""

    cfg: GRPOConfig
    name: str = "grpo"

    @property
    def loss(self) -> GRPOLoss:
        return GRPOLoss(self.cfg.loss)

    def prepare(self, roll: Rollout, rewards: Rewards) -> Prepared:
        cfg = self.cfg
        advantages = group_advantages(rewards.total, cfg.group_size, leave_one_out=cfg.leave_one_out,
                                      normalize_std=cfg.normalize_std)  # fmt: skip
        keep = keep_sequences(rewards.total, cfg.group_size, cfg.loss)
        dropped = int(zero_variance_groups(rewards.total, cfg.group_size).sum()) if cfg.loss.drop_zero_variance else 0
        return Prepared(advantages, keep, {"groups_dropped": dropped})


def policy_update(
    policy, reference, optimizer, roll: Rollout, advantages: torch.Tensor, keep: torch.Tensor, cfg: GRPOConfig,
    *, pad_id: int = 0, backward=None,
) -> dict:  # fmt: skip
    """GRPO's update outside the loop (the loop's step 5 on given advantages): `cfg.updates_per_rollout`
    optimizer steps over the kept sequences of `roll`; returns the loss metrics (`update.apply_updates`)."""
    batches = train_batches(policy, reference, roll, advantages, keep, cfg, pad_id)
    return apply_updates(policy, optimizer, batches, GRPOLoss(cfg.loss), cfg, backward)


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
    held-out evaluations, paths; see `loop.run_loop`).

    problems: the prompt pool as {problem_id: Problem} (or a list, ids from `curriculum.problem_id`);
    only the ids in `pass_rates` are sampled, so pass `filter_by_pass_rate(...).kept` rates here.
    reference: the frozen model for the KL (default: a copy of `policy` as given, the run's start).
    eval_problems: held-out problems for greedy accuracy (thinking on) every `eval_every` steps
    and at the end (at most `cfg.eval_problems` of them).
    rewarder: a `scoring.RuleScorer` to share between runs (`cfg.rewards.scorer()`; the caller
    closes it); default: one for this call, closed at the end.
    initial_eval: the starting model's held-out result (`metrics.heldout_accuracy`).
    """
    from ..data.curriculum import problems_by_id

    by_id = dict(problems) if isinstance(problems, Mapping) else problems_by_id(problems)
    return run_loop(policy, tokenizer, by_id, pass_rates, cfg, GRPO(cfg), out_dir, eval_problems=eval_problems,
                    reference=reference, scorer=rewarder, initial_eval=initial_eval, progress=progress,
                    callbacks=callbacks)  # fmt: skip
