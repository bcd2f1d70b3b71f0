"""Smoke tests of benchmarks/bench_rollouts.py and benchmarks/bench_reward_pool.py on tiny configs.

Checks that the figures are positive finite numbers, that our greedy rollout tokens equal HF's
on a left-padded batch, and that the reward pool agrees with the direct call without a single
failure. No timing assertion: this machine's speed is not tested.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
TINY_MODEL = [
    "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
    "--vocab", "128", "--prompt-len-min", "3", "--prompt-len-max", "9",
    "--reps", "2", "--warmup", "1", "--threads", "1", "--quiet",
]  # fmt: skip


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _positive(v) -> bool:
    return math.isfinite(v) and v > 0


def test_rollouts_benchmark_runs_and_agrees(tmp_path):
    pytest.importorskip("transformers")
    bench = _load("bench_rollouts")
    out = tmp_path / "rollouts.json"
    res = bench.main([*TINY_MODEL, "--workloads", "2x3x6", "1x2x4", "--json", str(out)])

    assert set(res["workloads"]) == {"2x3x6", "1x2x4"}
    for name, w in res["workloads"].items():
        assert w["generated_tokens"] == w["batch"] * w["new_tokens"], name
        for who in ("ours", "hf"):
            assert _positive(w[who]["tokens_per_s"]), (name, who, w[who])
            assert len(w[who]["times_s"]) == 2
        assert _positive(w["ratio_ours_over_hf"]) and _positive(w["paired_ratio_ours_over_hf"]), w
    s = res["sanity"]
    assert s["batch"] == 6 and len(s["prompt_lengths"]) > 1, s  # a left-padded batch of varied lengths
    assert s["greedy_tokens_equal"], s
    assert s["sampled_lengths_ok"], s
    assert bench.passed(res)
    assert json.loads(out.read_text())["sanity"] == res["sanity"]


def test_rollouts_workload_spec_is_checked():
    bench = _load("bench_rollouts")
    assert bench.parse_workload("8x8x64") == (8, 8, 64)
    with pytest.raises(SystemExit):
        bench.parse_args(["--workloads", "8x8"])


def test_reward_pool_benchmark_runs_without_failures(tmp_path):
    bench = _load("bench_reward_pool")
    out = tmp_path / "pool.json"
    args = ["--prompts", "2", "--samples", "3", "--reps", "2", "--warmup", "1", "--quiet", "--json", str(out)]
    res = bench.main(args)

    assert set(res["tasks"]) == {"world", "math"}
    for task, t in res["tasks"].items():
        assert t["batch"] == 6, task
        for who in ("direct", "sandboxed"):
            assert _positive(t[who]["samples_per_s"]), (task, who, t[who])
            assert t[who]["failures"] == {}, (task, who, t[who]["failures"])
        assert _positive(t["overhead_direct_over_sandboxed"]), t
        assert _positive(t["paired_overhead_direct_over_sandboxed"]), t
        assert t["pool_failures_lifetime"] == {}, t
        assert t["rewards_equal"], t
        assert _positive(t["startup"]["construct_s"]) and _positive(t["startup"]["first_batch_pool_s"]), t
    assert res["sanity"] == {"rewards_equal": True, "failures_zero": True}
    assert bench.passed(res)
    assert json.loads(out.read_text())["sanity"] == res["sanity"]


def test_reward_pool_batches_are_mixed_and_labelled_right():
    """The benchmark's completions are a real mix, and the rewards agree with how they were built."""
    bench = _load("bench_reward_pool")
    from nemo_plugins.rl.rewards import RewardConfig, combined_reward

    for task in bench.TASKS:
        items, labels = bench.make_batch(task, 8, 8, seed=3)
        assert len(items) == 64 and 0 < sum(labels) < 64, task
        got = [combined_reward(*item, config=RewardConfig(task=task)).accuracy == 1.0 for item in items]
        assert got == labels, task
