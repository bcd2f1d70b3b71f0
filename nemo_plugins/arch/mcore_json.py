"""megatron-core heterogeneous JSON <-> `ModelConfig`.

megatron-core's `HeterogeneousTransformerConfig` reads `block_configs` from this JSON
(`heterogeneous_layers_config_path` / `..._encoded_json`), each block being
`{"attention": {no_op, replace_with_linear, num_query_groups}, "mlp": {no_op,
replace_with_linear, ffn_hidden_size}}`, and ignores every other key. We write that native
form plus the global sizes under their TransformerConfig names, and keep `ffn_mult` inside
`mlp` (megatron-core drops unknown block keys) so an HF config survives the trip unchanged.

A parallel FFN group (FFN Fusion) is written as the one wide FFN megatron-core sees, with the
exact group under an extra `members` key that only `nemo_plugins.nemo.spec` reads:
`ffn_hidden_size` is the summed width of the swiglu members (a fused FFN is one wide FFN), and
each member is `{no_op, replace_with_linear, ffn_hidden_size[, ffn_mult]}`. Stock megatron-core
builds only the wide FFN from it, without a linear member; our layer spec adds that.
"""

from __future__ import annotations

from .config import (
    ArchConfigError,
    AttentionConfig,
    BlockConfig,
    FFNConfig,
    ModelConfig,
    RopeScaling,
    validate,
)
from .hf_json import ffn_mult_to_intermediate_size

_GLOBAL_KEYS = {
    "num_layers", "hidden_size", "num_attention_heads", "kv_channels", "vocab_size",
    "layernorm_epsilon", "rotary_base", "seq_length", "share_embeddings_and_output_weights",
    "normalization", "gated_linear_unit", "activation_func", "add_bias_linear",
    "position_embedding_type", "rope_scaling", "bos_token_id", "eos_token_id",
    "hf_passthrough", "block_configs",
}  # fmt: skip


def _mlp_to_json(f: FFNConfig) -> dict:
    """One FFN as a megatron-core `mlp` entry; a parallel group also lists its `members`."""
    if f.kind == "parallel":
        widths = [m.intermediate_size for m in f.members if m.kind == "swiglu"]
        return {
            "no_op": False,
            "replace_with_linear": not widths,
            "ffn_hidden_size": sum(widths) if widths else None,
            "members": [_mlp_to_json(m) for m in f.members],
        }
    mlp = {
        "no_op": f.kind == "no_op",
        "replace_with_linear": f.kind == "linear",
        "ffn_hidden_size": f.intermediate_size,
    }
    if f.ffn_mult is not None:
        mlp["ffn_mult"] = f.ffn_mult
    return mlp


def _mlp_from_json(where: str, m: dict, hidden: int) -> FFNConfig:
    """Inverse of `_mlp_to_json`; checks that a group's wide-FFN view matches its members."""
    if not isinstance(m, dict):
        raise ArchConfigError(f"{where}: expected a mapping, got {m!r}")
    extra = sorted(set(m) - {"no_op", "replace_with_linear", "ffn_hidden_size", "ffn_mult", "members"})
    if extra:
        raise ArchConfigError(f"{where}: unknown key(s) {extra}")
    if m.get("no_op") and m.get("replace_with_linear"):
        raise ArchConfigError(f"{where}: no_op and replace_with_linear are both true")
    if "members" in m:
        members = m["members"]
        if not isinstance(members, list):
            raise ArchConfigError(f"{where}.members={members!r}: expected a list of FFN entries")
        group = FFNConfig(
            "parallel",
            members=tuple(_mlp_from_json(f"{where}.members[{j}]", x, hidden) for j, x in enumerate(members)),
        )
        widths = [x.intermediate_size for x in group.members if x.kind == "swiglu"]
        want = {"no_op": False, "replace_with_linear": not widths, "ffn_hidden_size": sum(widths) if widths else None}
        for key, value in want.items():
            if m.get(key, False if key != "ffn_hidden_size" else None) != value:
                raise ArchConfigError(
                    f"{where}.{key}={m.get(key)!r} does not match its members (expected {value!r}: the "
                    "summed width of the swiglu members, replace_with_linear only without any)"
                )
        return group
    if m.get("no_op") or m.get("replace_with_linear"):
        return FFNConfig("no_op" if m.get("no_op") else "linear")
    size, mult = m.get("ffn_hidden_size"), m.get("ffn_mult")
    if mult is not None and ffn_mult_to_intermediate_size(mult, hidden) != size:
        raise ArchConfigError(
            f"{where}: ffn_mult={mult} gives {ffn_mult_to_intermediate_size(mult, hidden)} but ffn_hidden_size={size}"
        )
    return FFNConfig("swiglu", size, ffn_mult=mult)


def to_mcore_json(cfg: ModelConfig) -> dict:
    """Export as megatron-core heterogeneous JSON data."""
    validate(cfg)
    blocks = []
    for b in cfg.blocks:
        a, f = b.attention, b.ffn
        blocks.append(
            {
                "attention": {
                    "no_op": a.kind == "no_op",
                    "replace_with_linear": a.kind == "linear",
                    "num_query_groups": a.num_kv_heads,
                },
                "mlp": _mlp_to_json(f),
            }
        )
    rs = cfg.rope_scaling
    return {
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "kv_channels": cfg.kv_channels,
        "vocab_size": cfg.vocab_size,
        "layernorm_epsilon": cfg.rms_norm_eps,
        "rotary_base": cfg.rope_theta,
        "seq_length": cfg.max_position_embeddings,
        "share_embeddings_and_output_weights": cfg.tie_word_embeddings,
        "normalization": "RMSNorm",
        "gated_linear_unit": True,
        "activation_func": "silu",
        "add_bias_linear": False,
        "position_embedding_type": "rope",
        "rope_scaling": None
        if rs is None
        else {
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        },
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "hf_passthrough": dict(cfg.passthrough),
        "block_configs": blocks,
    }


def from_mcore_json(d: dict) -> ModelConfig:
    """Parse megatron-core heterogeneous JSON written by `to_mcore_json` (or by hand)."""
    if not isinstance(d, dict):
        raise ArchConfigError(f"mcore json: expected an object, got {type(d).__name__}")
    unknown = sorted(set(d) - _GLOBAL_KEYS)
    if unknown:
        raise ArchConfigError(f"mcore json: unknown key(s) {unknown}")
    for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "block_configs"):
        if key not in d:
            raise ArchConfigError(f"mcore json: missing key {key!r}")
    fixed = {"normalization": "RMSNorm", "gated_linear_unit": True, "activation_func": "silu",
             "add_bias_linear": False, "position_embedding_type": "rope"}  # fmt: skip
    for key, want in fixed.items():
        if d.get(key, want) != want:
            raise ArchConfigError(f"mcore json: {key}={d[key]!r} is not supported (expected {want!r})")
    bcs = d["block_configs"]
    if not isinstance(bcs, list) or len(bcs) != d["num_layers"]:
        n = len(bcs) if isinstance(bcs, list) else bcs
        raise ArchConfigError(f"block_configs has {n} entries but num_layers={d['num_layers']} (expected equal)")
    hidden = d["hidden_size"]
    blocks = []
    for i, b in enumerate(bcs):
        where = f"block_configs[{i}]"
        if not isinstance(b, dict) or set(b) - {"attention", "mlp"} or not {"attention", "mlp"} <= set(b):
            raise ArchConfigError(f"{where}: expected exactly the keys 'attention' and 'mlp', got {b!r}")
        a, m = b["attention"], b["mlp"]
        extra = sorted(set(a) - {"no_op", "replace_with_linear", "num_query_groups"})
        if extra:
            raise ArchConfigError(f"{where}.attention: unknown key(s) {extra}")
        if a.get("no_op") and a.get("replace_with_linear"):
            raise ArchConfigError(f"{where}.attention: no_op and replace_with_linear are both true")
        attn = (
            AttentionConfig("no_op") if a.get("no_op")
            else AttentionConfig("linear") if a.get("replace_with_linear")
            else AttentionConfig("gqa", a.get("num_query_groups"))
        )  # fmt: skip
        blocks.append(BlockConfig(attn, _mlp_from_json(f"{where}.mlp", m, hidden)))
    rs = d.get("rope_scaling")
    heads = d["num_attention_heads"]
    kv_channels = d.get("kv_channels")
    cfg = ModelConfig(
        vocab_size=d["vocab_size"],
        hidden_size=hidden,
        num_attention_heads=heads,
        blocks=tuple(blocks),
        head_dim=None if kv_channels in (None, hidden // heads) else kv_channels,
        rms_norm_eps=d.get("layernorm_epsilon", 1e-5),
        rope_theta=d.get("rotary_base", 10000.0),
        rope_scaling=None if rs is None else RopeScaling(**rs),
        max_position_embeddings=d.get("seq_length", 2048),
        tie_word_embeddings=bool(d.get("share_embeddings_and_output_weights", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        passthrough=dict(d.get("hf_passthrough") or {}),
    )
    return validate(cfg)
