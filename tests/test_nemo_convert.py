"""Reference <-> megatron-core state-dict conversion (`nemo_plugins.nemo.convert`).

Pure torch: these tests need no NeMo and run everywhere. The megatron-side names are checked
against a real megatron model (strict load, logits parity) in test_nemo_model.py.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nemo_plugins.arch.config import (
    ATTENTION_LINEAR,
    ATTENTION_NO_OP,
    FFN_LINEAR,
    FFN_NO_OP,
    ArchConfigError,
    BlockConfig,
    ModelConfig,
    gqa,
    homogeneous,
    parallel,
    swiglu,
)
from nemo_plugins.arch.hf_json import from_hf_config
from nemo_plugins.model.llama import HeteroLlamaForCausalLM
from nemo_plugins.nemo.convert import ConversionError, from_mcore, mcore_shapes, to_mcore

SUPER_JSON = Path(__file__).parent / "fixtures" / "llama33_nemotron_super_49b_config.json"


# ----------------------------------------------------------------------------- architectures (shared with test_nemo_model)


def scaled_super(hf: dict, hidden: int = 128, heads: int = 16, vocab: int = 256) -> ModelConfig:
    """Llama-3.3-Nemotron-Super-49B's block pattern, scaled down to build in seconds.

    Keeps one layer per distinct (attention kind, FFN width) in the original order, plus the
    last layer; KV heads and FFN widths are scaled with the heads and the hidden size, so the
    mix of GQA / no_op attention and distinct widths (and its Llama-3 RoPE scaling) remain.
    """
    full = from_hf_config(hf)
    keep, seen = [], set()
    for i, b in enumerate(full.blocks):
        if (b.attention.kind, b.ffn.intermediate_size) not in seen:
            seen.add((b.attention.kind, b.ffn.intermediate_size))
            keep.append(i)
    keep.append(len(full.blocks) - 1)
    blocks = []
    for i in keep:
        a, f = full.blocks[i].attention, full.blocks[i].ffn
        if a.kind == "gqa":
            a = gqa(a.num_kv_heads * heads // full.num_attention_heads)
        blocks.append(BlockConfig(a, swiglu(f.intermediate_size * hidden // full.hidden_size)))
    return dataclasses.replace(
        full, hidden_size=hidden, num_attention_heads=heads, vocab_size=vocab, blocks=tuple(blocks),
        max_position_embeddings=4096,
    )  # fmt: skip


def mixed_arch(tie: bool = False) -> ModelConfig:
    """Every block kind, KV heads differing per layer (2, 1, 4), a parallel group with a linear
    member between two swiglu members, and a swiglu-only group (one plain wide MLP)."""
    blocks = (
        BlockConfig(gqa(2), swiglu(48)),
        BlockConfig(ATTENTION_LINEAR, FFN_LINEAR),
        BlockConfig(ATTENTION_NO_OP, FFN_NO_OP),
        BlockConfig(gqa(1), parallel(swiglu(16), FFN_LINEAR, swiglu(24))),
        BlockConfig(gqa(4), FFN_NO_OP),
        BlockConfig(ATTENTION_NO_OP, parallel(swiglu(8), swiglu(40))),
    )
    return ModelConfig(vocab_size=96, hidden_size=32, num_attention_heads=4, blocks=blocks, rope_theta=10000.0,
                       tie_word_embeddings=tie)  # fmt: skip


def parent_arch() -> ModelConfig:
    return homogeneous(vocab_size=128, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                       intermediate_size=128)  # fmt: skip


def reference_state(arch: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = HeteroLlamaForCausalLM(arch)
    with torch.no_grad():  # norms are ones at init: make them informative
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.state_dict()


ARCHS = {
    "super49b_scaled": lambda: scaled_super(json.loads(SUPER_JSON.read_text())),
    "mixed": mixed_arch,
    "mixed_tied": lambda: mixed_arch(tie=True),
    "parent": parent_arch,
}


# ----------------------------------------------------------------------------- round trips and layout


@pytest.mark.parametrize("name", list(ARCHS))
def test_round_trip_is_exact(name):
    arch = ARCHS[name]()
    state = reference_state(arch)
    mcore = to_mcore(arch, state)
    assert {k: tuple(v.shape) for k, v in mcore.items()} == mcore_shapes(arch)
    back = from_mcore(arch, mcore)
    expected = {k: v for k, v in state.items() if not (arch.tie_word_embeddings and k == "lm_head.weight")}
    assert list(back) == list(expected)
    for k, v in expected.items():
        assert torch.equal(back[k], v), k
    # and the other way round
    again = to_mcore(arch, back)
    assert all(torch.equal(again[k], mcore[k]) for k in mcore)


def test_scaled_super_keeps_the_block_mix():
    arch = ARCHS["super49b_scaled"]()
    kinds = {b.attention.kind for b in arch.blocks}
    widths = {b.ffn.intermediate_size for b in arch.blocks}
    assert kinds == {"gqa", "no_op"} and len(widths) == 6 and arch.rope_scaling is not None
    assert {b.attention.num_kv_heads for b in arch.blocks if b.attention.kind == "gqa"} == {2}


def test_qkv_rows_are_interleaved_per_query_group_with_each_layers_group_count():
    arch = mixed_arch()
    state = reference_state(arch)
    mcore = to_mcore(arch, state)
    hd, heads = arch.kv_channels, arch.num_attention_heads
    for i, b in enumerate(arch.blocks):
        if b.attention.kind != "gqa":
            continue
        groups = b.attention.num_kv_heads
        per_group = heads // groups
        q, k, v = (state[f"model.layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv")
        rows = []
        for g in range(groups):  # KV head g serves query heads [g*per_group, (g+1)*per_group)
            rows += [q[g * per_group * hd:(g + 1) * per_group * hd], k[g * hd:(g + 1) * hd], v[g * hd:(g + 1) * hd]]
        assert torch.equal(mcore[f"decoder.layers.{i}.self_attention.linear_qkv.weight"], torch.cat(rows)), i


def test_parallel_group_is_one_wide_swiglu_plus_the_linear_member():
    arch = mixed_arch()
    state = reference_state(arch)
    mcore = to_mcore(arch, state)
    r, m = "model.layers.3.mlp.branches.", "decoder.layers.3.mlp."
    fc1, fc2 = mcore[f"{m}linear_fc1.weight"], mcore[f"{m}linear_fc2.weight"]
    gates = torch.cat([state[f"{r}0.gate_proj.weight"], state[f"{r}2.gate_proj.weight"]])
    ups = torch.cat([state[f"{r}0.up_proj.weight"], state[f"{r}2.up_proj.weight"]])
    assert torch.equal(fc1, torch.cat([gates, ups]))
    assert torch.equal(fc2, torch.cat([state[f"{r}0.down_proj.weight"], state[f"{r}2.down_proj.weight"]], dim=1))
    assert torch.equal(mcore[f"{m}linear_mlp.weight"], state[f"{r}1.linear_mlp.weight"])
    # the wide form computes the group: silu(gate)*up through fc2, plus the linear member
    x = torch.randn(5, arch.hidden_size)
    gate, up = (x @ fc1.T).chunk(2, dim=-1)
    wide = (F.silu(gate) * up) @ fc2.T + x @ mcore[f"{m}linear_mlp.weight"].T
    reference = HeteroLlamaForCausalLM(arch)
    reference.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(wide, reference.model.layers[3].mlp(x), atol=1e-6)


def test_no_op_sub_blocks_have_no_keys_and_linear_replacements_are_renamed():
    arch = mixed_arch()
    mcore = to_mcore(arch, reference_state(arch))
    assert not [k for k in mcore if k.startswith("decoder.layers.2.")]
    assert not [k for k in mcore if k.startswith("decoder.layers.4.") and ("mlp" in k)]
    assert not [k for k in mcore if k.startswith("decoder.layers.5.") and ("attention" in k or "input_layernorm" in k)]
    assert {k for k in mcore if k.startswith("decoder.layers.1.")} == {
        "decoder.layers.1.input_layernorm.weight", "decoder.layers.1.self_attention.weight",
        "decoder.layers.1.pre_mlp_layernorm.weight", "decoder.layers.1.mlp.weight",
    }  # fmt: skip


def test_tied_embeddings_have_no_output_layer_and_accept_a_tied_lm_head():
    arch = mixed_arch(tie=True)
    state = reference_state(arch)
    assert "lm_head.weight" in state  # a tied module's state dict still lists it
    mcore = to_mcore(arch, state)
    assert "output_layer.weight" not in mcore
    del state["lm_head.weight"]
    assert set(to_mcore(arch, state)) == set(mcore)


def test_extra_state_entries_are_ignored():
    arch = mixed_arch()
    mcore = to_mcore(arch, reference_state(arch))
    mcore["decoder.layers.0.self_attention.linear_qkv._extra_state"] = None
    assert "decoder.layers.0.self_attention.linear_qkv._extra_state" not in from_mcore(arch, mcore)


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_key_and_shapes():
    arch = mixed_arch()
    state = reference_state(arch)
    broken = dict(state)
    del broken["model.layers.3.mlp.branches.2.up_proj.weight"]
    with pytest.raises(ConversionError, match=r"reference state dict is missing \['model\.layers\.3\.mlp\.branches\.2\.up_proj\.weight'\]"):
        to_mcore(arch, broken)
    with pytest.raises(ConversionError, match=r"unexpected key\(s\) \['model\.layers\.2\.mlp\.gate_proj\.weight'\]"):
        to_mcore(arch, {**state, "model.layers.2.mlp.gate_proj.weight": torch.zeros(3, 32)})
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(8, 32\), expected \(16, 32\)"):
        to_mcore(arch, {**state, "model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 32)})

    mcore = to_mcore(arch, state)
    with pytest.raises(ConversionError, match=r"megatron-core state dict: decoder\.layers\.3\.mlp\.linear_fc1\.weight has shape \(64, 32\), expected \(80, 32\)"):
        from_mcore(arch, {**mcore, "decoder.layers.3.mlp.linear_fc1.weight": torch.zeros(64, 32)})
    with pytest.raises(ConversionError, match=r"missing \['decoder\.layers\.3\.mlp\.linear_mlp\.weight'\]"):
        from_mcore(arch, {k: v for k, v in mcore.items() if k != "decoder.layers.3.mlp.linear_mlp.weight"})
    with pytest.raises(ConversionError, match=r"unexpected key\(s\) \['output_layer\.weight'\]"):
        from_mcore(mixed_arch(tie=True), mcore)


def test_group_with_two_linear_members_is_refused():
    arch = dataclasses.replace(
        mixed_arch(), blocks=(BlockConfig(gqa(2), parallel(swiglu(16), FFN_LINEAR, FFN_LINEAR)),)
    )
    with pytest.raises(ArchConfigError, match=r"layers\[0\]\.ffn: .*1 swiglu and 2 linear members .*sum the linear members"):
        to_mcore(arch, reference_state(arch))
