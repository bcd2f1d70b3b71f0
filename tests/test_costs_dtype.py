"""The roofline's compute time follows the dtype: FP8 runs at twice the dense 16-bit peak on
Hopper (H100 / H200 datasheets), so compute-bound FP8 work takes half the bf16 time."""

import pytest

from nemo_plugins.arch import accounting as acc
from nemo_plugins.arch.config import ATTENTION_NO_OP, BlockConfig, homogeneous, swiglu
from nemo_plugins.puzzle.costs import PROFILES, CostConfig, block_stats

LLAMA_70B = homogeneous(vocab_size=128256, hidden_size=8192, num_layers=2, num_attention_heads=64, num_kv_heads=8,
                        intermediate_size=28672, rope_theta=500000.0)  # fmt: skip
FFN = BlockConfig(ATTENTION_NO_OP, swiglu(28672))  # one 70B FFN sub-block


def test_dense_peaks_per_dtype():
    h100 = PROFILES["h100-sxm"]
    assert h100.flops("bf16") == h100.flops("bfloat16") == h100.flops("fp16") == 989.5e12
    assert h100.flops("fp8") == 2 * h100.flops("bf16") == 1979e12
    assert PROFILES["h200"].flops("fp8") == 1979e12 and PROFILES["h200"].memory_bandwidth == 4.8e12
    assert PROFILES["a100-80gb"].flops("fp8") == PROFILES["a100-80gb"].flops("bf16") == 312e12  # no FP8 cores
    assert h100.flops("fp32") == 67e12 < h100.flops("bf16")


@pytest.mark.parametrize("hardware", ["h100-sxm", "h200"])
def test_fp8_halves_compute_bound_prefill(hardware):
    def stats(dtype):
        return block_stats(LLAMA_70B, FFN, CostConfig(batch_size=256, prefill_len=1024, decode_len=1, dtype=dtype,
                                                      hardware=hardware))  # fmt: skip

    bf16, fp8 = stats("bf16"), stats("fp8")
    assert bf16["prefill_ms"] == pytest.approx(1e3 * bf16["prefill_flops"] / 989.5e12, rel=1e-3)  # compute-bound
    assert fp8["prefill_flops"] == bf16["prefill_flops"]
    assert fp8["prefill_ms"] == pytest.approx(bf16["prefill_ms"] / 2)


def test_fp8_batch_256_ffn_decode_is_memory_bound_on_h100():
    """At batch 256 an FP8 FFN does 512 FLOPs per weight byte, below the H100's FP8 ridge
    (1979e12 / 3.35e12 = 591): the step takes the weight-read time, not the 16-bit compute time."""
    cfg = CostConfig(batch_size=256, prefill_len=1024, decode_len=8, dtype="fp8", hardware="h100-sxm")
    s = block_stats(LLAMA_70B, FFN, cfg)
    weight_bytes = acc.block_params(LLAMA_70B, FFN) * 1
    assert s["decode_ms"] == pytest.approx(1e3 * cfg.decode_len * weight_bytes / 3.35e12)
    assert s["decode_ms"] < 1e3 * s["decode_flops"] / 989.5e12  # what the 16-bit peak would have said
