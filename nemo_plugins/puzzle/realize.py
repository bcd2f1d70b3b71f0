"""Assemble a child model from one chosen variant per group and the trained library weights."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..model.checkpoint import model_from_state
from ..model.llama import HeteroLlamaForCausalLM
from .library import Variant, child_config

NON_BLOCK = ("model.embed_tokens.", "model.norm.", "lm_head.")


def realize_child(
    parent: HeteroLlamaForCausalLM,
    choices: dict[str, str],
    variants: list[Variant],
    variant_state: Callable[[Variant], dict[str, torch.Tensor]],
) -> HeteroLlamaForCausalLM:
    """The child for `choices` ({group: variant name}); `variant_state(v)` gives a variant's
    weights with names relative to its layer (as saved by BLD). Embeddings, final norm and
    lm_head come from the parent."""
    cfg = child_config(parent.config, choices, variants)
    by_key = {v.key: v for v in variants}
    state = {k: t for k, t in parent.state_dict().items() if k.startswith(NON_BLOCK)}
    for group, name in choices.items():
        v = by_key.get(f"{group}/{name}")
        if v is None:
            raise ValueError(f"choices[{group!r}]={name!r}: no such variant in the library")
        for k, t in variant_state(v).items():
            state[f"model.layers.{v.layer}.{k}"] = t
    return model_from_state(cfg, state)
