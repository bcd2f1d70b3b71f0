"""Smoke test of benchmarks/bench_reference_model.py: runs end to end on a tiny config.

Checks that the figures are positive finite numbers and that our greedy tokens equal HF's
(and with/without the KV cache). No timing assertion: this machine's speed is not tested.
"""

from __future__ import annotations

import json
import math

import pytest

from benchmark_scripts import load_benchmark

pytest.importorskip("transformers")

TINY = [
    "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
    "--vocab", "128", "--train-batch", "2", "--train-seq", "16", "--train-steps", "1",
    "--decode-batch", "2", "--prompt-len", "8", "--new-tokens", "6",
    "--reps", "2", "--train-reps", "2", "--nocache-reps", "2", "--warmup", "1", "--threads", "1", "--quiet",
]  # fmt: skip


def test_benchmark_runs_and_agrees(tmp_path):
    out = tmp_path / "bench.json"
    res = load_benchmark("bench_reference_model").main([*TINY, "--json", str(out)])

    assert set(res["ratios"]) == {"train_ours_over_hf", "decode_ours_over_hf", "decode_cache_over_nocache"}
    assert set(res["paired_ratios"]) == set(res["ratios"])
    for name, v in [*res["ratios"].items(), *res["paired_ratios"].items()]:
        assert math.isfinite(v) and v > 0, (name, v)
    for section in ("train", "decode"):
        for name, d in res[section].items():
            assert math.isfinite(d["per_s"]) and d["per_s"] > 0, (section, name, d)
            assert len(d["times_s"]) == 2
    s = res["sanity"]
    assert s["greedy_tokens_equal_hf"], s
    assert s["greedy_tokens_equal_nocache"], s
    assert s["loss_abs_diff"] < 1e-4, s
    assert json.loads(out.read_text())["ratios"] == res["ratios"]


def test_benchmark_skip_nocache():
    res = load_benchmark("bench_reference_model").main([*TINY, "--skip-nocache", "--reps", "1", "--train-reps", "1", "--warmup", "0"])
    assert "decode_cache_over_nocache" not in res["ratios"]
    assert res["sanity"]["greedy_tokens_equal_nocache"] is None
    assert res["sanity"]["greedy_tokens_equal_hf"]
