"""Smoke tests of benchmarks/bench_reward_pool.py on tiny configs (the rollout benchmark's are in
tests/test_bench_rollout.py).

Checks that the figures are positive finite numbers and that the reward pool agrees with the
direct call without a single failure. No timing assertion: this machine's speed is not tested.
"""

from __future__ import annotations

import json
import math

from benchmark_scripts import load_benchmark


def _positive(v) -> bool:
    return math.isfinite(v) and v > 0


def test_reward_pool_benchmark_runs_without_failures(tmp_path):
    bench = load_benchmark("bench_reward_pool")
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
    bench = load_benchmark("bench_reward_pool")
    from nemo_plugins.rl.rewards import RewardConfig, combined_reward

    for task in bench.TASKS:
        items, labels = bench.make_batch(task, 8, 8, seed=3)
        assert len(items) == 64 and 0 < sum(labels) < 64, task
        got = [combined_reward(*item, config=RewardConfig(task=task)).accuracy == 1.0 for item in items]
        assert got == labels, task
