"""Smoke test of benchmarks/bench_puzzle_quality.py on a very small world and two BLD seeds: one
row per child and seed, the table's intervals, and Puzzle's KL is the stage's."""

import json

from benchmark_scripts import load_benchmark

SMALL = [
    "world.n_train=96", "world.n_eval=20", "parent.steps=20", "parent.batch_size=8", "parent.hidden_size=64",
    "parent.intermediate_size=512", "parent.num_layers=2", "parent.num_attention_heads=4", "parent.num_kv_heads=4",
    "puzzle.library.kv_heads=[2,1]", "puzzle.library.ffn_fractions=[0.5]", "puzzle.bld.steps=2",
    "puzzle.bld.batch_size=8", "puzzle.init.calibration_batches=1", "puzzle.score_batches=1",
    "puzzle.score_batch_size=8", "puzzle.pareto_points=2", "puzzle.costs.measure=false",
]  # fmt: skip


def test_bench_puzzle_quality_two_seeds(tmp_path, capsys):
    mod = load_benchmark("bench_puzzle_quality")
    out = tmp_path / "table.json"
    res = mod.main(["--seeds", "0", "1", "--out", str(tmp_path / "runs"), "--json", str(out),
                    f"cache_dir={tmp_path / 'cache'}", *SMALL])  # fmt: skip
    per_seed = res["per_seed"]
    assert sorted(per_seed) == [0, 1] and json.loads(out.read_text()).keys() == {"0", "1"}
    for seed, b in per_seed.items():
        report = json.loads((tmp_path / "runs" / f"seed{seed}" / "puzzle" / "report.json").read_text())
        assert b["children"]["puzzle"]["kl_div"] == report["quality"]["kl_div"]
        assert set(b["children"]) == {"puzzle", "uniform", "drop"}
    libs = {json.loads((tmp_path / "runs" / f"seed{s}" / "puzzle" / "report.json").read_text())["library_dir"] for s in (0, 1)}
    assert len(libs) == 2  # each seed trained its own library
    printed = capsys.readouterr().out
    assert "±" in printed and "Puzzle strictly best on KL in" in printed and "KL uniform/puzzle" in printed
