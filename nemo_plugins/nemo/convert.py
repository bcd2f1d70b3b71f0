"""Reference-model state dict <-> megatron-core state dict of a Puzzle child (pure torch).

The megatron side uses the local-spec names that `model.module.state_dict()` gives for a
model built by `nemo_plugins.nemo.spec` (without `_extra_state` entries):

- `embedding.word_embeddings.weight`, `decoder.final_layernorm.weight`, `output_layer.weight`
  (absent when embeddings are tied);
- GQA: `input_layernorm.weight`, `self_attention.linear_qkv.weight` (rows grouped per KV head:
  the query heads of group k, then key k, then value k, with this layer's own group count),
  `self_attention.linear_proj.weight`;
- linear attention: `input_layernorm.weight`, `self_attention.weight`;
- SwiGLU: `pre_mlp_layernorm.weight`, `mlp.linear_fc1.weight` ([gate; up]), `mlp.linear_fc2.weight`;
- linear FFN: `pre_mlp_layernorm.weight`, `mlp.weight`;
- parallel group: its swiglu members as ONE wide SwiGLU (fc1 = [all gates; all ups], fc2
  columns concatenated, in member order) plus `mlp.linear_mlp.weight` for a linear member;
- no-op sub-blocks have no keys.

No NeMo or megatron import here, so conversion works without the `nemo` extra.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..arch.config import ArchConfigError, FFNConfig, ModelConfig, validate

Tensors = dict[str, torch.Tensor]


class ConversionError(ValueError):
    """A state dict does not match the architecture (missing/unexpected key, wrong shape)."""


@dataclass(frozen=True)
class _Rule:
    """One megatron tensor made of one or more reference tensors."""

    mcore: str
    ref: tuple[str, ...]
    merge: Callable[[list[torch.Tensor]], torch.Tensor]
    split: Callable[[torch.Tensor], list[torch.Tensor]]


def _same(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0]


def _alone(t: torch.Tensor) -> list[torch.Tensor]:
    return [t]


def _rename(mcore: str, ref: str) -> _Rule:
    return _Rule(mcore, (ref,), _same, _alone)


def _qkv_rule(mcore: str, ref: str, num_heads: int, num_groups: int, head_dim: int) -> _Rule:
    """q, k, v projections <-> megatron's fused qkv, rows interleaved per query group."""
    per_group = num_heads // num_groups

    def merge(parts):
        q, k, v = parts
        hidden = q.shape[1]
        q = q.reshape(num_groups, per_group * head_dim, hidden)
        k = k.reshape(num_groups, head_dim, hidden)
        v = v.reshape(num_groups, head_dim, hidden)
        return torch.cat([q, k, v], dim=1).reshape(-1, hidden)

    def split(t):
        hidden = t.shape[1]
        g = t.reshape(num_groups, (per_group + 2) * head_dim, hidden)
        q, k, v = g.split([per_group * head_dim, head_dim, head_dim], dim=1)
        return [x.reshape(-1, hidden).contiguous() for x in (q, k, v)]

    return _Rule(mcore, (f"{ref}q_proj.weight", f"{ref}k_proj.weight", f"{ref}v_proj.weight"), merge, split)


def _swiglu_rules(mcore: str, refs: list[str], widths: list[int]) -> list[_Rule]:
    """SwiGLU members (reference prefixes `refs`) <-> one wide megatron MLP under `mcore`."""

    def merge_fc1(parts):  # [g_0..g_n-1, u_0..u_n-1] -> [all gates; all ups]
        return torch.cat(parts, dim=0)

    def split_fc1(t):
        gates, ups = t.chunk(2, dim=0)
        return [x.contiguous() for x in (*gates.split(widths, 0), *ups.split(widths, 0))]

    def merge_fc2(parts):
        return torch.cat(parts, dim=1)

    def split_fc2(t):
        return [x.contiguous() for x in t.split(widths, dim=1)]

    fc1_refs = tuple(f"{r}gate_proj.weight" for r in refs) + tuple(f"{r}up_proj.weight" for r in refs)
    fc2_refs = tuple(f"{r}down_proj.weight" for r in refs)
    return [
        _Rule(f"{mcore}linear_fc1.weight", fc1_refs, merge_fc1, split_fc1),
        _Rule(f"{mcore}linear_fc2.weight", fc2_refs, merge_fc2, split_fc2),
    ]


def _ffn_rules(layer: int, f: FFNConfig) -> list[_Rule]:
    m, r = f"decoder.layers.{layer}.", f"model.layers.{layer}."
    if f.kind == "no_op":
        return []
    rules = [_rename(f"{m}pre_mlp_layernorm.weight", f"{r}post_attention_layernorm.weight")]
    if f.kind == "swiglu":
        return rules + _swiglu_rules(f"{m}mlp.", [f"{r}mlp."], [f.intermediate_size])
    if f.kind == "linear":
        return rules + [_rename(f"{m}mlp.weight", f"{r}mlp.linear_mlp.weight")]
    swiglus = [(j, x) for j, x in enumerate(f.members) if x.kind == "swiglu"]
    linears = [j for j, x in enumerate(f.members) if x.kind == "linear"]
    if len(linears) > 1 or not swiglus:
        raise ArchConfigError(
            f"layers[{layer}].ffn: a parallel group converts to one wide SwiGLU plus at most one linear member; "
            f"it has {len(swiglus)} swiglu and {len(linears)} linear members (sum the linear members into one "
            "first, as FFN Fusion does)"
        )
    refs = [f"{r}mlp.branches.{j}." for j, _ in swiglus]
    rules += _swiglu_rules(f"{m}mlp.", refs, [x.intermediate_size for _, x in swiglus])
    if linears:
        rules.append(_rename(f"{m}mlp.linear_mlp.weight", f"{r}mlp.branches.{linears[0]}.linear_mlp.weight"))
    return rules


def _rules(arch: ModelConfig) -> list[_Rule]:
    """Every megatron tensor of `arch` and the reference tensors it is made of."""
    validate(arch)
    rules = [_rename("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
    for i, b in enumerate(arch.blocks):
        m, r = f"decoder.layers.{i}.", f"model.layers.{i}."
        a = b.attention
        if a.kind != "no_op":
            rules.append(_rename(f"{m}input_layernorm.weight", f"{r}input_layernorm.weight"))
        if a.kind == "gqa":
            rules.append(
                _qkv_rule(f"{m}self_attention.linear_qkv.weight", f"{r}self_attn.",
                          arch.num_attention_heads, a.num_kv_heads, arch.kv_channels)
            )  # fmt: skip
            rules.append(_rename(f"{m}self_attention.linear_proj.weight", f"{r}self_attn.o_proj.weight"))
        elif a.kind == "linear":
            rules.append(_rename(f"{m}self_attention.weight", f"{r}self_attn.linear_attn.weight"))
        rules += _ffn_rules(i, b.ffn)
    rules.append(_rename("decoder.final_layernorm.weight", "model.norm.weight"))
    if not arch.tie_word_embeddings:
        rules.append(_rename("output_layer.weight", "lm_head.weight"))
    return rules


# ----------------------------------------------------------------------------- expected shapes


def _ffn_shapes(h: int, prefix: str, f: FFNConfig) -> dict[str, tuple[int, ...]]:
    if f.kind == "swiglu":
        i = f.intermediate_size
        return {f"{prefix}gate_proj.weight": (i, h), f"{prefix}up_proj.weight": (i, h), f"{prefix}down_proj.weight": (h, i)}
    if f.kind == "linear":
        return {f"{prefix}linear_mlp.weight": (h, h)}
    if f.kind == "parallel":
        out = {}
        for j, x in enumerate(f.members):
            out.update(_ffn_shapes(h, f"{prefix}branches.{j}.", x))
        return out
    return {}


def reference_shapes(arch: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in the reference model's state dict (without a tied lm_head)."""
    validate(arch)
    h, v, hd, heads = arch.hidden_size, arch.vocab_size, arch.kv_channels, arch.num_attention_heads
    out = {"model.embed_tokens.weight": (v, h)}
    for i, b in enumerate(arch.blocks):
        r, a = f"model.layers.{i}.", b.attention
        if a.kind != "no_op":
            out[f"{r}input_layernorm.weight"] = (h,)
        if a.kind == "gqa":
            out[f"{r}self_attn.q_proj.weight"] = (heads * hd, h)
            out[f"{r}self_attn.k_proj.weight"] = (a.num_kv_heads * hd, h)
            out[f"{r}self_attn.v_proj.weight"] = (a.num_kv_heads * hd, h)
            out[f"{r}self_attn.o_proj.weight"] = (h, heads * hd)
        elif a.kind == "linear":
            out[f"{r}self_attn.linear_attn.weight"] = (h, h)
        if b.ffn.kind != "no_op":
            out[f"{r}post_attention_layernorm.weight"] = (h,)
            out.update(_ffn_shapes(h, f"{r}mlp.", b.ffn))
    out["model.norm.weight"] = (h,)
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    return out


def mcore_shapes(arch: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in the megatron-core state dict (local-spec names)."""
    ref = reference_shapes(arch)
    out = {}
    for rule in _rules(arch):
        parts = [torch.empty(ref[k], device="meta") for k in rule.ref]
        out[rule.mcore] = tuple(rule.merge(parts).shape)
    return out


def _check(state: Tensors, expected: dict[str, tuple[int, ...]], side: str, ignore=()) -> None:
    """Raise naming missing keys, unexpected keys, or the first shape mismatch."""
    keys = {k for k in state if not k.endswith("_extra_state") and k not in ignore}
    missing = sorted(set(expected) - keys)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConversionError(f"{side} state dict is missing {missing[:5]}{more} for this architecture")
    unexpected = sorted(keys - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise ConversionError(f"{side} state dict has unexpected key(s) {unexpected[:5]}{more} for this architecture")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise ConversionError(f"{side} state dict: {k} has shape {tuple(state[k].shape)}, expected {shape}")


# ----------------------------------------------------------------------------- public API


def to_mcore(arch: ModelConfig, state: Tensors) -> Tensors:
    """Reference (`HeteroLlamaForCausalLM`) state dict -> megatron-core state dict.

    A tied `lm_head.weight` may be present (it is the embedding) or absent. Renamed tensors are
    shared, not copied; merged ones (qkv, fc1, a group's fc2) are new tensors.
    """
    ignore = ()
    if arch.tie_word_embeddings and "lm_head.weight" in state:
        if state["lm_head.weight"].shape != state.get("model.embed_tokens.weight", state["lm_head.weight"]).shape:
            raise ConversionError(
                f"reference state dict: lm_head.weight has shape {tuple(state['lm_head.weight'].shape)}, "
                f"expected the tied embedding's {tuple(state['model.embed_tokens.weight'].shape)}"
            )
        ignore = ("lm_head.weight",)
    _check(state, reference_shapes(arch), "reference", ignore)
    return {rule.mcore: rule.merge([state[k] for k in rule.ref]) for rule in _rules(arch)}


def from_mcore(arch: ModelConfig, state: Tensors) -> Tensors:
    """megatron-core state dict -> reference state dict (no `lm_head.weight` when tied).

    `_extra_state` entries are ignored. Parallel groups are split by their members' widths.
    """
    _check(state, mcore_shapes(arch), "megatron-core")
    out: Tensors = {}
    for rule in _rules(arch):
        out.update(zip(rule.ref, rule.split(state[rule.mcore])))
    order = list(reference_shapes(arch))
    return {k: out[k] for k in order}
