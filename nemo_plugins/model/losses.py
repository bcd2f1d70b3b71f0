"""Token-level losses over a mask of counted positions, shared by recovery, SFT and RL.

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

import torch
import torch.nn.functional as F


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
