"""The recovery objective: KD-KL + hidden cosine + LM loss against a frozen teacher, or the plain
LM loss (continued pre-training), built from the token losses in `model.losses`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..model.llama import causal_lm_loss
from ..model.losses import hidden_cosine_loss, kd_kl_loss, next_token_mask

MODES = ("kd", "cpt")


@dataclass
class RecoveryLossConfig:
    """`kd`: weighted KD-KL + hidden cosine + LM loss against a frozen teacher.
    `cpt`: continued pre-training, the plain LM loss on the data; no teacher, weights unused."""

    mode: str = "kd"
    kd_weight: float = 1.0
    temperature: float = 1.0
    cosine_weight: float = 0.0
    lm_weight: float = 0.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"recovery.loss.mode={self.mode!r}: expected one of {', '.join(MODES)}")
        for name in ("kd_weight", "cosine_weight", "lm_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"recovery.loss.{name}={value}: expected a finite number >= 0")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"recovery.loss.temperature={self.temperature}: expected a finite number > 0")
        if self.mode == "kd" and self.kd_weight == self.cosine_weight == self.lm_weight == 0:
            raise ValueError(
                "recovery.loss.kd_weight=0, cosine_weight=0, lm_weight=0: all weights are zero, nothing to train "
                "(set one > 0, or mode=cpt for the plain LM loss)"
            )

    @property
    def needs_teacher(self) -> bool:
        return self.mode == "kd" and (self.kd_weight > 0 or self.cosine_weight > 0)


def recovery_loss(
    cfg: RecoveryLossConfig,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    student_logits: torch.Tensor,
    student_h: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    teacher_h: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, {term: value}) with every term reduced over the same `next_token_mask` positions;
    `reduction="sum"` gives token sums, so micro-batches can be normalized by a whole step's count."""
    mask = next_token_mask(loss_mask)
    count = mask.sum()
    parts: dict[str, torch.Tensor] = {}
    if cfg.mode == "cpt" or cfg.lm_weight > 0:
        lm = causal_lm_loss(student_logits, input_ids, loss_mask)  # mean over `mask`
        parts["lm"] = lm * count if reduction == "sum" else lm
    if cfg.mode == "cpt":
        return parts["lm"], parts
    if cfg.kd_weight > 0:
        parts["kd"] = kd_kl_loss(student_logits, teacher_logits, mask, cfg.temperature, reduction=reduction)
    if cfg.cosine_weight > 0:
        parts["cosine"] = hidden_cosine_loss(student_h, teacher_h, mask, reduction=reduction)
    weights = {"kd": cfg.kd_weight, "cosine": cfg.cosine_weight, "lm": cfg.lm_weight}
    total = sum(weights[k] * v for k, v in parts.items())
    return total, parts
