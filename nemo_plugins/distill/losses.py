"""Recovery-distillation losses, token level, over a mask of counted positions.

Alignment: the logits (and final hidden state) at position t predict token t+1. KD and the
hidden-state cosine compare teacher and student at the *same* positions, and the positions
counted are those whose NEXT token is counted by the data's `loss_mask` (`next_token_mask`).
That is exactly the set `causal_lm_loss` counts (it shifts the targets left by one), so the
KD, cosine and LM terms are means over the same tokens and can be summed and accumulated
with one normalizer.

All reductions run in at least fp32 (bf16/fp16 inputs are upcast; fp64 stays fp64, which
lets `torch.autograd.gradcheck` check them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.llama import causal_lm_loss

MODES = ("kd", "cpt")


def next_token_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: positions whose next token is counted by `loss_mask` (the last position
    predicts nothing). The positions `causal_lm_loss` averages over."""
    return F.pad(loss_mask[:, 1:].bool(), (0, 1), value=False)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _reduce(per_token: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / max(per_token.numel(), 1)
    raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'sum'")


def kd_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(teacher || student) of softmax(logits / T), times T² (Hinton: keeps gradient
    magnitudes comparable across temperatures), averaged over the positions `mask` [B, T]
    selects. Masked-out positions are never computed, so padding cannot leak in."""
    keep = mask.bool()
    s = _upcast(student_logits[keep]) / temperature  # [N, V]
    t = _upcast(teacher_logits[keep]).to(s.dtype) / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    return _reduce(kl, reduction) * temperature**2


def hidden_cosine_loss(
    student_h: torch.Tensor, teacher_h: torch.Tensor, mask: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """1 − cos(student, teacher) of hidden states [B, T, H], averaged over `mask` [B, T]."""
    keep = mask.bool()
    s = _upcast(student_h[keep])
    t = _upcast(teacher_h[keep]).to(s.dtype)
    return _reduce(1 - F.cosine_similarity(s, t, dim=-1), reduction)


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
