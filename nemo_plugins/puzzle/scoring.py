"""Replace-one-block scores: each variant in the otherwise-parent model, on held-out tokens.

Metrics per variant (means over the counted held-out tokens):
- `kl_div`: KL(parent || child) of the next-token distributions (the default MIP objective);
- `lm_loss`: the child's next-token cross-entropy;
- `cosine`: 1 - cosine similarity of the child's and parent's final hidden states;
- `greedy_agreement`: the share of positions where the child's most likely next token is the
  parent's.
The parent runs once per batch; every variant restarts from the parent's activations at its
own layer, so scoring all variants costs one parent prefix per batch, not one per variant.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..model.llama import Block, HeteroLlamaForCausalLM
from .activations import capture, finish_from, run_student, student_io
from .library import Variant

METRICS = ("kl_div", "lm_loss", "cosine", "greedy_agreement")


def token_metrics(
    child_logits: torch.Tensor, child_hidden: torch.Tensor, parent_logits: torch.Tensor,
    parent_hidden: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Per-metric (sum, count) over the batch; `valid` [B, T] marks the counted tokens (real
    tokens, or only response tokens). KL and LM loss count the positions predicting them."""
    pred = valid[:, 1:]
    p_logp = F.log_softmax(parent_logits[:, :-1].float(), -1)
    c_logp = F.log_softmax(child_logits[:, :-1].float(), -1)
    kl = (p_logp.exp() * (p_logp - c_logp)).sum(-1)
    nll = -c_logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    cos = 1 - F.cosine_similarity(child_hidden.float(), parent_hidden.float(), dim=-1)
    agree = (p_logp.argmax(-1) == c_logp.argmax(-1)).float()
    n_pred, n_valid = pred.sum(), valid.sum()
    return {
        "kl_div": ((kl * pred).sum(), n_pred),
        "lm_loss": ((nll * pred).sum(), n_pred),
        "cosine": ((cos * valid).sum(), n_valid),
        "greedy_agreement": ((agree * pred).sum(), n_pred),
    }


@torch.no_grad()
def score_variants(
    parent: HeteroLlamaForCausalLM,
    students: dict[Variant, Block],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """{variant key: {metric: mean}} over `batches` of (input_ids, valid) right-padded."""
    sums: dict[str, dict[str, list]] = defaultdict(lambda: {m: [0.0, 0] for m in METRICS})
    for ids, valid in tqdm(list(batches), desc="score", disable=not progress):
        valid = valid.bool()
        acts = capture(parent, ids)
        for v, block in students.items():
            x, _ = student_io(v, acts)
            logits, hidden = finish_from(parent, v, run_student(block, v, x, acts), acts)
            for m, (s, n) in token_metrics(logits, hidden, acts.logits, acts.hidden, ids, valid).items():
                sums[v.key][m][0] += float(s)
                sums[v.key][m][1] += int(n)
    return {key: {m: s / max(n, 1) for m, (s, n) in per.items()} for key, per in sums.items()}


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
