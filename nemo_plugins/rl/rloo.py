"""RLOO (REINFORCE Leave-One-Out; Ahmadian et al. 2024; Llama-Nemotron's instruction-following
stage, arXiv 2505.00949 §6, REFERENCE §6) on the shared RL loop (`rl.loop`): its config, how it
prepares a scored rollout, and its loss.

A step, as the loop runs it: `prompts_per_step` instruction-augmented prompts
(`data.instructions`), k = `group_size` samples each; rewards through
`scoring.InstructionScorer` (instruction followed x `instruction_weight` + the task's rule
reward, accuracy x `rewards.accuracy_weight` + format x `rewards.format_weight`, plus the
overlong penalty); advantages r_i − b_i with the leave-one-out baseline b_i (`rloo_loss`); one
on-policy update of −log π·(r − b) + kl_beta·KL(π ‖ π_ref), the KL as a loss term to the frozen
starting weights (why a loss term and not Aligner's reward-side penalty: `rloo_loss`).

Every sequence is trained on (a group with equal rewards has advantage 0 everywhere, so it adds
only its KL term). RLOO is on-policy REINFORCE: `updates_per_rollout` must be 1.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch

from ..data.chat_tokenizer import ChatTokenizer
from ..data.curriculum import problems_by_id
from .config import LoopConfig, SamplerSettings
from .experience import Rewards, Rollout
from .loop import Prepared, run_loop
from .rloo_loss import RLOOLoss, RLOOLossConfig, rloo_advantages
from .scoring import InstructionScorer


def _renamed(error: ValueError, section: str = "rloo") -> ValueError:
    """The shared loop settings name their key `grpo.<key>`; in this section it is `rloo.<key>`."""
    text = re.sub(r"^grpo\.", f"{section}.", str(error))
    return ValueError(text if text.startswith(f"{section}.") else f"{section}.{text}")


@dataclass
class RLOOSamplerSettings(SamplerSettings):
    """`SamplerSettings` in random order by default (its errors are renamed with the section's)."""

    kind: str = "random"


@dataclass
class RLOOLossSettings(RLOOLossConfig):
    """`RLOOLossConfig` whose errors name `rloo.loss.<field>`."""

    def __post_init__(self):
        try:
            super().__post_init__()
        except ValueError as e:
            raise ValueError(f"rloo.loss.{e}") from None


@dataclass
class RLOOConfig(LoopConfig):
    """One RLOO run: the loop's settings (`config.LoopConfig`; prompts in random order by
    default, there are no pass rates to order them by), `instruction_weight` (reward for a
    followed instruction; the task reward's weights are `rewards.*`) and `loss` (kl_beta,
    aggregation). Errors name `rloo.<key>`."""

    run_defining: ClassVar[tuple[str, ...]] = (*LoopConfig.run_defining, "loss", "instruction_weight")

    instruction_weight: float = 1.0
    loss: RLOOLossSettings = field(default_factory=RLOOLossSettings)
    curriculum: RLOOSamplerSettings = field(default_factory=RLOOSamplerSettings)

    def __post_init__(self):
        if isinstance(self.loss, Mapping):
            self.loss = RLOOLossSettings(**self.loss)
        elif type(self.loss) is RLOOLossConfig:
            self.loss = RLOOLossSettings(**asdict(self.loss))
        try:
            if isinstance(self.curriculum, Mapping):
                self.curriculum = RLOOSamplerSettings(**self.curriculum)
            super().__post_init__()
        except ValueError as e:
            raise _renamed(e) from None
        w = self.instruction_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w >= 0) or w == float("inf"):
            raise ValueError(f"rloo.instruction_weight={w!r}: expected a finite number >= 0")
        if self.updates_per_rollout != 1:
            raise ValueError(f"rloo.updates_per_rollout={self.updates_per_rollout!r}: expected 1 "
                             "(RLOO is on-policy REINFORCE: one update per rollout)")  # fmt: skip

    @property
    def needs_reference(self) -> bool:
        return self.loss.kl_beta > 0 or self.log_ref_kl

    def scorer(self) -> InstructionScorer:
        """The reward these settings describe (close it, or use it as a context manager)."""
        return InstructionScorer(self.rewards.scorer(), self.instruction_weight)


@dataclass
class RLOO:
    """RLOO's parts for the loop: leave-one-out advantages on every sequence, the REINFORCE loss."""

    cfg: RLOOConfig
    name: str = "rloo"

    @property
    def loss(self) -> RLOOLoss:
        return RLOOLoss(self.cfg.loss)

    def prepare(self, roll: Rollout, rewards: Rewards) -> Prepared:
        advantages = rloo_advantages(rewards.total, self.cfg.group_size)
        keep = torch.ones_like(rewards.total, dtype=torch.bool)
        metrics = {}
        if "instruction" in rewards.parts:
            metrics["instruction_rate"] = float(rewards.parts["instruction"].mean())
        return Prepared(advantages, keep, metrics)


def run_rloo(
    policy,
    tokenizer: ChatTokenizer,
    problems: Sequence | Mapping,
    cfg: RLOOConfig,
    out_dir: str | Path,
    *,
    reference=None,
    scorer: InstructionScorer | None = None,
    progress: bool = False,
    callbacks: Sequence[L.Callback] = (),
) -> dict:
    """Train `policy` in place by RLOO for `cfg.steps` steps on instruction-augmented `problems`
    (`data.instructions.InstructedProblem`s, a list or {problem_id: problem}), resuming from the
    newest checkpoint in `out_dir/checkpoints`; return the loop's summary (`loop.run_loop`).

    reference: the frozen model of the KL term (default: a copy of `policy` as given).
    scorer: an `InstructionScorer` to share (the caller closes it); default: `cfg.scorer()` for
    this call, closed at the end. Held-out evaluation is the stage's (`rloo_stage`), not the loop's.
    """
    by_id = dict(problems) if isinstance(problems, Mapping) else problems_by_id(problems)
    missing = [i for i, p in by_id.items() if getattr(p, "instruction", None) is None]
    if missing:
        raise ValueError(f"problem {missing[0]}: no instruction (RLOO trains on data.instructions.augment_all's problems)")
    own = scorer is None
    scorer = scorer or cfg.scorer()
    try:
        return run_loop(policy, tokenizer, by_id, dict.fromkeys(by_id, 0.0), cfg, RLOO(cfg), out_dir,
                        reference=reference, scorer=scorer, progress=progress, callbacks=callbacks)  # fmt: skip
    finally:
        if own:
            scorer.close()
