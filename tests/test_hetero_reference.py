"""The heterogeneous reference model against independent definitions, layer by layer:
- every GQA layer (its own KV-head count) against transformers' `LlamaAttention`, RMSNorm and
  rotary embedding built for that layer's heads with the same weights;
- linear and no-op attention / FFN layers through a whole model against their definitions
  (REFERENCE.md §1: linear out = x + W·norm(x), no_op passes the residual through), computed
  by hand with plain torch ops from the state dict."""

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding

from nemo_plugins.arch import (
    ATTENTION_LINEAR,
    ATTENTION_NO_OP,
    FFN_LINEAR,
    FFN_NO_OP,
    BlockConfig,
    ModelConfig,
    RopeScaling,
    gqa,
    swiglu,
)
from nemo_plugins.model import HeteroLlamaForCausalLM

VOCAB, HIDDEN, HEADS = 61, 64, 8


def randomized(model: HeteroLlamaForCausalLM, seed: int) -> HeteroLlamaForCausalLM:
    """Weights large enough for peaked attention and visible linear terms; norms not all ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.15 * noise)
    return model.eval()


# ----------------------------------------------------------------------------- GQA layers vs transformers

LLAMA3_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8)


def gqa_model(rope_scaling) -> HeteroLlamaForCausalLM:
    blocks = (
        BlockConfig(gqa(8), swiglu(96)),
        BlockConfig(gqa(4), FFN_LINEAR),
        BlockConfig(ATTENTION_LINEAR, swiglu(32)),
        BlockConfig(gqa(2), FFN_NO_OP),
        BlockConfig(ATTENTION_NO_OP, swiglu(48)),
        BlockConfig(gqa(1), swiglu(64)),
    )
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS, blocks=blocks,
                      rope_theta=10000.0, rope_scaling=rope_scaling)  # fmt: skip
    return randomized(HeteroLlamaForCausalLM(cfg), seed=0)


def hf_attention_of(cfg: ModelConfig, layer):
    """transformers' input RMSNorm, LlamaAttention and rotary embedding for `layer`'s own KV
    heads, with the layer's weights (eager attention: softmax(QK^T/sqrt(d) + mask) V)."""
    rs = cfg.rope_scaling
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=layer.config.attention.num_kv_heads, head_dim=cfg.kv_channels,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
        rope_scaling=None if rs is None else {
            "rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor, "original_max_position_embeddings": rs.original_max_position_embeddings,
        },
        attention_bias=False, attn_implementation="eager",
    )  # fmt: skip
    attn = LlamaAttention(hf_cfg, layer_idx=0).eval()
    attn.load_state_dict(layer.self_attn.state_dict())  # q/k/v/o_proj: the same names and shapes
    norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
    norm.load_state_dict(layer.input_layernorm.state_dict())
    return norm, attn, LlamaRotaryEmbedding(hf_cfg)


def captured(model: HeteroLlamaForCausalLM, ids: torch.Tensor):
    """({layer: its input}, {GQA layer: its attention module's output}) of one whole-model forward."""
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].detach())))
        if layer.config.attention.kind == "gqa":
            hooks.append(layer.self_attn.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out.detach())))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return inputs, outputs


@pytest.mark.parametrize("rope_scaling", [None, LLAMA3_ROPE], ids=["rope", "llama3-rope"])
def test_each_gqa_layer_matches_transformers_llama_attention(rope_scaling):
    model = gqa_model(rope_scaling)
    B, T = 2, 40
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    inputs, outputs = captured(model, ids)
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None]  # additive mask for eager attention
    positions = torch.arange(T)[None].expand(B, T)
    checked = []
    for i, layer in enumerate(model.model.layers):
        if layer.config.attention.kind != "gqa":
            continue
        kv = layer.config.attention.num_kv_heads
        norm, attn, rotary = hf_attention_of(model.config, layer)
        x = inputs[i]  # the residual stream the whole model fed this layer
        with torch.no_grad():
            expected = x + attn(norm(x), position_embeddings=rotary(x, positions), attention_mask=causal)[0]
        torch.testing.assert_close(x + outputs[i], expected, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, i=i, kv=kv: f"layer {i} ({kv} KV heads): {m}")  # fmt: skip
        checked.append(kv)
    assert checked == [8, 4, 2, 1]


# ----------------------------------------------------------------------------- linear / no-op layers by hand


def rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def forward_by_hand(cfg: ModelConfig, state: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Logits of a model without GQA layers, from the definitions: attention linear
    x + W·norm(x), FFN linear x + W·norm(x), SwiGLU x + D(silu(G·n) * U·n), no_op x."""
    eps = cfg.rms_norm_eps
    x = state["model.embed_tokens.weight"][ids]
    for i, block in enumerate(cfg.blocks):
        p = f"model.layers.{i}."
        if block.attention.kind == "linear":
            x = x + rms_norm(x, state[p + "input_layernorm.weight"], eps) @ state[p + "self_attn.linear_attn.weight"].T
        else:
            assert block.attention.kind == "no_op" and not any(k.startswith(p + "self_attn") for k in state)
        if block.ffn.kind == "linear":
            x = x + rms_norm(x, state[p + "post_attention_layernorm.weight"], eps) @ state[p + "mlp.linear_mlp.weight"].T
        elif block.ffn.kind == "swiglu":
            n = rms_norm(x, state[p + "post_attention_layernorm.weight"], eps)
            gate, up = n @ state[p + "mlp.gate_proj.weight"].T, n @ state[p + "mlp.up_proj.weight"].T
            x = x + (gate * torch.sigmoid(gate) * up) @ state[p + "mlp.down_proj.weight"].T
        else:
            assert block.ffn.kind == "no_op" and not any(k.startswith(p + "mlp") for k in state)
    return rms_norm(x, state["model.norm.weight"], eps) @ state["lm_head.weight"].T


def test_linear_and_no_op_layers_through_a_whole_model_match_their_definitions():
    blocks = (
        BlockConfig(ATTENTION_LINEAR, FFN_LINEAR),
        BlockConfig(ATTENTION_NO_OP, swiglu(48)),
        BlockConfig(ATTENTION_LINEAR, FFN_NO_OP),
        BlockConfig(ATTENTION_NO_OP, FFN_NO_OP),
        BlockConfig(ATTENTION_NO_OP, FFN_LINEAR),
        BlockConfig(ATTENTION_LINEAR, swiglu(32)),
    )
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS, blocks=blocks)
    model = randomized(HeteroLlamaForCausalLM(cfg), seed=2)
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(3))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(ours, forward_by_hand(cfg, state, ids), rtol=1e-5, atol=1e-5)
    # each layer changes the output: a model that skipped one would not match
    for i in (0, 2, 4):
        layers = list(cfg.blocks)
        layers[i] = BlockConfig(ATTENTION_NO_OP, FFN_NO_OP)
        kept = {k: v for k, v in state.items() if not k.startswith(f"model.layers.{i}.")}
        assert not torch.allclose(ours, forward_by_hand(cfg.replace_blocks(layers), kept, ids), atol=1e-3)
