"""How far a model is from a reference model, on held-out tokens: what Puzzle scores variants by,
recovery and SFT validate with, and reports compare children with.

Metrics (means over the counted held-out tokens):
- `kl_div`: KL(reference || model) of the next-token distributions (the reference is the
  parent or teacher);
- `lm_loss`: the model's next-token cross-entropy;
- `cosine`: 1 - cosine similarity of the model's and the reference's final hidden states;
- `greedy_agreement`: the share of positions where the model's most likely next token is the
  reference's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .llama import HeteroLlamaForCausalLM, causal_lm_loss
from .losses import kd_kl_loss, next_token_mask

METRICS = ("kl_div", "lm_loss", "cosine", "greedy_agreement")


def token_metrics(
    child_logits: torch.Tensor, child_hidden: torch.Tensor, parent_logits: torch.Tensor,
    parent_hidden: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor, *, chunk_elements: int = 1 << 25,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Per-metric (sum, count) over the batch; `valid` [B, T] marks the counted tokens (real
    tokens, or only response tokens). KL, LM loss and greedy agreement count the positions
    predicting them. Rows are taken a few at a time (about `chunk_elements` logits each), so the
    fp32 log-probabilities of a large vocabulary never exist for the whole batch at once."""
    pred = valid[:, 1:]
    batch, length, vocab = child_logits.shape
    rows = max(1, chunk_elements // max(1, (length - 1) * vocab))
    kl_sum = nll_sum = agree_sum = torch.zeros((), dtype=torch.float64)
    for start in range(0, batch, rows):
        part = slice(start, start + rows)
        p_logp = F.log_softmax(parent_logits[part, :-1].float(), -1)
        c_logp = F.log_softmax(child_logits[part, :-1].float(), -1)
        counted = pred[part]
        kl = F.kl_div(c_logp, p_logp, log_target=True, reduction="none").sum(-1)  # KL(parent || child)
        nll = -c_logp.gather(-1, input_ids[part, 1:, None]).squeeze(-1)
        agree = p_logp.argmax(-1) == c_logp.argmax(-1)
        kl_sum = kl_sum + (kl * counted).sum().double()
        nll_sum = nll_sum + (nll * counted).sum().double()
        agree_sum = agree_sum + (agree & counted).sum().double()
        del p_logp, c_logp
    cos = 1 - F.cosine_similarity(child_hidden.float(), parent_hidden.float(), dim=-1)
    n_pred, n_valid = pred.sum(), valid.sum()
    return {
        "kl_div": (kl_sum, n_pred),
        "lm_loss": (nll_sum, n_pred),
        "cosine": ((cos * valid).sum(), n_valid),
        "greedy_agreement": (agree_sum, n_pred),
    }


@torch.no_grad()
def model_metrics(
    parent: HeteroLlamaForCausalLM, child: HeteroLlamaForCausalLM, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, float]:
    """The same metrics for a whole child model against the parent (and the parent's own LM loss)."""
    sums = {m: [0.0, 0] for m in (*METRICS, "parent_lm_loss")}
    for ids, valid in batches:
        valid = valid.bool()
        p_hidden = parent.hidden_states(ids)
        c_hidden = child.hidden_states(ids)
        p_logits, c_logits = parent.lm_head(p_hidden), child.lm_head(c_hidden)
        for m, (s, n) in token_metrics(c_logits, c_hidden, p_logits, p_hidden, ids, valid).items():
            sums[m][0] += float(s)
            sums[m][1] += int(n)
        s, n = token_metrics(p_logits, p_hidden, p_logits, p_hidden, ids, valid)["lm_loss"]
        sums["parent_lm_loss"][0] += float(s)
        sums["parent_lm_loss"][1] += int(n)
    return {m: s / max(n, 1) for m, (s, n) in sums.items()}


def logits_and_hidden(model: HeteroLlamaForCausalLM, ids: torch.Tensor):
    hidden = model.hidden_states(ids)
    return model.lm_head(hidden), hidden


@torch.no_grad()
def val_metrics(student, teacher, batches) -> dict[str, float | None]:
    """Token means over `batches` of (ids, loss_mask): KL(teacher ‖ student) at T=1 (None
    without a teacher) and the student's LM loss, both over the positions predicting counted
    tokens."""
    kl_sum = lm_sum = 0.0
    count = 0
    device = next(student.parameters()).device
    for ids, loss_mask in batches:
        ids, loss_mask = ids.to(device), loss_mask.to(device)
        mask = next_token_mask(loss_mask)
        logits, _ = logits_and_hidden(student, ids)
        n = int(mask.sum())
        lm_sum += float(causal_lm_loss(logits, ids, loss_mask)) * n  # a mean over the same `mask`
        if teacher is not None:
            kl_sum += float(kd_kl_loss(logits, teacher(ids), mask, 1.0, reduction="sum"))
        count += n
    n = max(count, 1)
    return {"val_kl": kl_sum / n if teacher is not None else None, "val_lm_loss": lm_sum / n}
