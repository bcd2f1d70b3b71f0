"""Smoke tests of benchmarks/bench_rollout.py (the rollout engine against transformers' generate).

Tiny workloads, a few seconds each: on the cached tiny parent and on a random HF Llama directory
written by transformers (`--model`), the figures are positive finite numbers, both sides count
the same tokens for the same greedy completions, and those completions agree token for token.
No timing assertion: this machine's speed is not tested.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_rollout.py"
TINY = ["--prompts", "3", "--n", "2", "--batch-size", "4", "--max-new-tokens", "24", "--reps", "2",
        "--warmup", "0", "--quiet"]  # fmt: skip


def _load():
    spec = importlib.util.spec_from_file_location("bench_rollout", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check(res: dict, sequences: int, max_new: int):
    for name, s in res["settings"].items():
        for side in ("engine", "hf"):
            d = s[side]
            assert len(d["times_s"]) == 2 and all(t > 0 for t in d["times_s"]), (name, side, d)
            assert all(0 < n <= sequences * max_new for n in d["tokens"]), (name, side, d)
            assert math.isfinite(d["tokens_per_s"]) and d["tokens_per_s"] > 0, (name, side, d)
        for key in ("ratio_engine_over_hf", "paired_ratio_engine_over_hf"):
            assert math.isfinite(s[key]) and s[key] > 0, (name, key, s[key])
    greedy = res["settings"]["greedy"]
    assert greedy["engine"]["tokens"] == greedy["hf"]["tokens"]  # same completions, counted the same way
    assert res["sanity"]["greedy"]["all_equal"], res["sanity"]
    assert res["sanity"]["greedy"]["rows"] == sequences


def test_bench_rollout_on_the_tiny_parent(parent_checkpoint, tmp_path):
    bench = _load()
    out = tmp_path / "rollout.json"
    res = bench.main([*TINY, "--json", str(out)])
    assert Path(res["model"]["source"]) == Path(parent_checkpoint)
    _check(res, sequences=6, max_new=24)
    # The tiny parent answers within 24 tokens for some rows: EOS ends them before the limit.
    assert res["settings"]["greedy"]["engine"]["tokens"][0] < 6 * 24
    assert bench.passed(res)
    assert json.loads(out.read_text())["sanity"] == res["sanity"]


def test_bench_rollout_on_a_hf_directory(tmp_path):
    from hf_llama import write_hf_llama

    bench = _load()
    model = write_hf_llama(tmp_path / "hf", layers=1)
    res = bench.main([*TINY, "--model", str(model), "--max-new-tokens", "6", "--thinking", "off"])
    assert res["model"]["source"] == str(model.resolve()) and res["model"]["layers"] == 1
    _check(res, sequences=6, max_new=6)


def test_counting_stops_after_the_first_stop_id():
    bench = _load()
    assert bench.cut_at_stop([5, 2, 7, 2], {2}) == [5, 2]
    assert bench.cut_at_stop([5, 6], {2}) == [5, 6]
    assert bench.agreement([[1, 2], [3]], [[1, 2], [4, 5]]) == {
        "rows_equal": 1, "rows": 2, "tokens_equal": 2, "tokens": 4, "all_equal": False,
    }  # fmt: skip
