"""RLOO math in plain torch: the leave-one-out baseline and the REINFORCE loss with a KL term to
the reference (Ahmadian et al. 2024, "Back to Basics"; NeMo-Aligner's RLOO; REFERENCE §6).

For k samples of one prompt with rewards r_1..r_k, b_i = (Σ_j r_j − r_i)/(k − 1), the mean of
the other k − 1 rewards, and the advantage is r_i − b_i (no division by a std: RLOO's estimator
stays unbiased). The policy loss is −log π(y_i|x)·(r_i − b_i): with aggregation "sequence",
log π(y|x) = Σ_t log π(y_t|…) over the response tokens and the loss is the mean over sequences
(REINFORCE exactly); with "token", every token's −log π·A is averaged over the step's tokens.

KL to the reference, as a loss term: + kl_beta · KL, KL per sequence the masked mean over its
response tokens of k3 = e^d − d − 1 (d = log π_ref − log π; ≥ 0, Schulman's low-variance
estimator), then the mean over sequences ("sequence") or over all tokens ("token").
NeMo-Aligner subtracts β·(masked mean of log π − log π_ref) from the reward instead; the loss
term is used here because (1) it gives the KL its own low-variance gradient instead of folding
it into the score-function estimate, whose variance grows with it, (2) it needs no extra forward
pass before the advantages (the loop's update already carries the reference's log-probs), and
(3) the KL is then a term of the logged loss, so its weight's effect is directly visible.

Alignment and masking as in `policy_loss` / `grpo_loss`: masked positions are zeroed before any
arithmetic, everything reduces in at least fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .grpo_loss import _grouped, kl_k3
from .policy_loss import TrainBatch, upcast

AGGREGATIONS = ("sequence", "token")


def leave_one_out_baseline(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """b_i = mean of the other k − 1 rewards of i's group; same shape as `rewards` ([N*k] with
    groups contiguous, or [N, k])."""
    r = _grouped(rewards, k)
    return ((r.sum(dim=1, keepdim=True) - r) / (k - 1)).reshape(rewards.shape)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """r_i − b_i (leave-one-out baseline), same shape as `rewards`; exactly 0 in all-equal groups."""
    return upcast(rewards) - leave_one_out_baseline(rewards, k)


@dataclass
class RLOOLossConfig:
    """kl_beta: weight of the KL term to the frozen reference (0: no reference needed);
    aggregation: "sequence" (−A·Σ_t log π per sequence, mean over sequences: REINFORCE on the
    sequence's log-prob) or "token" (mean over all response tokens of the step)."""

    kl_beta: float = 0.05
    aggregation: str = "sequence"

    def __post_init__(self):
        if isinstance(self.kl_beta, bool) or not (isinstance(self.kl_beta, (int, float)) and self.kl_beta >= 0
                                                  and math.isfinite(self.kl_beta)):  # fmt: skip
            raise ValueError(f"kl_beta={self.kl_beta!r}: expected a finite number >= 0")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r}: expected one of {', '.join(AGGREGATIONS)}")


def rloo_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: RLOOLossConfig,
    global_tokens: int | None = None,
    global_sequences: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics) over the positions `mask` [B, T] selects (see the module docstring).

    Normalizers default to this batch's counts; pass the step's totals so micro-batch losses sum
    to the full-batch loss. Metrics (detached): loss, pg_loss, kl_loss (the unweighted KL term),
    kl_ref (k3 per token, when a reference is given), tokens.
    """
    m = mask.bool()
    if logp.shape != m.shape:
        raise ValueError(f"logp shape {tuple(logp.shape)} != mask shape {tuple(m.shape)}")
    if advantages.shape != (m.shape[0],):
        raise ValueError(f"advantages shape {tuple(advantages.shape)}: expected [{m.shape[0]}] (one per sequence)")
    if cfg.kl_beta > 0 and ref_logp is None:
        raise ValueError(f"ref_logp is None but kl_beta={cfg.kl_beta} > 0: the KL term needs reference log-probs")

    def zero(x: torch.Tensor) -> torch.Tensor:
        x = upcast(x)
        return torch.where(m, x, x.new_zeros(()))

    lp = zero(logp)
    adv = upcast(advantages.detach()).to(lp.dtype)[:, None]
    lengths = m.sum(dim=1)
    n_tok = global_tokens if global_tokens is not None else m.sum().clamp_min(1)
    n_seq = global_sequences if global_sequences is not None else (lengths > 0).sum().clamp_min(1)
    pg_tok = -adv * lp * m
    pg = pg_tok.sum() / (n_seq if cfg.aggregation == "sequence" else n_tok)

    kl_tok = kl_k3(lp, zero(ref_logp.detach())) * m if ref_logp is not None else None
    if cfg.kl_beta > 0:
        if cfg.aggregation == "sequence":
            kl = (kl_tok.sum(dim=1) / lengths.clamp_min(1)).sum() / n_seq
        else:
            kl = kl_tok.sum() / n_tok
    else:
        kl = pg.new_zeros(())
    loss = pg + cfg.kl_beta * kl
    with torch.no_grad():
        metrics = {"loss": loss.detach(), "pg_loss": pg.detach(), "kl_loss": kl.detach(), "tokens": m.sum()}
        if kl_tok is not None:
            metrics["kl_ref"] = kl_tok.sum() / m.sum().clamp_min(1)
    return loss, metrics


@dataclass
class RLOOLoss:
    """`rloo_loss` as a `policy_loss.PolicyLoss` (on-policy: the batch's old_logp is not used)."""

    cfg: RLOOLossConfig

    def __call__(self, logp: torch.Tensor, batch: TrainBatch, global_tokens: int, global_sequences: int):
        return rloo_loss(logp, batch.ref_logp, batch.advantages, batch.mask, self.cfg, global_tokens, global_sequences)
