"""Per-layer architecture description of a heterogeneous Llama.

One `ModelConfig` feeds every engine (reference model, NeMo adapter) and every export
format (HF nemotron-nas, megatron-core heterogeneous JSON). A layer is a `BlockConfig`:
an attention sub-block (GQA with its own KV heads, a linear replacement, or a no-op) followed
by an FFN sub-block (SwiGLU with its own width, a linear replacement, a no-op, or a parallel
group of FFNs that share one normalized input and whose outputs are summed).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

AttentionKind = Literal["gqa", "linear", "no_op"]
FFNKind = Literal["swiglu", "linear", "no_op", "parallel"]
ATTENTION_KINDS = ("gqa", "linear", "no_op")
FFN_KINDS = ("swiglu", "linear", "no_op", "parallel")


class ArchConfigError(ValueError):
    """A configuration that is malformed or cannot be expressed in a target format."""


@dataclass(frozen=True)
class AttentionConfig:
    """Attention sub-block: `gqa` with `num_kv_heads`, `linear` (x + W·norm(x)) or `no_op`."""

    kind: AttentionKind = "gqa"
    num_kv_heads: int | None = None

    @property
    def has_kv_cache(self) -> bool:
        return self.kind == "gqa"


@dataclass(frozen=True)
class FFNConfig:
    """FFN sub-block.

    `swiglu` has `intermediate_size`; `linear` is x + W·norm(x); `no_op` is the identity;
    `parallel` sums its `members` (swiglu or linear) applied to one shared normalized input.
    `ffn_mult` records the HF nemotron-nas multiplier a swiglu width came from, so that a
    config read from HF is written back bit-for-bit (several multipliers round to one width).
    """

    kind: FFNKind = "swiglu"
    intermediate_size: int | None = None
    members: tuple[FFNConfig, ...] = ()
    # Provenance, not architecture: two FFNs of the same width compare equal.
    ffn_mult: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class BlockConfig:
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (`rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"


@dataclass(frozen=True)
class ModelConfig:
    """A whole heterogeneous Llama: global sizes plus one `BlockConfig` per layer."""

    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    blocks: tuple[BlockConfig, ...]
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    # Top-level keys of a source config.json that do not affect the math (auto_map,
    # torch_dtype, ...): carried along so an HF config round-trips unchanged.
    passthrough: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def kv_channels(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def replace_blocks(self, blocks) -> ModelConfig:
        return dataclasses.replace(self, blocks=tuple(blocks))


# ----------------------------------------------------------------------------- builders


def gqa(num_kv_heads: int) -> AttentionConfig:
    return AttentionConfig("gqa", num_kv_heads)


def swiglu(intermediate_size: int) -> FFNConfig:
    return FFNConfig("swiglu", intermediate_size)


def parallel(*members: FFNConfig) -> FFNConfig:
    return FFNConfig("parallel", members=tuple(members))


ATTENTION_NO_OP = AttentionConfig("no_op")
ATTENTION_LINEAR = AttentionConfig("linear")
FFN_NO_OP = FFNConfig("no_op")
FFN_LINEAR = FFNConfig("linear")


def homogeneous(
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_attention_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    **kwargs,
) -> ModelConfig:
    """A plain Llama (every layer the same) in this schema."""
    block = BlockConfig(gqa(num_kv_heads), swiglu(intermediate_size))
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        blocks=(block,) * num_layers,
        **kwargs,
    )


# ----------------------------------------------------------------------------- validation


# The largest size of any one dimension a config may give (vocabulary, widths, positions): far
# above any real Llama (405B: FFN 53,248, vocabulary 128,256), far below the sizes that overflow
# the parameter and byte counts.
MAX_DIM = 2**24


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _dim_ok(v) -> bool:
    return _is_int(v) and 0 < v <= MAX_DIM


def _check_ffn(where: str, f: FFNConfig, inside_parallel: bool = False) -> None:
    if f.kind not in FFN_KINDS:
        raise ArchConfigError(f"{where}.kind={f.kind!r}: unknown FFN kind (expected one of {', '.join(FFN_KINDS)})")
    if f.kind == "swiglu":
        if not _dim_ok(f.intermediate_size):
            raise ArchConfigError(
                f"{where}.intermediate_size={f.intermediate_size!r}: expected a positive integer up to {MAX_DIM:,} "
                "for a swiglu FFN"
            )
    elif f.intermediate_size is not None:
        raise ArchConfigError(
            f"{where}.intermediate_size={f.intermediate_size!r}: must be null for a {f.kind} FFN"
        )
    if f.kind != "swiglu" and f.ffn_mult is not None:
        raise ArchConfigError(f"{where}.ffn_mult={f.ffn_mult!r}: must be null for a {f.kind} FFN")
    if f.kind == "parallel":
        if inside_parallel:
            raise ArchConfigError(f"{where}: a parallel group cannot contain another parallel group")
        if len(f.members) < 2:
            raise ArchConfigError(
                f"{where}.members: a parallel group needs at least 2 members, got {len(f.members)}"
            )
        for i, m in enumerate(f.members):
            if m.kind not in ("swiglu", "linear"):
                raise ArchConfigError(
                    f"{where}.members[{i}].kind={m.kind!r}: parallel members must be swiglu or linear"
                )
            _check_ffn(f"{where}.members[{i}]", m, inside_parallel=True)
    elif f.members:
        raise ArchConfigError(f"{where}.members: only a parallel FFN has members (kind is {f.kind!r})")


def validate(cfg: ModelConfig) -> ModelConfig:
    """Check a config; raise `ArchConfigError` naming the layer, field, value and expectation."""
    for name in ("vocab_size", "hidden_size", "num_attention_heads", "max_position_embeddings"):
        v = getattr(cfg, name)
        if not _dim_ok(v):
            raise ArchConfigError(f"{name}={v!r}: expected a positive integer up to {MAX_DIM:,}")
    if cfg.head_dim is None and cfg.hidden_size % cfg.num_attention_heads:
        raise ArchConfigError(
            f"hidden_size={cfg.hidden_size} is not divisible by num_attention_heads={cfg.num_attention_heads}"
            " (set head_dim explicitly)"
        )
    if cfg.head_dim is not None and (not _is_int(cfg.head_dim) or cfg.head_dim <= 0 or cfg.head_dim % 2):
        raise ArchConfigError(f"head_dim={cfg.head_dim!r}: expected a positive even integer")
    if cfg.kv_channels % 2:
        raise ArchConfigError(f"head_dim={cfg.kv_channels}: RoPE needs an even head dimension")
    if not isinstance(cfg.rms_norm_eps, (int, float)) or cfg.rms_norm_eps <= 0:
        raise ArchConfigError(f"rms_norm_eps={cfg.rms_norm_eps!r}: expected a positive number")
    if not isinstance(cfg.rope_theta, (int, float)) or cfg.rope_theta <= 0:
        raise ArchConfigError(f"rope_theta={cfg.rope_theta!r}: expected a positive number")
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        if rs.rope_type != "llama3":
            raise ArchConfigError(f"rope_scaling.rope_type={rs.rope_type!r}: only 'llama3' is supported")
        if rs.factor <= 0 or rs.low_freq_factor <= 0 or rs.high_freq_factor <= rs.low_freq_factor:
            raise ArchConfigError(
                f"rope_scaling={dataclasses.asdict(rs)}: expected factor > 0 and high_freq_factor > low_freq_factor > 0"
            )
    if not cfg.blocks:
        raise ArchConfigError("blocks: a model needs at least one layer")
    for i, b in enumerate(cfg.blocks):
        a, where = b.attention, f"layers[{i}].attention"
        if a.kind not in ATTENTION_KINDS:
            raise ArchConfigError(
                f"{where}.kind={a.kind!r}: unknown attention kind (expected one of {', '.join(ATTENTION_KINDS)})"
            )
        if a.kind == "gqa":
            h = cfg.num_attention_heads
            if not _is_int(a.num_kv_heads) or a.num_kv_heads <= 0 or h % a.num_kv_heads:
                divisors = [d for d in range(1, h + 1) if h % d == 0]
                raise ArchConfigError(
                    f"{where}.num_kv_heads={a.num_kv_heads!r}: must be a positive divisor of "
                    f"num_attention_heads={h} (one of {divisors})"
                )
        elif a.num_kv_heads is not None:
            raise ArchConfigError(f"{where}.num_kv_heads={a.num_kv_heads!r}: must be null for {a.kind} attention")
        _check_ffn(f"layers[{i}].ffn", b.ffn)
    return cfg


# ----------------------------------------------------------------------------- plain dict (YAML) schema

_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)} - {"passthrough", "blocks"} | {"layers"}


def _reject_unknown(where: str, d: dict, allowed: set[str]) -> None:
    if not isinstance(d, dict):
        raise ArchConfigError(f"{where}: expected a mapping, got {type(d).__name__} {d!r}")
    extra = sorted(set(d) - allowed)
    if extra:
        raise ArchConfigError(f"{where}: unknown key(s) {extra} (allowed: {sorted(allowed)})")


def _ffn_from_dict(where: str, d: dict) -> FFNConfig:
    _reject_unknown(where, d, {"kind", "intermediate_size", "members", "ffn_mult"})
    members = tuple(_ffn_from_dict(f"{where}.members[{i}]", m) for i, m in enumerate(d.get("members") or ()))
    return FFNConfig(d.get("kind", "swiglu"), d.get("intermediate_size"), members, d.get("ffn_mult"))


def _ffn_to_dict(f: FFNConfig) -> dict:
    out: dict[str, Any] = {"kind": f.kind}
    if f.intermediate_size is not None:
        out["intermediate_size"] = f.intermediate_size
    if f.ffn_mult is not None:
        out["ffn_mult"] = f.ffn_mult
    if f.members:
        out["members"] = [_ffn_to_dict(m) for m in f.members]
    return out


def to_dict(cfg: ModelConfig) -> dict:
    """The project's own schema as plain data (YAML/JSON friendly)."""
    out = {k: getattr(cfg, k) for k in sorted(_MODEL_KEYS - {"layers"})}
    out["rope_scaling"] = dataclasses.asdict(cfg.rope_scaling) if cfg.rope_scaling else None
    out["layers"] = [
        {
            "attention": {"kind": b.attention.kind, **({"num_kv_heads": b.attention.num_kv_heads} if b.attention.num_kv_heads is not None else {})},
            "ffn": _ffn_to_dict(b.ffn),
        }
        for b in cfg.blocks
    ]
    return out


def from_dict(d: dict) -> ModelConfig:
    """Parse (and validate) the project's own schema; unknown keys are errors."""
    _reject_unknown("model", d, _MODEL_KEYS)
    if "layers" not in d or not isinstance(d["layers"], list):
        raise ArchConfigError("model.layers: expected a list with one entry per layer")
    blocks = []
    for i, layer in enumerate(d["layers"]):
        _reject_unknown(f"layers[{i}]", layer, {"attention", "ffn"})
        a = layer.get("attention", {})
        _reject_unknown(f"layers[{i}].attention", a, {"kind", "num_kv_heads"})
        blocks.append(
            BlockConfig(
                AttentionConfig(a.get("kind", "gqa"), a.get("num_kv_heads")),
                _ffn_from_dict(f"layers[{i}].ffn", layer.get("ffn", {})),
            )
        )
    kwargs = {k: v for k, v in d.items() if k != "layers"}
    rs = kwargs.get("rope_scaling")
    if rs is not None:
        _reject_unknown("rope_scaling", rs, {f.name for f in dataclasses.fields(RopeScaling)})
        kwargs["rope_scaling"] = RopeScaling(**rs)
    missing = [k for k in ("vocab_size", "hidden_size", "num_attention_heads") if k not in kwargs]
    if missing:
        raise ArchConfigError(f"model: missing required key(s) {missing}")
    return validate(ModelConfig(blocks=tuple(blocks), **kwargs))
