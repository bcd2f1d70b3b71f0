"""The Puzzle block library: which cheaper variants each parent layer gets, and their names.

Decoupled mode (the default, as in the paper) builds attention variants with the parent's FFN
and FFN variants with the parent's attention, so a layer contributes one group per sub-block
("3.attention", "3.ffn") and the search picks one variant from each: the library grows with the
sum, not the product, of the two lists. Coupled mode has one group per layer ("3") whose
variants are the (attention, FFN) pairs.

Variant names are stable strings used in files and the MIP library: attention `gqa_kv{n}`,
`linear`, `no_op`; FFN `swiglu_{width}`, `linear`, `no_op`; coupled `"{attention}+{ffn}"`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..arch.config import (
    ATTENTION_LINEAR,
    ATTENTION_NO_OP,
    FFN_LINEAR,
    FFN_NO_OP,
    AttentionConfig,
    BlockConfig,
    FFNConfig,
    ModelConfig,
)

SUBBLOCKS = ("attention", "ffn")


@dataclass
class LibraryConfig:
    """Which variants to build for every layer (the parent's own sub-blocks are always included)."""

    kv_heads: list[int] = field(default_factory=lambda: [2, 1])  # fewer KV heads than the parent
    attention_linear: bool = True
    attention_no_op: bool = True
    ffn_fractions: list[float] = field(default_factory=lambda: [0.67, 0.33])  # of the parent's width
    ffn_multiple: int = 256  # widths round to the nearest multiple (256 keeps children nemotron-nas expressible)
    ffn_linear: bool = True
    ffn_no_op: bool = True
    mode: str = "decoupled"  # decoupled | coupled

    def __post_init__(self):
        if self.mode not in ("decoupled", "coupled"):
            raise ValueError(f"library.mode={self.mode!r}: expected 'decoupled' or 'coupled'")
        bad = [k for k in self.kv_heads if not isinstance(k, int) or k <= 0]
        if bad:
            raise ValueError(f"library.kv_heads: {bad[0]!r} is not a positive integer")
        bad = [f for f in self.ffn_fractions if not 0 < f <= 1]
        if bad:
            raise ValueError(f"library.ffn_fractions: {bad[0]!r} is not in (0, 1]")
        if self.ffn_multiple <= 0:
            raise ValueError(f"library.ffn_multiple={self.ffn_multiple}: expected a positive integer")


@dataclass(frozen=True)
class Variant:
    """One candidate for one group: `block` is the full layer it stands for (in decoupled mode
    the other sub-block is the parent's), `subblock` says which part it replaces."""

    layer: int
    subblock: str  # "attention" | "ffn" | "block" (coupled)
    name: str
    block: BlockConfig

    @property
    def group(self) -> str:
        return str(self.layer) if self.subblock == "block" else f"{self.layer}.{self.subblock}"

    @property
    def key(self) -> str:
        return f"{self.group}/{self.name}"


def attention_name(a: AttentionConfig) -> str:
    return f"gqa_kv{a.num_kv_heads}" if a.kind == "gqa" else a.kind


def ffn_name(f: FFNConfig) -> str:
    return f"swiglu_{f.intermediate_size}" if f.kind == "swiglu" else f.kind


def _round_to_multiple(n: float, multiple: int) -> int:
    """Nearest multiple (at least one multiple): 0.67 x 768 -> 512 with multiple 256."""
    return max(multiple, int(math.floor(n / multiple + 0.5)) * multiple)


def attention_options(parent: ModelConfig, layer: int, cfg: LibraryConfig) -> list[AttentionConfig]:
    """The parent's attention first, then fewer KV heads (divisors only), linear, no-op."""
    pa = parent.blocks[layer].attention
    options = [pa]
    if pa.kind == "gqa":
        heads = parent.num_attention_heads
        for kv in sorted(set(cfg.kv_heads), reverse=True):
            if kv < pa.num_kv_heads and pa.num_kv_heads % kv == 0 and heads % kv == 0:
                options.append(AttentionConfig("gqa", kv))
    if cfg.attention_linear and pa.kind != "linear":
        options.append(ATTENTION_LINEAR)
    if cfg.attention_no_op and pa.kind != "no_op":
        options.append(ATTENTION_NO_OP)
    return options


def ffn_options(parent: ModelConfig, layer: int, cfg: LibraryConfig) -> list[FFNConfig]:
    """The parent's FFN first, then narrower widths (rounded, deduplicated), linear, no-op."""
    pf = parent.blocks[layer].ffn
    options = [pf]
    if pf.kind == "swiglu":
        widths = {_round_to_multiple(pf.intermediate_size * f, cfg.ffn_multiple) for f in cfg.ffn_fractions}
        for w in sorted(widths, reverse=True):
            if w < pf.intermediate_size:
                options.append(FFNConfig("swiglu", w))
    if cfg.ffn_linear and pf.kind != "linear":
        options.append(FFN_LINEAR)
    if cfg.ffn_no_op and pf.kind != "no_op":
        options.append(FFN_NO_OP)
    return options


def build_variants(parent: ModelConfig, cfg: LibraryConfig) -> list[Variant]:
    """Every variant of every layer, parent variants first within each group."""
    variants = []
    for i, pb in enumerate(parent.blocks):
        attns, ffns = attention_options(parent, i, cfg), ffn_options(parent, i, cfg)
        if cfg.mode == "decoupled":
            variants += [Variant(i, "attention", attention_name(a), BlockConfig(a, pb.ffn)) for a in attns]
            variants += [Variant(i, "ffn", ffn_name(f), BlockConfig(pb.attention, f)) for f in ffns]
        else:
            variants += [
                Variant(i, "block", f"{attention_name(a)}+{ffn_name(f)}", BlockConfig(a, f)) for a in attns for f in ffns
            ]
    return variants


def is_parent_variant(parent: ModelConfig, v: Variant) -> bool:
    return v.block == parent.blocks[v.layer]


def groups(parent: ModelConfig, cfg: LibraryConfig) -> list[str]:
    if cfg.mode == "coupled":
        return [str(i) for i in range(parent.num_layers)]
    return [f"{i}.{s}" for i in range(parent.num_layers) for s in SUBBLOCKS]


def child_config(parent: ModelConfig, choices: dict[str, str], variants: list[Variant]) -> ModelConfig:
    """The child architecture for a choice of one variant name per group."""
    by_key = {v.key: v for v in variants}
    blocks = []
    for i, pb in enumerate(parent.blocks):
        if f"{i}" in choices:
            blocks.append(by_key[f"{i}/{choices[str(i)]}"].block)
            continue
        try:
            a = by_key[f"{i}.attention/{choices[f'{i}.attention']}"].block.attention
            f = by_key[f"{i}.ffn/{choices[f'{i}.ffn']}"].block.ffn
        except KeyError as e:
            raise ValueError(f"choices: no variant for {e.args[0]!r}") from None
        blocks.append(BlockConfig(a, f))
    return parent.replace_blocks(blocks)
