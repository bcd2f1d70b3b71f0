"""GRPO math in plain torch: group-relative advantages, the clipped policy loss with a k3 KL
penalty (`grpo_loss`, and `GRPOLoss`, the same loss behind the `policy_loss.PolicyLoss`
protocol), and DAPO's soft overlong penalty (Llama-Nemotron, arXiv 2505.00949 §5; DAPO,
arXiv 2503.14476; NeMo-RL conventions).

Log-probs and masks are aligned as in `policy_loss` (the mask is over predicting positions).
Everything reduces in at least fp32 (bf16/fp16 are upcast; fp64 stays fp64). Masked positions
are replaced by zeros *before* any arithmetic, so their values (even inf/NaN) change neither the
loss nor the gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .policy_loss import TrainBatch, upcast

AGGREGATIONS = ("token", "sequence")


# --------------------------------------------------------------------------- advantages


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, G] view of rewards given as [N*G] (groups contiguous) or [N, G]."""
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: expected >= 2 (a group needs a baseline)")
    r = upcast(rewards)
    if r.dim() == 1:
        if r.numel() % group_size:
            raise ValueError(f"group_size={group_size}: does not divide the {r.numel()} rewards")
        return r.view(-1, group_size)
    if r.dim() == 2 and r.shape[1] == group_size:
        return r
    shape = tuple(rewards.shape)
    raise ValueError(f"rewards shape {shape}: expected [N*{group_size}] or [N, {group_size}] (group_size)")


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] bool: groups whose rewards are all equal. They carry no learning signal (every
    advantage is 0). `keep_sequences` drops them; nothing refills the batch (DAPO's dynamic
    sampling would sample more prompts until it is full), so a step trains on fewer groups."""
    r = _grouped(rewards, group_size)
    return r.amax(dim=1) == r.amin(dim=1)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    eps: float = 1e-6,
    leave_one_out: bool = False,
    normalize_std: bool = True,
) -> torch.Tensor:
    """Group-relative advantages, same shape as `rewards` ([N*G] with groups contiguous, or [N, G]).

    Baseline: the group mean (GRPO), or with `leave_one_out` the mean of the other G−1 rewards
    (RLOO; equals G/(G−1)·(r_i − mean)). With `normalize_std` the centred reward is divided by
    (std + eps), std being the SAMPLE standard deviation of the whole group (Bessel-corrected,
    ÷(G−1), `torch.std`'s default, as in TRL and NeMo-RL). Zero-variance groups get exactly 0
    (otherwise rounding in the mean would be amplified by 1/eps).
    """
    if eps < 0:
        raise ValueError(f"eps={eps}: expected >= 0")
    r = _grouped(rewards, group_size)
    g = r.shape[1]
    mean = r.mean(dim=1, keepdim=True)
    if leave_one_out:
        baseline = (r.sum(dim=1, keepdim=True) - r) / (g - 1)
    else:
        baseline = mean
    adv = r - baseline
    if normalize_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    adv = adv.masked_fill(zero_variance_groups(r, g)[:, None], 0.0)
    return adv.reshape(rewards.shape)


# --------------------------------------------------------------------------- token quantities


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π || π_ref) from samples of π: e^d − d − 1, d = ref_logp − logp.
    Unbiased and always >= 0 (Schulman's "Approximating KL"); expm1 keeps it exact near d = 0."""
    d = upcast(ref_logp) - upcast(logp)
    return torch.expm1(d) - d


# --------------------------------------------------------------------------- loss


@dataclass
class GRPOLossConfig:
    """Clipped-surrogate GRPO loss.

    clip_low / clip_high: the ratio is clipped to [1 − clip_low, 1 + clip_high]. The default
    clip_high = 0.28 is DAPO's "clip-higher" (more room for low-probability tokens to grow, against
    entropy collapse); set 0.2 for the symmetric PPO/GRPO clip.
    kl_beta: weight of the k3 KL to the reference policy; 0 (DAPO / many reasoning-RL recipes drop
    it) means no reference model is needed; a small value (e.g. 1e-3) anchors the policy.
    aggregation: "token" — sum over all response tokens of the global batch ÷ their number
    (DAPO token-level mean; long responses weigh per token); "sequence" — mean per sequence,
    then mean over sequences (original GRPO).
    drop_zero_variance: drop the sequences of all-equal-reward groups (`keep_sequences`), so they
    do not dilute the normalizer; the batch is not refilled (no DAPO dynamic sampling).
    """

    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_beta: float = 0.0
    aggregation: str = "token"
    drop_zero_variance: bool = True

    def __post_init__(self):
        if not (0 <= self.clip_low < 1):
            raise ValueError(f"clip_low={self.clip_low}: expected 0 <= clip_low < 1")
        if not (self.clip_high >= 0 and math.isfinite(self.clip_high)):
            raise ValueError(f"clip_high={self.clip_high}: expected a finite number >= 0")
        if not (self.kl_beta >= 0 and math.isfinite(self.kl_beta)):
            raise ValueError(f"kl_beta={self.kl_beta}: expected a finite number >= 0")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r}: expected one of {', '.join(AGGREGATIONS)}")
        if not isinstance(self.drop_zero_variance, bool):
            raise ValueError(f"drop_zero_variance={self.drop_zero_variance!r}: expected true or false")


def keep_sequences(rewards: torch.Tensor, group_size: int, cfg: GRPOLossConfig) -> torch.Tensor:
    """[N*G] bool per sequence: False for sequences of zero-variance groups when
    `cfg.drop_zero_variance`, else all True. Pass it as `grpo_loss(..., keep=...)`."""
    zero = zero_variance_groups(rewards, group_size)
    keep = ~zero if cfg.drop_zero_variance else torch.ones_like(zero)
    return keep.repeat_interleave(group_size)


def loss_normalizers(mask: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[int, int]:
    """(tokens, sequences) counted by `grpo_loss` for this (micro-)batch; sum them over all
    micro-batches of a step to get `global_tokens` / `global_sequences`."""
    m = _effective_mask(mask, keep)
    return int(m.sum()), int(m.any(dim=1).sum())


def _effective_mask(mask: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    m = mask.bool()
    return m & keep.bool()[:, None] if keep is not None else m


def _aggregate(per_token: torch.Tensor, m: torch.Tensor, cfg: GRPOLossConfig, global_tokens, global_sequences):
    """Sum of per-token values ÷ token count (token) or mean of per-sequence means (sequence);
    per_token is already zero where `m` is False."""
    if cfg.aggregation == "token":
        denom = global_tokens if global_tokens is not None else m.sum().clamp_min(1)
        return per_token.sum() / denom
    lengths = m.sum(dim=1)
    per_seq = per_token.sum(dim=1) / lengths.clamp_min(1)
    denom = global_sequences if global_sequences is not None else (lengths > 0).sum().clamp_min(1)
    return per_seq.sum() / denom


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: GRPOLossConfig,
    global_tokens: int | torch.Tensor | None = None,
    *,
    keep: torch.Tensor | None = None,
    global_sequences: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics) of the clipped GRPO objective over the positions `mask` [B, T] selects.

    Per token: ρ = exp(logp − old_logp) and
    loss_t = max(−A·ρ, −A·clip(ρ, 1 − clip_low, 1 + clip_high)) + kl_beta·k3(logp, ref_logp),
    A = advantages[b] broadcast over the sequence. `old_logp=None` means on-policy (logp detached).
    `keep` [B] drops whole sequences (zero-variance groups). Normalizers default to this batch's
    counts; pass `global_tokens` ("token") or `global_sequences` ("sequence") — the step's totals
    (`loss_normalizers`) — so micro-batch losses sum to the full-batch loss.

    Metrics (detached, over this batch's counted tokens): clip_fraction (tokens where the clipped
    branch is active, i.e. strictly larger), approx_kl (k3 estimate of KL(π_old || π)),
    ratio_mean, kl_ref (k3 to the reference, when given), pg_loss, kl_loss, tokens.
    """
    m = _effective_mask(mask, keep)
    if logp.shape != m.shape:
        raise ValueError(f"logp shape {tuple(logp.shape)} != mask shape {tuple(m.shape)}")
    if advantages.shape != (m.shape[0],):
        raise ValueError(f"advantages shape {tuple(advantages.shape)}: expected [{m.shape[0]}] (one per sequence)")
    if cfg.kl_beta > 0 and ref_logp is None:
        raise ValueError(f"ref_logp is None but kl_beta={cfg.kl_beta} > 0: the KL term needs reference log-probs")

    def zero(x: torch.Tensor) -> torch.Tensor:  # masked values never enter the arithmetic
        x = upcast(x)
        return torch.where(m, x, x.new_zeros(()))

    lp = zero(logp)
    old = zero(old_logp.detach() if old_logp is not None else logp.detach())
    adv = upcast(advantages.detach()).to(lp.dtype)[:, None]

    ratio = torch.exp(lp - old)  # exactly 1 at masked positions
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    pg_tok = torch.maximum(unclipped, clipped) * m
    pg = _aggregate(pg_tok, m, cfg, global_tokens, global_sequences)

    kl_ref_tok = kl_k3(lp, zero(ref_logp.detach())) * m if ref_logp is not None else None
    kl = _aggregate(kl_ref_tok, m, cfg, global_tokens, global_sequences) if cfg.kl_beta > 0 else pg.new_zeros(())
    loss = pg + cfg.kl_beta * kl

    with torch.no_grad():
        n = m.sum().clamp_min(1)
        metrics = {
            "loss": loss.detach(),
            "pg_loss": pg.detach(),
            "kl_loss": kl.detach(),
            "clip_fraction": ((clipped > unclipped) & m).sum() / n,
            "approx_kl": (kl_k3(old, lp) * m).sum() / n,
            "ratio_mean": (ratio * m).sum() / n,
            "tokens": m.sum(),
        }
        if kl_ref_tok is not None:
            metrics["kl_ref"] = kl_ref_tok.sum() / n
    return loss, metrics


@dataclass
class GRPOLoss:
    """`grpo_loss` as a `PolicyLoss`: the batch brings advantages, old and reference log-probs."""

    cfg: GRPOLossConfig

    def __call__(self, logp: torch.Tensor, batch: TrainBatch, global_tokens: int, global_sequences: int):
        return grpo_loss(logp, batch.old_logp, batch.ref_logp, batch.advantages, batch.mask, self.cfg,
                         global_tokens, global_sequences=global_sequences)  # fmt: skip


# --------------------------------------------------------------------------- reward shaping


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment, a per-sequence reward adjustment (<= 0, float32).

    0 while length <= max_len − buffer; then linear, −penalty·(length − (max_len − buffer))/buffer,
    reaching −penalty at length == max_len; −penalty beyond (truncated responses). buffer = 0 is
    the hard version: −penalty only for length > max_len. Add it to the task reward.
    """
    if max_len < 1:
        raise ValueError(f"max_len={max_len}: expected >= 1")
    if not (0 <= buffer <= max_len):
        raise ValueError(f"buffer={buffer}: expected 0 <= buffer <= max_len ({max_len})")
    if not (penalty >= 0 and math.isfinite(penalty)):
        raise ValueError(f"penalty={penalty}: expected a finite number >= 0")
    n = lengths.to(torch.float32)
    if buffer == 0:
        return -penalty * (n > max_len).float()
    frac = ((n - (max_len - buffer)) / buffer).clamp(0.0, 1.0)
    return -penalty * frac
