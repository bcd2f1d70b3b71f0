"""Pairwise preference losses in plain torch: RPO's three (Nemotron-4 340B, arXiv 2406.11704;
NeMo-Aligner's `rpo_bwd_kl`, `rpo_fwd_kl`, `rpo_sq`) and DPO (arXiv 2305.18290), as
`preference_loss`, and the same behind the `policy_loss.PolicyLoss` protocol (`PreferenceLoss`).

With per-sequence summed response log-probs of the policy and the frozen reference:

    Δπ = β·[(log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)]
    Δr = η·(r_chosen − r_rejected)          (the reward model's scores)
    p̂ = σ(Δπ),  p* = σ(Δr)

    rpo_bwd_kl = KL(Bern p* ‖ Bern p̂)  = p*·(log p* − log p̂) + (1 − p*)·(log(1 − p*) − log(1 − p̂))
    rpo_fwd_kl = KL(Bern p̂ ‖ Bern p*)  (the same with the roles swapped)
    rpo_sq     = (Δπ − Δr)²
    dpo        = −log σ(Δπ)             (ignores the rewards: only which response is chosen)

The RPO losses pull the policy's implicit reward margin towards the reward model's margin, so a
pair whose responses the reward model barely tells apart moves the policy little (DPO pushes every
pair apart alike). `PreferenceLoss` can add α × the chosen response's token-mean negative
log-likelihood per pair (α = `sft_loss_weight`, NeMo-Aligner's DPO `sft_loss_weight`, TRL's
`rpo_alpha`): preference losses only move the margin, and can lower the chosen response's
likelihood along with the rejected one's. Every log-probability is a `logsigmoid`
(log(1 − σ(x)) = logsigmoid(−x)), so no |Δ| overflows or takes log(0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .policy_loss import TrainBatch, upcast

LOSS_KINDS = ("rpo_bwd_kl", "rpo_fwd_kl", "rpo_sq", "dpo")


def _bernoulli_kl(logit_p: torch.Tensor, logit_q: torch.Tensor) -> torch.Tensor:
    """KL(Bern σ(logit_p) ‖ Bern σ(logit_q)), elementwise, from logits (stable for any size)."""
    log_p, log_not_p = F.logsigmoid(logit_p), F.logsigmoid(-logit_p)
    log_q, log_not_q = F.logsigmoid(logit_q), F.logsigmoid(-logit_q)
    return log_p.exp() * (log_p - log_q) + log_not_p.exp() * (log_not_p - log_not_q)


def preference_loss(
    kind: str,
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    reward_chosen: torch.Tensor,
    reward_rejected: torch.Tensor,
    beta: float,
    eta: float,
) -> torch.Tensor:
    """Per-pair loss [P] of `kind` (one of LOSS_KINDS; the caller averages). The *_logp are
    per-sequence summed response log-probs [P]; the rewards [P] are the reward model's scores."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"preference loss kind={kind!r}: expected one of {', '.join(LOSS_KINDS)}")
    delta_pi = beta * (
        (upcast(policy_chosen_logp) - upcast(ref_chosen_logp)) - (upcast(policy_rejected_logp) - upcast(ref_rejected_logp))
    )
    if kind == "dpo":
        return -F.logsigmoid(delta_pi)
    delta_r = (eta * (upcast(reward_chosen) - upcast(reward_rejected))).to(delta_pi.dtype)
    if kind == "rpo_sq":
        return (delta_pi - delta_r) ** 2
    if kind == "rpo_bwd_kl":
        return _bernoulli_kl(delta_r, delta_pi)
    return _bernoulli_kl(delta_pi, delta_r)


def sequence_logp(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] sum of the token log-probs [B, T] over the mask (masked values, even inf/NaN, ignored)."""
    lp = upcast(token_logp)
    return torch.where(mask.bool(), lp, lp.new_zeros(())).sum(dim=1)


@dataclass(frozen=True)
class PreferenceLoss:
    """`preference_loss` of `kind` as a `PolicyLoss`. A micro-batch holds whole pairs, each laid
    out as two consecutive rows (chosen, then rejected) with the same `pair_index`; it brings the
    reference's log-probs (`ref_logp`) and each sequence's reward (`rewards`). The loss is the
    sum of its per-pair losses ÷ the step's pairs (global_sequences / 2), so micro-batches add up to
    the full-batch mean. `sft_loss_weight` α adds α × the chosen row's token-mean NLL per pair.
    Metrics (already ÷ the step's pairs): the policy's implicit margin Δπ, the reward margin Δr,
    the share of pairs with Δπ > 0, and with α > 0 the chosen rows' NLL (`sft_loss`)."""

    kind: str
    beta: float
    eta: float
    sft_loss_weight: float = 0.0

    def __call__(self, logp: torch.Tensor, batch: TrainBatch, global_tokens: int, global_sequences: int):
        if batch.pair_index is None or batch.ref_logp is None or batch.rewards is None:
            raise ValueError("PreferenceLoss: the batch needs pair_index, ref_logp and rewards")
        pairs = batch.pair_index
        if len(pairs) % 2 or not torch.equal(pairs[0::2], pairs[1::2]):
            raise ValueError("PreferenceLoss: expected each pair as two consecutive rows (chosen, rejected)")
        seq, ref = sequence_logp(logp, batch.mask), sequence_logp(batch.ref_logp, batch.mask)
        r = batch.rewards
        per_pair = preference_loss(self.kind, seq[0::2], seq[1::2], ref[0::2], ref[1::2], r[0::2], r[1::2],
                                   self.beta, self.eta)  # fmt: skip
        n_pairs = max(global_sequences, 1) / 2
        if self.sft_loss_weight:
            nll = -seq[0::2] / batch.mask[0::2].bool().sum(dim=1).clamp(min=1)  # chosen rows, per token
            per_pair = per_pair + self.sft_loss_weight * nll
        with torch.no_grad():
            delta_pi = self.beta * ((seq[0::2] - ref[0::2]) - (seq[1::2] - ref[1::2]))
            delta_r = self.eta * (upcast(r[0::2]) - upcast(r[1::2]))
        metrics = {
            "loss": per_pair.sum().detach() / n_pairs,
            "pref_margin": delta_pi.sum() / n_pairs,
            "reward_margin": delta_r.sum() / n_pairs,
            "pref_accuracy": (delta_pi > 0).float().sum() / n_pairs,
            "tokens": batch.mask.bool().sum(),
        }
        if self.sft_loss_weight:
            metrics["sft_loss"] = nll.detach().sum() / n_pairs
        return per_pair.sum() / n_pairs, metrics
