"""Cost model of block variants: exact accounting, roofline runtime for a named GPU, and
runtime measured on the current device.

Costs are per variant (the sub-block it replaces) at a target operating point: batch size,
prompt (prefill) length, generated (decode) length and dtype. A roofline estimate takes the
larger of compute time (FLOPs / peak) and memory time (bytes read / bandwidth), so a CPU
machine can plan for a GPU target. Whole-model budgets subtract the costs of what no variant
touches (embeddings, final norm, lm_head) before the search (`non_block_stats`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..arch import accounting as acc
from ..arch.config import ATTENTION_NO_OP, FFN_NO_OP, BlockConfig, ModelConfig
from ..model.llama import Block, KVCache, rope_cos_sin, rope_inv_freq
from .library import Variant

MIB = 1024 * 1024


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    memory_bandwidth: float  # bytes/s
    peak_flops: float  # dense FLOP/s at 16-bit precision


PROFILES = {
    "h100-sxm": HardwareProfile("h100-sxm", 3.35e12, 989e12),
    "h200": HardwareProfile("h200", 4.8e12, 989e12),
    "a100-80gb": HardwareProfile("a100-80gb", 2.039e12, 312e12),
}


@dataclass
class CostConfig:
    batch_size: int = 8
    prefill_len: int = 64
    decode_len: int = 64
    dtype: str = "bf16"
    hardware: str = "h100-sxm"
    measure: bool = True  # also time each variant on this machine
    measure_reps: int = 5

    def __post_init__(self):
        if self.hardware not in PROFILES:
            raise ValueError(f"costs.hardware={self.hardware!r}: expected one of {sorted(PROFILES)}")
        acc.dtype_bytes(self.dtype)
        if min(self.batch_size, self.prefill_len, self.decode_len, self.measure_reps) <= 0:
            raise ValueError("costs.batch_size, prefill_len, decode_len and measure_reps must be positive")


def subblock_config(v: Variant) -> BlockConfig:
    """The part of the layer a variant stands for (the other half is a no-op)."""
    if v.subblock == "attention":
        return BlockConfig(v.block.attention, FFN_NO_OP)
    if v.subblock == "ffn":
        return BlockConfig(ATTENTION_NO_OP, v.block.ffn)
    return v.block


def roofline_seconds(flops: float, bytes_moved: float, hw: HardwareProfile) -> float:
    return max(flops / hw.peak_flops, bytes_moved / hw.memory_bandwidth)


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
    prefill_ms = 1e3 * roofline_seconds(prefill_flops, params * nbytes + kv_per_token * cfg.batch_size * cfg.prefill_len, hw)
    decode_ms = 1e3 * cfg.decode_len * roofline_seconds(decode_flops_step, decode_bytes_step, hw)
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
    prefill_ms = 1e3 * roofline_seconds(cfg.batch_size * cfg.prefill_len * head_flops, params * nbytes, hw)
    decode_ms = 1e3 * cfg.decode_len * roofline_seconds(cfg.batch_size * head_flops, params * nbytes, hw)
    return {
        "num_params": params, "weight_mib": params * nbytes / MIB, "kv_cache_mib": 0.0,
        "memory_mib": params * nbytes / MIB, "prefill_ms": prefill_ms, "decode_ms": decode_ms,
        "runtime_ms": prefill_ms + decode_ms,
    }  # fmt: skip


@torch.no_grad()
def measure_block(parent: ModelConfig, block: Block, cfg: CostConfig, device=None) -> dict[str, float]:
    """Median wall time (ms) of one (sub-)block on this device: prefill of the prompt, and the
    whole decode (`decode_len` single-token steps against a growing KV cache)."""
    device = device or next(iter(block.parameters()), torch.empty(0)).device
    h, B = parent.hidden_size, cfg.batch_size
    one = parent.replace_blocks([block.config])
    inv_freq = rope_inv_freq(parent.kv_channels, parent.rope_theta, parent.rope_scaling).to(device)
    index, block.index = block.index, 0
    x = torch.randn(B, cfg.prefill_len, h, device=device)
    step = torch.randn(B, 1, h, device=device)
    positions = torch.arange(cfg.prefill_len + cfg.decode_len, device=device)[None]

    prefill_rope = rope_cos_sin(inv_freq, positions[:, : cfg.prefill_len], x.dtype)

    def prefill(cache=None):
        y = block(x, prefill_rope, (None, True), cache)
        if cache is not None:
            cache.length += cfg.prefill_len
        return y

    # The model computes RoPE tables once per forward for all layers: keep that out of the timing.
    step_ropes = [rope_cos_sin(inv_freq, positions[:, p : p + 1], x.dtype) for p in range(cfg.prefill_len, positions.shape[1])]

    def decode():
        cache = KVCache(one, B, cfg.prefill_len + cfg.decode_len, x.dtype, device)
        prefill(cache)
        start = time.perf_counter()
        for rope in step_ropes:
            block(step, rope, (None, False), cache)
            cache.length += 1
        _sync(device)
        return time.perf_counter() - start

    try:
        prefill()  # warm-up
        times_p, times_d = [], []
        for _ in range(cfg.measure_reps):
            _sync(device)
            start = time.perf_counter()
            prefill()
            _sync(device)
            times_p.append(time.perf_counter() - start)
            times_d.append(decode())
    finally:
        block.index = index
    return {"measured_prefill_ms": 1e3 * _median(times_p), "measured_decode_ms": 1e3 * _median(times_d)}


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def measure_model(model, cfg: CostConfig) -> dict[str, float]:
    """Median wall time (ms) of a whole model at the operating point: prefill of a
    [batch, prefill_len] prompt, and `decode_len` single-token steps with the KV cache."""
    device = model.lm_head.weight.device
    ids = torch.randint(0, model.config.vocab_size, (cfg.batch_size, cfg.prefill_len), device=device)
    step = ids[:, -1:]

    def run() -> tuple[float, float]:
        cache = model.new_cache(cfg.batch_size, cfg.prefill_len + cfg.decode_len)
        _sync(device)
        t0 = time.perf_counter()
        model(ids, cache=cache)
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(cfg.decode_len):
            model(step, cache=cache)
        _sync(device)
        return t1 - t0, time.perf_counter() - t1

    run()  # warm-up
    times = [run() for _ in range(cfg.measure_reps)]
    return {
        "measured_prefill_ms": 1e3 * _median([p for p, _ in times]),
        "measured_decode_ms": 1e3 * _median([d for _, d in times]),
    }
