"""The parent's own activations around every sub-block, captured in one forward pass.

BLD trains each variant on these (input -> the parent sub-block's output), and scoring
restarts the parent from them, so every variant of a layer shares one parent prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.llama import Block, HeteroLlamaForCausalLM
from .library import Variant


@dataclass
class ParentActivations:
    inputs: list[torch.Tensor]  # [L] residual stream entering layer i
    mids: list[torch.Tensor]  # [L] after layer i's attention sub-block
    outputs: list[torch.Tensor]  # [L] after layer i's FFN sub-block
    rope: tuple[torch.Tensor, torch.Tensor]
    mask: tuple
    logits: torch.Tensor | None  # None when captured without them (BLD needs only the blocks')
    hidden: torch.Tensor  # final-norm hidden states


@torch.no_grad()
def capture(parent: HeteroLlamaForCausalLM, input_ids: torch.Tensor, *, logits: bool = True) -> ParentActivations:
    """Run the parent once (right-padded batches need no mask: padding only follows real tokens);
    `logits=False` skips the LM head (a [B, T, vocab] tensor that BLD never reads)."""
    x, rope, mask = parent.prepare(input_ids)
    inputs, mids, outputs = [], [], []
    for layer in parent.model.layers:
        inputs.append(x)
        x = layer.attention(x, rope, mask)
        mids.append(x)
        x = layer.ffn(x)
        outputs.append(x)
    hidden = parent.model.norm(x)
    return ParentActivations(inputs, mids, outputs, rope, mask, parent.lm_head(hidden) if logits else None, hidden)


def student_io(v: Variant, acts: ParentActivations) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) for a variant: the parent's activations around the part it replaces."""
    i = v.layer
    if v.subblock == "attention":
        return acts.inputs[i], acts.mids[i]
    if v.subblock == "ffn":
        return acts.mids[i], acts.outputs[i]
    return acts.inputs[i], acts.outputs[i]


def run_student(block: Block, v: Variant, x: torch.Tensor, acts: ParentActivations) -> torch.Tensor:
    """The variant's output on input x (residual included)."""
    if v.subblock == "attention":
        return block.attention(x, acts.rope, acts.mask)
    if v.subblock == "ffn":
        return block.ffn(x)
    return block(x, acts.rope, acts.mask)


def finish_from(
    parent: HeteroLlamaForCausalLM, v: Variant, y: torch.Tensor, acts: ParentActivations
) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue the parent after the variant's output y; returns (logits, final hidden)."""
    layers = parent.model.layers
    x = y
    if v.subblock == "attention":
        x = layers[v.layer].ffn(x)
    for layer in layers[v.layer + 1 :]:
        x = layer(x, acts.rope, acts.mask)
    hidden = parent.model.norm(x)
    return parent.lm_head(hidden), hidden
