"""Smoke tests of benchmarks/bench_rollout.py (the rollout engine against transformers' generate).

Tiny workloads, a few seconds each: on the cached tiny parent and on a random HF Llama directory
written by transformers (`--model`), with one workload and with a list of them, the figures are
positive finite numbers, both sides count the same tokens for the same greedy completions, those
completions agree token for token, and the script run as a user runs it exits 0. Bad workload
specs and a failed sanity check are refused. No timing assertion: this machine's speed is not tested.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark_scripts import load_benchmark

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_rollout.py"
TINY = ["--batch-size", "4", "--reps", "2", "--warmup", "0", "--quiet"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from hf_llama import write_hf_llama

    return write_hf_llama(tmp_path_factory.mktemp("bench") / "hf", layers=1)


def _check(w: dict, prompts: int, group: int, max_new: int):
    """One workload's figures: positive, finite, counted alike on both sides, greedy identical."""
    assert (w["prompts"], w["group"], w["max_new_tokens"], w["sequences"]) == (prompts, group, max_new, prompts * group)
    for name, s in w["settings"].items():
        for side in ("engine", "hf"):
            d = s[side]
            assert len(d["times_s"]) == 2 and all(t > 0 for t in d["times_s"]), (name, side, d)
            assert all(0 < n <= prompts * group * max_new for n in d["tokens"]), (name, side, d)
            assert math.isfinite(d["tokens_per_s"]) and d["tokens_per_s"] > 0, (name, side, d)
        for key in ("ratio_engine_over_hf", "paired_ratio_engine_over_hf"):
            assert math.isfinite(s[key]) and s[key] > 0, (name, key, s[key])
    greedy = w["settings"]["greedy"]
    assert greedy["engine"]["tokens"] == greedy["hf"]["tokens"]  # same completions, counted the same way
    assert w["sanity"]["greedy"]["all_equal"], w["sanity"]
    assert w["sanity"]["greedy"]["rows"] == prompts * group


def test_bench_rollout_on_the_tiny_parent(parent_checkpoint, tmp_path):
    bench = load_benchmark("bench_rollout")
    out = tmp_path / "rollout.json"
    res = bench.main([*TINY, "--workloads", "3x2x24", "--json", str(out)])
    assert Path(res["model"]["source"]) == Path(parent_checkpoint)
    assert list(res["workloads"]) == ["3x2x24"]
    w = res["workloads"]["3x2x24"]
    _check(w, prompts=3, group=2, max_new=24)
    # The tiny parent answers within 24 tokens for some rows: EOS ends them before the limit.
    assert w["settings"]["greedy"]["engine"]["tokens"][0] < 6 * 24
    assert bench.passed(res)
    assert json.loads(out.read_text())["workloads"]["3x2x24"]["sanity"] == w["sanity"]


def test_bench_rollout_profile_splits_out_the_matrix_multiplications(parent_checkpoint):
    bench = load_benchmark("bench_rollout")
    res = bench.main([*TINY, "--workloads", "2x2x8", "--profile"])
    prof = res["workloads"]["2x2x8"]["profile"]
    for side in ("engine", "hf"):
        p = prof[side]
        assert p["gemm_s"] > 0 and p["attention_s"] > 0 and p["gemm_s"] + p["attention_s"] < p["total_s"], prof
    e = prof["engine"]
    assert prof["ceiling_engine_over_hf"] == pytest.approx(prof["hf"]["total_s"] / (e["gemm_s"] + e["attention_s"]))
    assert "profile 2x2x8, greedy" in bench.format_report(res)
    with pytest.raises(SystemExit):
        bench.parse_args(["--profile", "--device", "cuda"])


def test_bench_rollout_workload_list_on_a_hf_directory(hf_dir, tmp_path):
    bench = load_benchmark("bench_rollout")
    out = tmp_path / "rollout.json"
    argv = [*TINY, "--model", str(hf_dir), "--workloads", "3x2x6", "1x3x4", "--thinking", "off", "--json", str(out)]
    res = bench.main(argv)
    assert res["model"]["source"] == str(hf_dir.resolve()) and res["model"]["layers"] == 1
    assert res["env"]["device"] == "cpu" and res["env"]["dtype"] == "fp32" and res["env"]["threads"] == 1
    assert list(res["workloads"]) == ["3x2x6", "1x3x4"]
    _check(res["workloads"]["3x2x6"], prompts=3, group=2, max_new=6)
    _check(res["workloads"]["1x3x4"], prompts=1, group=3, max_new=4)
    lengths = res["workloads"]["3x2x6"]["prompt_lengths"]
    assert lengths[0] < lengths[1], lengths  # the chunks are left-padded batches of varied lengths
    assert bench.passed(res)
    assert json.loads(out.read_text())["workloads"].keys() == res["workloads"].keys()


def test_bench_rollout_script_exits_zero(hf_dir, tmp_path):
    """Run as a user runs it: the exit status is the sanity check's, the report is printed."""
    out = tmp_path / "rollout.json"
    argv = ["--model", str(hf_dir), "--workloads", "2x2x4", "--batch-size", "4", "--reps", "1", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(BENCH), *argv], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "greedy completions engine == HF token for token: yes" in proc.stdout, proc.stdout
    assert "goal >= 1.5x" in proc.stdout, proc.stdout
    assert json.loads(out.read_text())["workloads"]["2x2x4"]["sanity"]["greedy"]["all_equal"] is True


def test_passed_fails_on_a_greedy_mismatch_or_a_bad_figure():
    bench = load_benchmark("bench_rollout")
    side = {"tokens_per_s": 100.0}
    setting = {"engine": side, "hf": side, "ratio_engine_over_hf": 1.0, "paired_ratio_engine_over_hf": 1.0}

    def result(all_equal: bool, ratio: float = 1.0) -> dict:
        s = {**setting, "ratio_engine_over_hf": ratio}
        return {"workloads": {"1x1x1": {"sanity": {"greedy": {"all_equal": True}}, "settings": {"greedy": setting}},
                              "2x1x1": {"sanity": {"greedy": {"all_equal": all_equal}}, "settings": {"greedy": s}}}}  # fmt: skip

    assert bench.passed(result(True))
    assert not bench.passed(result(False))
    assert not bench.passed(result(True, ratio=float("nan")))
    assert not bench.passed(result(True, ratio=0.0))
    assert not bench.passed({"workloads": {}})


def test_goal_needs_both_ratios():
    bench = load_benchmark("bench_rollout")
    assert bench.goal_met({"ratio_engine_over_hf": 1.5, "paired_ratio_engine_over_hf": 1.6})
    assert not bench.goal_met({"ratio_engine_over_hf": 1.7, "paired_ratio_engine_over_hf": 1.49})


def test_workload_specs_are_checked(hf_dir):
    bench = load_benchmark("bench_rollout")
    assert bench.parse_workload("16x8x64") == (16, 8, 64)
    assert bench.parse_args(["--workloads", "2x4x32", "8X8X64"]).workloads == [(2, 4, 32), (8, 8, 64)]
    for bad in ("8x8", "8x8xa", "0x8x64"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--workloads", bad])
    with pytest.raises(SystemExit, match="251 prompts, but the tiny world has only [0-9]+ held-out questions"):
        bench.main(["--model", str(hf_dir), "--workloads", "251x1x1", "--quiet"])


def test_counting_stops_after_the_first_stop_id():
    bench = load_benchmark("bench_rollout")
    assert bench.cut_at_stop([5, 2, 7, 2], {2}) == [5, 2]
    assert bench.cut_at_stop([5, 6], {2}) == [5, 6]
    assert bench.agreement([[1, 2], [3]], [[1, 2], [4, 5]]) == {
        "rows_equal": 1, "rows": 2, "tokens_equal": 2, "tokens": 4, "all_equal": False,
    }  # fmt: skip
