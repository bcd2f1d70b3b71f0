"""The update of an RL step: the kept sequences of a rollout (or its preference pairs, kept whole)
cut into `TrainBatch`es (with the old policy's and the reference's log-probs, no grad), then `updates_per_rollout` optimizer steps
through any `PolicyLoss`.

Each update spans the WHOLE batch of kept sequences, in micro-batches of `micro_batch_size`
whose gradients accumulate: every micro-batch loss is normalized by the step's global token and
sequence counts, so the result equals one full-batch step (memory only). The old policy's
log-probs are computed before the first update when there is more than one; with one update the
loss is on-policy (`old_logp=None`: ratio 1, the same gradient without the extra forward pass).
Log-probs use the logits ÷ `temperature`, the distribution the rollout sampled from (top_p < 1
truncates it further; the ratio ignores that).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ..model.losses import next_token_mask
from .config import LoopConfig
from .experience import Rollout
from .policy_loss import PolicyLoss, TrainBatch, entropy, token_logprobs

# Loss metrics already normalized by the step's global counts: summed over micro-batches as they
# are (the others are token-weighted). A loss returns "loss" and whichever of the rest it has.
GLOBAL_METRICS = ("loss", "pg_loss", "kl_loss", "pref_margin", "reward_margin", "pref_accuracy", "sft_loss")


def sequence_token_logprobs(model, ids: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(token log-probs [B, T], logits ÷ temperature) of `ids` under `model` (see `policy_loss.token_logprobs`)."""
    logits = model(ids)
    if temperature != 1.0:
        logits = logits / temperature
    return token_logprobs(logits, ids), logits


def micro_batch_indices(indices: Sequence[int], size: int) -> list[list[int]]:
    return [list(indices[i : i + size]) for i in range(0, len(indices), size)]


def train_batches(
    policy, reference, roll: Rollout, advantages: torch.Tensor, keep: torch.Tensor, cfg: LoopConfig, pad_id: int
) -> list[TrainBatch]:
    """Kept sequences in micro-batches (each trimmed to its own longest sequence), with the
    reference's log-probs and, when there are several updates, the old policy's (no grad)."""
    kept = [i for i in range(len(roll.completions)) if bool(keep[i])]
    return [_batch(policy, reference, roll, chunk, cfg, pad_id, advantages=advantages[chunk])
            for chunk in micro_batch_indices(kept, cfg.micro_batch_size)]  # fmt: skip


def pair_batches(
    policy, reference, roll: Rollout, pairs: torch.Tensor, rewards: torch.Tensor, cfg: LoopConfig, pad_id: int
) -> list[TrainBatch]:
    """Preference pairs [P, 2] (chosen, rejected sequence indices of `roll`) in micro-batches of
    whole pairs (micro_batch_size // 2 pairs, at least one), each pair two consecutive rows with
    its `pair_index`, every sequence with its reward; log-probs as in `train_batches`."""
    per_micro = max(1, cfg.micro_batch_size // 2)
    out = []
    for chunk in micro_batch_indices(list(range(len(pairs))), per_micro):
        rows = [int(i) for p in chunk for i in pairs[p]]
        index = torch.tensor([p for p in chunk for _ in range(2)], dtype=torch.long)
        out.append(_batch(policy, reference, roll, rows, cfg, pad_id, pair_index=index, rewards=rewards[rows]))
    return out


def _batch(policy, reference, roll: Rollout, rows: list[int], cfg: LoopConfig, pad_id: int, **per_sequence) -> TrainBatch:
    """The TrainBatch of `roll`'s sequences `rows` with the given per-sequence fields, and the
    reference's and (several updates) the old policy's log-probs, no grad."""
    device = policy.lm_head.weight.device
    ids, response = roll.sequences(rows, pad_id)
    fields = {k: v.to(device) for k, v in per_sequence.items()}
    batch = TrainBatch(ids.to(device), next_token_mask(response).to(device), **fields)
    with torch.no_grad():
        if cfg.updates_per_rollout > 1:
            batch.old_logp = sequence_token_logprobs(policy, batch.ids, cfg.temperature)[0]
        if reference is not None:
            batch.ref_logp = sequence_token_logprobs(reference, batch.ids, cfg.temperature)[0]
    return batch


def _add_metrics(acc: dict, metrics: Mapping[str, torch.Tensor], weight: float) -> None:
    for k, v in metrics.items():
        acc[k] = acc.get(k, 0.0) + float(v) * weight


def apply_updates(
    policy, optimizer, batches: Sequence[TrainBatch], loss_fn: PolicyLoss, cfg: LoopConfig, backward=None
) -> dict:
    """`cfg.updates_per_rollout` optimizer steps over `batches` (each over all of them,
    micro-batch gradients accumulated; `backward(loss)` defaults to loss.backward()).

    Returns the step's loss metrics: means over the updates (per-token ones token-weighted over
    micro-batches), entropy of the pre-update policy, grad norm before clipping, the trained
    sequence and token counts. No token to train on: no optimizer step.
    """
    backward = backward or (lambda loss: loss.backward())
    counts = [b.normalizers() for b in batches]
    tokens, seqs = sum(t for t, _ in counts), sum(s for _, s in counts)
    row = {"seqs_trained": sum(len(b.ids) for b in batches), "tokens_trained": tokens, "updates": 0}
    if tokens == 0:  # nothing kept (every group had equal rewards): no signal, no step
        return {**row, "loss": 0.0, "pg_loss": 0.0, "kl_loss": 0.0}
    sums: dict[str, float] = {}
    ent_sum = 0.0
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    for update in range(cfg.updates_per_rollout):
        for batch in batches:
            logp, logits = sequence_token_logprobs(policy, batch.ids, cfg.temperature)
            loss, metrics = loss_fn(logp, batch, tokens, seqs)
            backward(loss)
            n = float(metrics.pop("tokens"))
            for k in GLOBAL_METRICS:
                if k in metrics:
                    sums[k] = sums.get(k, 0.0) + float(metrics.pop(k))
            _add_metrics(sums, metrics, n / tokens)
            if update == 0:
                with torch.no_grad():
                    ent_sum += float((entropy(logits) * batch.mask).sum())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm))
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row["updates"] += 1
    row.update({k: v / row["updates"] for k, v in sums.items()})
    row["entropy"] = ent_sum / tokens
    return row
