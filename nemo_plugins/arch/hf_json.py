"""Hugging Face `config.json` <-> `ModelConfig`.

Reads plain Llama configs (`LlamaForCausalLM`) and heterogeneous nemotron-nas configs
(`DeciLMForCausalLM` with `block_configs`). Writes nemotron-nas for heterogeneous models
and, on request or when every layer is the same, plain Llama. Released configs round-trip
key-for-key; anything nemotron-nas cannot express raises `ArchConfigError` naming the layer.
"""

from __future__ import annotations

import math
from typing import Any

from .config import (
    ArchConfigError,
    AttentionConfig,
    BlockConfig,
    MAX_DIM,
    FFNConfig,
    ModelConfig,
    RopeScaling,
    validate,
)

NAS_ARCHITECTURE = "DeciLMForCausalLM"
NAS_MODEL_TYPE = "nemotron-nas"
LLAMA_ARCHITECTURE = "LlamaForCausalLM"
FFN_ROUNDING = 256

# Keys that describe the math; everything else at the top level is carried through as is.
_MODEL_KEYS = {
    "architectures", "model_type", "vocab_size", "hidden_size", "num_attention_heads",
    "num_hidden_layers", "num_key_value_heads", "intermediate_size", "head_dim", "rms_norm_eps",
    "rope_theta", "rope_scaling", "max_position_embeddings", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "hidden_act", "attention_bias", "mlp_bias", "block_configs",
}  # fmt: skip
# Optional nemotron-nas attention features this project does not implement: allowed only at
# their "off" value.
_ATTN_OFF = {
    "sparsify": None, "window_length": None, "num_sink_tokens": None,
    "unshifted_sink": False, "use_prefill_window_in_sink_attention": False,
}  # fmt: skip
_FFN_OFF = {"sparsify": None}


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """nemotron-nas rule: int(2·mult·hidden/3) rounded up to a multiple of 256."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return -(-size // FFN_ROUNDING) * FFN_ROUNDING


def intermediate_size_to_ffn_mult(size: int, hidden_size: int) -> float | None:
    """The simplest multiplier that maps back to `size` exactly, or None if none does."""
    if size % FFN_ROUNDING:
        return None
    exact = 3 * size / (2 * hidden_size)
    for digits in range(1, 12):
        m = round(exact, digits)
        if ffn_mult_to_intermediate_size(m, hidden_size) == size:
            return m
    return exact if ffn_mult_to_intermediate_size(exact, hidden_size) == size else None


def _rope_from_hf(rs: dict | None) -> RopeScaling | None:
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ArchConfigError(f"rope_scaling={rs!r}: expected a mapping or null")
    rtype = rs.get("rope_type", rs.get("type"))
    if rtype in (None, "default"):
        return None
    if rtype != "llama3":
        raise ArchConfigError(f"rope_scaling.rope_type={rtype!r}: only 'llama3' (or none) is supported")
    unknown = sorted(set(rs) - {"rope_type", "type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"})
    if unknown:
        raise ArchConfigError(f"rope_scaling: unknown key(s) {unknown}")
    try:
        return RopeScaling(
            factor=float(rs["factor"]),
            low_freq_factor=float(rs["low_freq_factor"]),
            high_freq_factor=float(rs["high_freq_factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ArchConfigError(f"rope_scaling: missing key {e.args[0]!r} for rope_type 'llama3'") from None


def _rope_to_hf(rs: RopeScaling | None) -> dict | None:
    if rs is None:
        return None
    return {
        "factor": rs.factor,
        "high_freq_factor": rs.high_freq_factor,
        "low_freq_factor": rs.low_freq_factor,
        "original_max_position_embeddings": rs.original_max_position_embeddings,
        "rope_type": rs.rope_type,
    }


def _expect(d: dict, key: str, where: str, kind: type | tuple, allow_none: bool = False):
    if key not in d:
        raise ArchConfigError(f"{where}: missing key {key!r}")
    v = d[key]
    if v is None and allow_none:
        return v
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise ArchConfigError(f"{where}.{key}={v!r}: expected {getattr(kind, '__name__', kind)}")
    return v


def _subblock_from_hf(where: str, d, size_key: str, off_values: dict) -> tuple[str, object]:
    """Checks shared by HF attention and ffn entries.

    Returns ("no_op" | "linear" | "full", d[size_key]); the size must be null unless "full".
    """
    if not isinstance(d, dict):
        raise ArchConfigError(f"{where}: expected a mapping, got {d!r}")
    unknown = sorted(set(d) - {"no_op", "replace_with_linear", size_key, *off_values})
    if unknown:
        raise ArchConfigError(f"{where}: unknown key(s) {unknown}")
    for key, off in off_values.items():
        if d.get(key, off) != off:
            raise ArchConfigError(f"{where}.{key}={d[key]!r}: not supported (expected {off!r})")
    no_op, linear = bool(d.get("no_op", False)), bool(d.get("replace_with_linear", False))
    size = d.get(size_key)
    if no_op and linear:
        raise ArchConfigError(f"{where}: no_op and replace_with_linear are both true")
    if no_op or linear:
        if size is not None:
            raise ArchConfigError(f"{where}.{size_key}={size!r}: must be null when no_op or replace_with_linear")
        return ("no_op" if no_op else "linear"), None
    return "full", size


def _attention_from_hf(i: int, a: dict, num_heads: int) -> AttentionConfig:
    where = f"block_configs[{i}].attention"
    kind, g = _subblock_from_hf(where, a, "n_heads_in_group", _ATTN_OFF)
    if kind != "full":
        return AttentionConfig(kind)
    if not isinstance(g, int) or isinstance(g, bool) or g <= 0 or num_heads % g:
        raise ArchConfigError(
            f"{where}.n_heads_in_group={g!r}: expected a positive divisor of num_attention_heads={num_heads}"
        )
    return AttentionConfig("gqa", num_heads // g)


def _ffn_from_hf(i: int, f: dict, hidden: int) -> FFNConfig:
    where = f"block_configs[{i}].ffn"
    kind, m = _subblock_from_hf(where, f, "ffn_mult", _FFN_OFF)
    if kind != "full":
        return FFNConfig(kind)
    if not isinstance(m, (int, float)) or isinstance(m, bool) or not math.isfinite(m) or m <= 0:
        raise ArchConfigError(f"{where}.ffn_mult={m!r}: expected a positive number")
    size = ffn_mult_to_intermediate_size(m, hidden)
    if size > MAX_DIM:
        raise ArchConfigError(f"{where}.ffn_mult={m!r}: gives an FFN of {size:,} units at hidden size {hidden}, "
                              f"above the {MAX_DIM:,} a config may give")  # fmt: skip
    return FFNConfig("swiglu", size, ffn_mult=m)


def from_hf_config(d: dict) -> ModelConfig:
    """Parse an HF Llama or nemotron-nas `config.json` dict into a validated `ModelConfig`."""
    if not isinstance(d, dict):
        raise ArchConfigError(f"config.json: expected a JSON object, got {type(d).__name__}")
    hidden = _expect(d, "hidden_size", "config", int)
    heads = _expect(d, "num_attention_heads", "config", int)
    n_layers = _expect(d, "num_hidden_layers", "config", int)
    _expect(d, "vocab_size", "config", int)
    if d.get("hidden_act", "silu") != "silu":
        raise ArchConfigError(f"hidden_act={d['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key, False):
            raise ArchConfigError(f"{key}={d[key]!r}: biases are not supported (expected false)")
    if hidden <= 0 or heads <= 0:
        raise ArchConfigError(f"hidden_size={hidden}, num_attention_heads={heads}: expected positive integers")

    if "block_configs" in d:
        bcs = d["block_configs"]
        if not isinstance(bcs, list):
            raise ArchConfigError(f"block_configs: expected a list, got {type(bcs).__name__}")
        if len(bcs) != n_layers:
            raise ArchConfigError(
                f"block_configs has {len(bcs)} entries but num_hidden_layers={n_layers} (expected equal)"
            )
        blocks = []
        for i, b in enumerate(bcs):
            if not isinstance(b, dict):
                raise ArchConfigError(f"block_configs[{i}]: expected a mapping, got {b!r}")
            unknown = sorted(set(b) - {"attention", "ffn"})
            if unknown:
                raise ArchConfigError(f"block_configs[{i}]: unknown key(s) {unknown} (expected 'attention', 'ffn')")
            for key in ("attention", "ffn"):
                if key not in b:
                    raise ArchConfigError(f"block_configs[{i}]: missing key {key!r}")
            blocks.append(BlockConfig(_attention_from_hf(i, b["attention"], heads), _ffn_from_hf(i, b["ffn"], hidden)))
    else:
        kv = d.get("num_key_value_heads") or heads
        inter = _expect(d, "intermediate_size", "config", int)
        blocks = [BlockConfig(AttentionConfig("gqa", kv), FFNConfig("swiglu", inter))] * n_layers

    head_dim = d.get("head_dim")
    if head_dim is not None and head_dim * heads == hidden:
        head_dim = None  # the default; keep the canonical form
    cfg = ModelConfig(
        vocab_size=d["vocab_size"],
        hidden_size=hidden,
        num_attention_heads=heads,
        blocks=tuple(blocks),
        head_dim=head_dim,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=d.get("rope_theta", 10000.0),
        rope_scaling=_rope_from_hf(d.get("rope_scaling")),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        passthrough={k: v for k, v in d.items() if k not in _MODEL_KEYS},
    )
    return validate(cfg)


def is_plain_llama(cfg: ModelConfig) -> bool:
    """True when every layer is the same GQA + SwiGLU block (expressible as LlamaForCausalLM)."""
    first = cfg.blocks[0]
    return (
        first.attention.kind == "gqa"
        and first.ffn.kind == "swiglu"
        and all(
            b.attention == first.attention and b.ffn.intermediate_size == first.ffn.intermediate_size
            and b.ffn.kind == "swiglu"
            for b in cfg.blocks
        )
    )


def _common_hf(cfg: ModelConfig) -> dict[str, Any]:
    out = dict(cfg.passthrough)
    out.update(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_hidden_layers=cfg.num_layers,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        rope_scaling=_rope_to_hf(cfg.rope_scaling),
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )
    return out


def _ffn_to_hf(i: int, f: FFNConfig, hidden: int) -> dict:
    base = {"no_op": False, "replace_with_linear": False, "sparsify": None, "ffn_mult": None}
    if f.kind == "no_op":
        return {**base, "no_op": True}
    if f.kind == "linear":
        return {**base, "replace_with_linear": True}
    if f.kind == "parallel":
        raise ArchConfigError(
            f"layers[{i}].ffn is a parallel group of {len(f.members)} FFNs: nemotron-nas has no parallel FFNs; "
            "merge the group into one FFN (FFN fusion) before exporting"
        )
    m = f.ffn_mult
    if m is None or ffn_mult_to_intermediate_size(m, hidden) != f.intermediate_size:
        m = intermediate_size_to_ffn_mult(f.intermediate_size, hidden)
    if m is None:
        raise ArchConfigError(
            f"layers[{i}].ffn.intermediate_size={f.intermediate_size}: not expressible in nemotron-nas, whose widths "
            f"are int(2*ffn_mult*{hidden}/3) rounded up to a multiple of {FFN_ROUNDING}"
        )
    return {**base, "ffn_mult": m}


def to_hf_config(cfg: ModelConfig, architecture: str = "auto") -> dict:
    """Export as HF `config.json` data.

    architecture: "nemotron-nas" (DeciLMForCausalLM), "llama" (LlamaForCausalLM; only for
    homogeneous models) or "auto" (llama when every layer is the same, else nemotron-nas).
    """
    validate(cfg)
    if architecture == "auto":
        architecture = "llama" if is_plain_llama(cfg) else "nemotron-nas"
    if architecture not in ("llama", "nemotron-nas"):
        raise ArchConfigError(f"architecture={architecture!r}: expected 'llama', 'nemotron-nas' or 'auto'")
    out = _common_hf(cfg)
    if architecture == "llama":
        if not is_plain_llama(cfg):
            raise ArchConfigError(
                "architecture='llama' needs every layer to be the same GQA + SwiGLU block; "
                "this model is heterogeneous (use 'nemotron-nas')"
            )
        b = cfg.blocks[0]
        out.update(
            architectures=[LLAMA_ARCHITECTURE],
            model_type="llama",
            num_key_value_heads=b.attention.num_kv_heads,
            intermediate_size=b.ffn.intermediate_size,
            head_dim=cfg.kv_channels,
        )
        return out
    if cfg.head_dim is not None and cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        raise ArchConfigError(
            f"head_dim={cfg.head_dim}: nemotron-nas derives head_dim as hidden_size/num_attention_heads="
            f"{cfg.hidden_size / cfg.num_attention_heads:g}"
        )
    blocks = []
    for i, b in enumerate(cfg.blocks):
        a = b.attention
        attn = {
            "n_heads_in_group": cfg.num_attention_heads // a.num_kv_heads if a.kind == "gqa" else None,
            "no_op": a.kind == "no_op",
            "replace_with_linear": a.kind == "linear",
            **_ATTN_OFF,
        }
        blocks.append({"attention": attn, "ffn": _ffn_to_hf(i, b.ffn, cfg.hidden_size)})
    out.update(
        architectures=[NAS_ARCHITECTURE],
        model_type=NAS_MODEL_TYPE,
        num_key_value_heads=None,
        intermediate_size=None,
        block_configs=blocks,
    )
    return out


def nas_compatible(cfg: ModelConfig) -> list[str]:
    """Reasons `cfg` cannot be written as nemotron-nas (empty when it can)."""
    try:
        to_hf_config(cfg, "nemotron-nas")
    except ArchConfigError as e:
        return [str(e)]
    return []
