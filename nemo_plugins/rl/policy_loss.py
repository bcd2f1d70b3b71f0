"""The policy-loss protocol every RL algorithm trains through, and the token quantities it needs.

A loss is called once per micro-batch as `loss(logp, batch, global_tokens, global_sequences)
-> (loss, metrics)`: `logp` are the trained policy's token log-probs of `batch.ids` (with grad;
they change every update, so they are an argument rather than part of the batch), `batch` is a
`TrainBatch`, and the two counts are the whole optimizer step's (summed over its micro-batches),
so that micro-batch losses add up to the full-batch loss. NeMo-RL's `LossFunction` has the same
shape (logits, data, global valid sequences, global valid tokens).

Alignment (same as `model.llama.causal_lm_loss`): logits at position t predict token t+1, so
`token_logprobs(logits, ids)[:, t]` is log p(ids[:, t + 1] | ids[:, :t + 1]) and the last
position scores nothing (0). A batch's `mask` is over *predicting* positions: for a per-token
response mask, `model.losses.next_token_mask(response_mask)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32 (bf16/fp16 and integer tensors become fp32; fp64 stays)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point() else x


@dataclass
class TrainBatch:
    """One micro-batch of sequences to train on, B sequences right-padded to T tokens.

    ids [B, T] prompt + response; mask [B, T] the predicting positions of response tokens;
    advantages [B] one per sequence (policy-gradient losses) or pair_index [B] the preference
    pair a sequence belongs to and rewards [B] the reward it compares (pairwise losses: each pair
    is two consecutive rows, chosen then rejected, see `preference_loss.PreferenceLoss`);
    old_logp [B, T] the sampling policy's log-probs (None: on-policy, the loss uses detached
    `logp`); ref_logp [B, T] the frozen reference's (None: no reference kept)."""

    ids: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor | None = None
    pair_index: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None

    def normalizers(self) -> tuple[int, int]:
        """(tokens, sequences) this batch counts; sum over a step's micro-batches for the global ones."""
        m = self.mask.bool()
        return int(m.sum()), int(m.any(dim=1).sum())


class PolicyLoss(Protocol):
    """(loss, metrics) of one micro-batch; the metrics are detached scalars, `tokens` among them."""

    def __call__(
        self, logp: torch.Tensor, batch: TrainBatch, global_tokens: int, global_sequences: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, T] fp32 log p(ids[:, t+1]) under logits[:, t]; the last position is 0 (predicts
    nothing). logsumexp + gather, so no [B, T, V] log-softmax is kept for backward."""
    lf = upcast(logits)
    targets = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=0)
    picked = lf.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lp = picked - torch.logsumexp(lf, dim=-1)
    return torch.nn.functional.pad(lp[:, :-1], (0, 1), value=0.0)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """[B, T] fp32 entropy (nats) of softmax(logits) at each position; an exploration diagnostic."""
    logp = torch.log_softmax(upcast(logits), dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, p.new_zeros(())).sum(-1)  # 0·log 0 = 0 (−inf logits)
