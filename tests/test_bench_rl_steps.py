"""Smoke tests of benchmarks/bench_rl_steps.py (one RL step of RLOO and RPO against GRPO's).

A tiny workload on the cached tiny parent (seconds): every figure is a positive finite number,
the three algorithms got the same requested token budget and actually sampled the same prompt
batch (and with the instructed prompt set the same token count), each trained on what its algorithm trains on, and the per-token ratios
are computed as stated (checked on hand-made rows). No timing assertion: this machine's speed
is not tested.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmark_scripts import load_benchmark

TINY = ["--prompts", "2", "--group-size", "3", "--max-new-tokens", "8", "--reps", "1", "--warmup", "0",
        "--reward-workers", "0", "--quiet"]  # fmt: skip


@pytest.mark.parametrize("prompt_set", ["instructed", "own"])
def test_bench_rl_steps_on_the_tiny_parent(prompt_set, parent_checkpoint, tmp_path):
    bench = load_benchmark("bench_rl_steps")
    out = tmp_path / "steps.json"
    res = bench.main([*TINY, "--prompt-set", prompt_set, "--json", str(out)])
    assert Path(res["model"]["source"]) == Path(parent_checkpoint)
    sequences, budget = 2 * 3, 2 * 3 * 8
    assert res["workload"]["budgets"] == {"grpo": budget, "rloo": budget, "rpo": budget}
    assert res["workload"]["requested_token_budget"] == budget
    for name, d in res["algorithms"].items():
        assert len(d["times_s"]) == 1 and all(math.isfinite(t) and t > 0 for t in d["times_s"]), (name, d)
        assert all(0 < n <= budget for n in d["generated_tokens"]), (name, d)
        assert math.isfinite(d["s_per_1k_tokens"]) and d["s_per_1k_tokens"] > 0, (name, d)
    for key in ("ratio_rloo_over_grpo", "paired_ratio_rloo_over_grpo", "ratio_rpo_over_grpo", "paired_ratio_rpo_over_grpo"):
        assert math.isfinite(res[key]) and res[key] > 0, (key, res[key])
    assert res["same_prompt_batch"] and bench.passed(res)  # the same problems drawn for all three
    if prompt_set == "instructed":  # the same prompts, seed and weights: the same completions
        assert res["same_generated_tokens"]
    a = res["algorithms"]
    assert a["rloo"]["seqs_trained"] == [sequences]  # RLOO trains every sequence
    assert all(s == 2 * p for s, p in zip(a["rpo"]["seqs_trained"], a["rpo"]["pairs"]))  # RPO: the pairs
    assert all(s <= sequences for s in a["grpo"]["seqs_trained"])
    assert "reward-model forward" in res["includes"]["rpo"] and "reference forward" in res["includes"]["rloo"]
    assert json.loads(out.read_text())["algorithms"]["rpo"]["times_s"] == a["rpo"]["times_s"]


def test_ratios_are_per_generated_token():
    bench = load_benchmark("bench_rl_steps")

    def rows(times, len_on):
        return [{"time_s": t, "len_on": len_on, "batch": "b", "seqs_trained": 4, "tokens_trained": 8, "updates": 1,
                 "pass_rate": 0.0} for t in times]  # fmt: skip

    s = bench.summarize({"grpo": rows([1.0, 2.0, 4.0], 10.0), "rloo": rows([3.0, 4.0, 4.0], 10.0),
                         "rpo": rows([2.0, 2.0, 2.0], 5.0)}, sequences=4)  # fmt: skip
    g = s["algorithms"]["grpo"]
    assert g["generated_tokens"] == [40, 40, 40] and g["median_s"] == 2.0
    assert g["s_per_1k_tokens"] == pytest.approx(1000 * 2.0 / 40)
    assert s["ratio_rloo_over_grpo"] == pytest.approx(4.0 / 2.0)
    assert s["paired_ratio_rloo_over_grpo"] == pytest.approx(2.0)  # median of 3/1, 4/2, 4/4
    assert s["ratio_rpo_over_grpo"] == pytest.approx((2.0 / 20) / (2.0 / 40))  # fewer tokens: dearer per token
    assert s["same_prompt_batch"] and not s["same_generated_tokens"]  # RPO generated 20 tokens, the others 40


@pytest.mark.parametrize("argv, message", [(["--group-size", "1"], "--group-size=1"), (["--reps", "0"], "--reps=0"),
                                           (["--temperature", "0"], "--temperature=0")])  # fmt: skip
def test_bad_arguments_are_named(argv, message, capsys):
    bench = load_benchmark("bench_rl_steps")
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err
