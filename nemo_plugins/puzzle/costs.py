"""Cost model of block variants: exact accounting, roofline runtime for a named GPU, and
runtime measured on the current device.

Costs are per variant (the sub-block it replaces) at a target operating point: batch size,
prompt (prefill) length, generated (decode) length and dtype. A roofline estimate takes the
larger of compute time (FLOPs / the GPU's peak FLOP/s in that dtype) and memory time (bytes
read / bandwidth), so a CPU machine can plan for a GPU target. Whole-model budgets subtract
the costs of what no variant touches (embeddings, final norm, lm_head) before the search
(`non_block_stats`).
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..arch import accounting as acc
from ..arch.config import ATTENTION_NO_OP, FFN_NO_OP, BlockConfig, ModelConfig
from ..model.llama import Block
from .library import Variant

MIB = 1024 * 1024


@dataclass(frozen=True)
class HardwareProfile:
    """A GPU for the roofline: memory bandwidth and peak FLOP/s per compute dtype. The peaks are
    dense (NVIDIA's datasheets print 2:4-sparsity figures, twice these, marked "*"); "fp32" is
    plain FP32 (torch's default matmul does not use TF32)."""

    name: str
    memory_bandwidth: float  # bytes/s
    peak_flops: dict[str, float] = field(hash=False)  # dense FLOP/s by dtype: fp32, bf16, fp16, fp8

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype` (any name `accounting.DTYPE_BYTES` knows)."""
        return self.peak_flops[_COMPUTE_DTYPE.get(dtype, dtype)]


_COMPUTE_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# Dense peaks from NVIDIA's datasheets (figures marked "* with sparsity" halved):
# - H100 Tensor Core GPU datasheet, H100 SXM: FP32 67 TFLOPS; BF16 and FP16 Tensor Core 1,979*;
#   FP8 Tensor Core 3,958*; GPU memory bandwidth 3.35 TB/s.
# - H200 Tensor Core GPU datasheet, H200 SXM: the same compute (the same GH100 chip); 4.8 TB/s.
# - A100 Tensor Core GPU datasheet, A100 80GB SXM: FP32 19.5 TFLOPS; BF16 and FP16 Tensor Core
#   312 (624*); 2,039 GB/s. The A100 has no FP8 Tensor Cores: FP8 weights are computed at 16 bits
#   (weight-only FP8), so fp8 gets the 16-bit peak there.
_HOPPER_FLOPS = {"fp32": 67e12, "bf16": 989.5e12, "fp16": 989.5e12, "fp8": 1979e12}
_A100_FLOPS = {"fp32": 19.5e12, "bf16": 312e12, "fp16": 312e12, "fp8": 312e12}

PROFILES = {
    "h100-sxm": HardwareProfile("h100-sxm", 3.35e12, _HOPPER_FLOPS),
    "h200": HardwareProfile("h200", 4.8e12, _HOPPER_FLOPS),
    "a100-80gb": HardwareProfile("a100-80gb", 2.039e12, _A100_FLOPS),
}


@dataclass
class CostConfig:
    batch_size: int = 8
    prefill_len: int = 64
    decode_len: int = 64
    dtype: str = "bf16"
    hardware: str = "h100-sxm"
    measure: bool = True  # also time each variant on this machine
    measure_reps: int = 10  # timing rounds (the paired parent-vs-child check runs twice as many)
    # CPU threads while timing (0: torch's default). One thread keeps timings stable on a small
    # shared machine, where a multithreaded op stalls whenever another process takes a core.
    threads: int = 1

    def __post_init__(self):
        if self.hardware not in PROFILES:
            raise ValueError(f"costs.hardware={self.hardware!r}: expected one of {sorted(PROFILES)}")
        acc.dtype_bytes(self.dtype)
        if min(self.batch_size, self.prefill_len, self.decode_len, self.measure_reps) <= 0:
            raise ValueError("costs.batch_size, prefill_len, decode_len and measure_reps must be positive")
        if self.threads < 0:
            raise ValueError(f"costs.threads={self.threads}: expected 0 (torch's default) or a positive count")


def subblock_config(v: Variant) -> BlockConfig:
    """The part of the layer a variant stands for (the other half is a no-op)."""
    if v.subblock == "attention":
        return BlockConfig(v.block.attention, FFN_NO_OP)
    if v.subblock == "ffn":
        return BlockConfig(ATTENTION_NO_OP, v.block.ffn)
    return v.block


def roofline_seconds(flops: float, bytes_moved: float, hw: HardwareProfile, dtype: str) -> float:
    """The larger of compute time (at the peak of `dtype` on `hw`) and memory time."""
    return max(flops / hw.flops(dtype), bytes_moved / hw.memory_bandwidth)


def block_stats(parent: ModelConfig, block: BlockConfig, cfg: CostConfig) -> dict[str, float]:
    """Accounting and roofline costs of one (sub-)block at the operating point."""
    hw, nbytes = PROFILES[cfg.hardware], acc.dtype_bytes(cfg.dtype)
    params = acc.block_params(parent, block)
    kv_per_token = acc.kv_cache_bytes_per_token(parent, block, cfg.dtype)
    context = cfg.prefill_len + cfg.decode_len
    kv_bytes = kv_per_token * cfg.batch_size * context
    prefill_flops = cfg.batch_size * cfg.prefill_len * acc.block_flops_per_token(parent, block, cfg.prefill_len, "prefill")
    # decode: every generated token reads the weights and the cache so far (mean context)
    mean_ctx = cfg.prefill_len + (cfg.decode_len + 1) / 2
    decode_flops_step = cfg.batch_size * acc.block_flops_per_token(parent, block, int(mean_ctx), "decode")
    decode_bytes_step = params * nbytes + kv_per_token * cfg.batch_size * mean_ctx
    prefill_bytes = params * nbytes + kv_per_token * cfg.batch_size * cfg.prefill_len
    prefill_ms = 1e3 * roofline_seconds(prefill_flops, prefill_bytes, hw, cfg.dtype)
    decode_ms = 1e3 * cfg.decode_len * roofline_seconds(decode_flops_step, decode_bytes_step, hw, cfg.dtype)
    return {
        "num_params": params,
        "weight_mib": params * nbytes / MIB,
        "kv_cache_mib": kv_bytes / MIB,
        "memory_mib": (params * nbytes + kv_bytes) / MIB,
        "kv_heads": block.attention.num_kv_heads or 0,
        "num_attention_layers": int(block.attention.kind == "gqa"),
        "prefill_flops": prefill_flops,
        "decode_flops": decode_flops_step * cfg.decode_len,
        "prefill_ms": prefill_ms,
        "decode_ms": decode_ms,
        "runtime_ms": prefill_ms + decode_ms,
    }


def variant_stats(parent: ModelConfig, v: Variant, cfg: CostConfig) -> dict[str, float]:
    return block_stats(parent, subblock_config(v), cfg)


def non_block_stats(parent: ModelConfig, cfg: CostConfig) -> dict[str, float]:
    """Costs no variant touches: embeddings, final norm, lm_head (roofline at the same point)."""
    hw, nbytes = PROFILES[cfg.hardware], acc.dtype_bytes(cfg.dtype)
    params = acc.non_block_params(parent)
    head_flops = 2 * parent.vocab_size * parent.hidden_size
    prefill_ms = 1e3 * roofline_seconds(cfg.batch_size * cfg.prefill_len * head_flops, params * nbytes, hw, cfg.dtype)
    decode_ms = 1e3 * cfg.decode_len * roofline_seconds(cfg.batch_size * head_flops, params * nbytes, hw, cfg.dtype)
    return {
        "num_params": params, "weight_mib": params * nbytes / MIB, "kv_cache_mib": 0.0,
        "memory_mib": params * nbytes / MIB, "prefill_ms": prefill_ms, "decode_ms": decode_ms,
        "runtime_ms": prefill_ms + decode_ms,
    }  # fmt: skip


def _layer_from(cfg: ModelConfig, index: int, block: BlockConfig, attention_from: Block | None, ffn_from: Block | None) -> Block:
    """A layer `block` whose sub-blocks are borrowed (not copied) from existing blocks."""
    with torch.device("meta"):
        layer = Block(cfg, block, index)
    layer.input_layernorm = attention_from.input_layernorm if attention_from is not None else None
    layer.self_attn = attention_from.self_attn if attention_from is not None else None
    layer.post_attention_layernorm = ffn_from.post_attention_layernorm if ffn_from is not None else None
    layer.mlp = ffn_from.mlp if ffn_from is not None else None
    return layer


@contextmanager
def swapped_layers(model, layers: list[Block]):
    """Temporarily put each of `layers` at its index in `model` (and its config in model.config)."""
    cfg, own = model.config, model.model.layers
    old = {layer.index: own[layer.index] for layer in layers}
    blocks = list(cfg.blocks)
    for layer in layers:
        blocks[layer.index] = layer.config
        own[layer.index] = layer
    model.config = cfg.replace_blocks(blocks)
    try:
        yield model
    finally:
        for i, layer in old.items():
            own[i] = layer
        model.config = cfg


def timed_forward(model, ids: torch.Tensor, cache, clock: dict[tuple[int, str], float]) -> torch.Tensor:
    """The model's forward with a KV cache (the logits of `HeteroLlamaForCausalLM.forward`),
    adding each sub-block's wall time to clock[(layer, "attention" | "ffn")]."""
    sync = ids.device.type == "cuda"
    x, rope, mask = model.prepare(ids, cache=cache)
    for i, layer in enumerate(model.model.layers):
        for part in ("attention", "ffn"):
            if sync:
                torch.cuda.synchronize()
            start = time.perf_counter()
            x = layer.attention(x, rope, mask, cache) if part == "attention" else layer.ffn(x)
            if sync:
                torch.cuda.synchronize()
            clock[(i, part)] = clock.get((i, part), 0.0) + time.perf_counter() - start
    cache.length += ids.shape[1]
    return model.lm_head(model.model.norm(x))


def timing_layouts(variants: list[Variant]) -> list[dict[int, tuple[Variant, ...]]]:
    """Few whole-model layouts that together hold every variant: layout k takes the k-th
    variant of every group (cycling through shorter groups). Values: the variants making up
    each layer (an attention and an FFN variant in decoupled mode, one block variant coupled)."""
    by_group: dict[str, list[Variant]] = {}
    for v in variants:
        by_group.setdefault(v.group, []).append(v)
    layouts = []
    for k in range(max(len(vs) for vs in by_group.values())):
        layers: dict[int, list[Variant]] = {}
        for vs in by_group.values():
            layers.setdefault(vs[0].layer, []).append(vs[k % len(vs)])
        layouts.append({i: tuple(vs) for i, vs in layers.items()})
    return layouts


def layout_layer(parent, index: int, parts: tuple[Variant, ...], modules: dict) -> Block:
    own = parent.model.layers[index]
    attention = ffn = None  # (config, module holding it)
    for v in parts:
        if v.subblock in ("attention", "block"):
            attention = (v.block.attention, modules[v])
        if v.subblock in ("ffn", "block"):
            ffn = (v.block.ffn, modules[v])
    attention = attention or (own.config.attention, own)
    ffn = ffn or (own.config.ffn, own)
    block = BlockConfig(attention[0], ffn[0])
    return _layer_from(
        parent.config, index, block,
        attention[1] if block.attention.kind != "no_op" else None, ffn[1] if block.ffn.kind != "no_op" else None,
    )  # fmt: skip


@torch.no_grad()
def measure_in_model(parent, variants: list[Variant], modules: dict, cfg: CostConfig, seed: int = 0) -> dict:
    """Per-variant prefill and decode time (ms), each sub-block timed where it runs: inside a
    whole model at the operating point.

    A block timed alone keeps its weights in cache and is dominated by different overheads
    than in the real model; timed in place, the child's time is close to the parent's
    non-block time plus the sum of its chosen variants' times. The variants are arranged
    into a few whole-model layouts (every layout holds one variant of every group) that run
    in a shuffled order each round; each figure is the median over `cfg.measure_reps` rounds.

    Returns {"variants": {variant key: {"measured_prefill_ms", "measured_decode_ms"}},
    "non_block": the same two figures for everything outside the blocks (embedding, RoPE
    tables, final norm, lm_head, the layer loop)}.
    """
    with cpu_threads(cfg.threads):
        return _measure_in_model(parent, variants, modules, cfg, seed)


def _measure_in_model(parent, variants: list[Variant], modules: dict, cfg: CostConfig, seed: int) -> dict:
    layouts = timing_layouts(variants)
    ids = torch.randint(0, parent.config.vocab_size, (cfg.batch_size, cfg.prefill_len), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(parent.lm_head.weight.device)
    rounds: list[dict[str, list[tuple[float, float]]]] = []  # per round: {variant key or "": samples}
    rng = random.Random(seed)
    order = list(range(len(layouts)))
    for rep in range(cfg.measure_reps + 1):  # round 0 warms up
        rng.shuffle(order)
        for k in order:
            layers = [layout_layer(parent, i, parts, modules) for i, parts in layouts[k].items()]
            with swapped_layers(parent, layers):
                prefill: dict = {}
                decode: dict = {}
                cache = parent.new_cache(cfg.batch_size, cfg.prefill_len + cfg.decode_len)
                t0 = time.perf_counter()
                timed_forward(parent, ids, cache, prefill)
                t1 = time.perf_counter()
                for _ in range(cfg.decode_len):
                    timed_forward(parent, ids[:, -1:], cache, decode)
                t2 = time.perf_counter()
            if rep == 0:
                continue
            if k == order[0]:
                rounds.append({})
            got = rounds[-1]
            got.setdefault(NON_BLOCK, []).append((t1 - t0 - sum(prefill.values()), t2 - t1 - sum(decode.values())))
            for i, parts in layouts[k].items():
                for v in parts:
                    keys = [(i, "attention"), (i, "ffn")] if v.subblock == "block" else [(i, v.subblock)]
                    got.setdefault(v.key, []).append((sum(prefill[x] for x in keys), sum(decode[x] for x in keys)))
    # per round, a variant in several layouts (a short group cycles) counts with its mean
    per_round = [{key: _mean_ms(t) for key, t in r.items()} for r in rounds]
    keys = [v.key for v in variants]
    return {
        "variants": {key: _median_over(per_round, key) for key in keys},
        "non_block": _median_over(per_round, NON_BLOCK),
        "rounds": per_round,
    }


NON_BLOCK = "non_block"
PHASES = ("prefill", "decode")


def _mean_ms(samples: list[tuple[float, float]]) -> dict[str, float]:
    return {f"measured_{ph}_ms": 1e3 * sum(s[j] for s in samples) / len(samples) for j, ph in enumerate(PHASES)}


def _median_over(rounds: list[dict], key: str) -> dict[str, float]:
    return {f"measured_{ph}_ms": _median([r[key][f"measured_{ph}_ms"] for r in rounds]) for ph in PHASES}


def predicted_speedup(measured: dict, parent_choice: dict[str, str], choice: dict[str, str]) -> dict[str, float]:
    """Parent/child time ratio per phase from a `measure_in_model` result: per round, the
    non-block time plus the chosen variants' times, for parent and for child; the median
    over rounds of their ratio (pairing within a round cancels drift in machine speed)."""
    out = {}
    for ph in PHASES:
        key = f"measured_{ph}_ms"
        ratios = []
        for r in measured["rounds"]:
            def total(c: dict[str, str]) -> float:
                return r[NON_BLOCK][key] + sum(r[f"{g}/{n}"][key] for g, n in c.items())

            ratios.append(total(parent_choice) / total(choice))
        out[ph] = _median(ratios)
    return out


@contextmanager
def cpu_threads(n: int):
    """Run with `n` torch CPU threads (0: leave torch's setting), restored afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time_model(model, ids: torch.Tensor, cfg: CostConfig) -> tuple[float, float]:
    """Seconds for the prefill of `ids` and for `decode_len` single-token steps after it."""
    device = ids.device
    cache = model.new_cache(ids.shape[0], ids.shape[1] + cfg.decode_len)
    step = ids[:, -1:]
    _sync(device)
    t0 = time.perf_counter()
    model(ids, cache=cache)
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(cfg.decode_len):
        model(step, cache=cache)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1


@torch.no_grad()
def measure_speedup(parent, child, cfg: CostConfig, reps: int | None = None, seed: int = 0) -> dict[str, dict[str, float]]:
    """Whole parent vs whole child at the operating point, timed in alternation: per phase the
    median times (ms) and the median over rounds of the paired ratio parent/child (each
    round's two runs back to back, so drift in machine speed cancels)."""
    with cpu_threads(cfg.threads):
        ids = torch.randint(0, parent.config.vocab_size, (cfg.batch_size, cfg.prefill_len), generator=torch.Generator().manual_seed(seed))
        ids = ids.to(parent.lm_head.weight.device)
        _time_model(parent, ids, cfg), _time_model(child, ids, cfg)  # warm-up
        pairs = [(_time_model(parent, ids, cfg), _time_model(child, ids, cfg)) for _ in range(reps or cfg.measure_reps)]
    return {
        ph: {
            "parent_ms": 1e3 * _median([p[j] for p, _ in pairs]),
            "child_ms": 1e3 * _median([c[j] for _, c in pairs]),
            "speedup": _median([p[j] / c[j] for p, c in pairs]),
        }
        for j, ph in enumerate(PHASES)
    }
