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
from tqdm.auto import tqdm

from ..model.llama import Block, HeteroLlamaForCausalLM
from ..model.metrics import METRICS, token_metrics
from .activations import capture, finish_from, run_student, student_io
from .library import Variant



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
