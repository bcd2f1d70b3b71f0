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
from collections.abc import Collection, Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..model.llama import Block, HeteroLlamaForCausalLM
from .activations import capture, finish_from, run_student, student_io
from .library import Variant

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
def score_variants(
    parent: HeteroLlamaForCausalLM,
    students: dict[Variant, Block],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    exact: Collection[Variant] = (),
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """{variant key: {metric: mean}} over `batches` of (input_ids, valid) right-padded. Variants in
    `exact` (the parent's own sub-blocks) get the parent's own metrics without being run: putting
    them in the parent gives the parent back."""
    batches = list(batches)
    run = [v for v in students if v not in exact]
    sums: dict[str, dict[str, list]] = defaultdict(lambda: {m: [0.0, 0] for m in METRICS})

    def add(key, metrics):
        for m, (s, n) in metrics.items():
            sums[key][m][0] += float(s)
            sums[key][m][1] += int(n)

    bar = tqdm(total=len(batches) * len(run), desc="score", unit="variant", disable=not progress)
    for ids, valid in batches:
        valid = valid.bool()
        acts = capture(parent, ids)
        own = token_metrics(acts.logits, acts.hidden, acts.logits, acts.hidden, ids, valid)
        for v in students:
            if v in exact:
                add(v.key, own)
        for v in run:
            block = students[v]
            x, _ = student_io(v, acts)
            logits, hidden = finish_from(parent, v, run_student(block, v, x, acts), acts)
            add(v.key, token_metrics(logits, hidden, acts.logits, acts.hidden, ids, valid))
            bar.update()
    bar.close()
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
