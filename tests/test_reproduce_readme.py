"""benchmarks/reproduce_readme.py: per-seed runs of the main command at toy size, the tables made
from them, the paired differences flagged when within noise."""

import json
from pathlib import Path

import pytest

from benchmark_scripts import load_benchmark

SMALL = [
    "world.n_train=96", "world.n_eval=16", "parent.steps=20", "parent.batch_size=8", "parent.hidden_size=64",
    "parent.intermediate_size=512", "parent.num_layers=2", "parent.num_attention_heads=4", "parent.num_kv_heads=4",
    "eval.n_problems=4", "eval.max_new_tokens=4", "eval.modes=[on]",
    "puzzle.library.kv_heads=[2,1]", "puzzle.library.ffn_fractions=[0.5]", "puzzle.library.attention_linear=false",
    "puzzle.bld.steps=2", "puzzle.bld.batch_size=8", "puzzle.init.calibration_batches=1",
    "puzzle.score_batches=1", "puzzle.score_batch_size=8", "puzzle.pareto_points=2", "puzzle.costs.measure=false",
    "puzzle.budget.max_attention_layers=1", "fusion.calibration_batches=1", "fusion.batch_size=8",
    "recovery.steps=2", "recovery.batch_size=4", "recovery.val_every=2", "recovery.ckpt_every=2",
    "recovery.val_batches=1", "recovery.eval_problems=2", "recovery.eval_batches=1", "recovery.warmup_steps=1",
    "sft.steps=1", "sft.batch_size=2", "sft.world_problems=4", "sft.val_problems=2", "sft.val_batches=1", "sft.eval_problems=2",
    "sft.eval_batch_size=2", "sft.max_new_tokens=4", "sft.val_every=1", "sft.ckpt_every=1",
    "grpo.steps=1", "grpo.train_problems=4", "grpo.pass_rate_k=2", "grpo.prompts_per_step=2", "grpo.group_size=2",
    "grpo.max_new_tokens=8", "grpo.eval_problems=2", "grpo.rewards.workers=0", "grpo.eval_off=false",
    "grpo.difficulties=[1,2]", "grpo.ckpt_every=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def script():
    return load_benchmark("reproduce_readme")


def test_two_seeds_of_the_main_command_make_the_tables(script, tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["--seeds", "2", "--grpo-seeds", "1", "--puzzle-seeds", "0", "--out", str(out), f"cache_dir={tmp_path / 'cache'}"]
    res = script.main([*argv, *SMALL])  # Puzzle's seeds are bench_puzzle_quality's (its own test)
    per_seed = res["per_seed"]
    assert sorted(per_seed) == [0, 1] and "puzzle" not in res
    assert "grpo" in per_seed[0] and "grpo" not in per_seed[1]  # --grpo-seeds 1
    for seed in (0, 1):
        report = json.loads((out / f"seed{seed}" / "report.json").read_text())
        assert report["config"]["recovery"]["seed"] == seed and report["config"]["sft"]["seed"] == seed
        assert per_seed[seed]["recovery"]["kd_gap_closed"] == report["recovery"]["kd_gap_closed"]
        assert per_seed[seed]["sft"]["after_on_adherence"] == report["sft"]["after"]["on"]["adherence"]
    # every seed started recovery from the same fused child; the seeds then trained differently
    fused = {json.loads((out / f"seed{s}" / "report.json").read_text())["resources"]["fusion"]["weights_sha256"] for s in (0, 1)}
    recovered = {json.loads((out / f"seed{s}" / "report.json").read_text())["resources"]["recovery"]["weights_sha256"] for s in (0, 1)}
    assert len(fused) == 1 and len(recovered) == 2
    saved = json.loads((out / "summary.json").read_text())
    tables = (out / "tables.md").read_text()
    assert script.render(saved) == tables and tables in capsys.readouterr().out
    assert "Recovery, 2 seeds (0, 1)" in tables and "GRPO, 1 seeds (0)" in tables and "| KD - LM |" in tables
    assert "thinking on: adherence" in tables and "Puzzle" not in tables


def test_the_puzzle_table_compares_each_baseline_with_puzzle_seed_by_seed(script):
    def seed(puzzle, uniform, drop):
        kl = {"puzzle": puzzle, "uniform": uniform, "drop": drop}
        return {"children": {k: {"kl_div": v} for k, v in kl.items()}, "puzzle_strictly_best_kl": puzzle < min(uniform, drop)}

    lines = script.puzzle_table({0: seed(1.0, 2.0, 3.0), 1: seed(1.1, 2.2, 3.0), 2: seed(1.2, 2.1, 1.1)})
    text = "\n".join(lines)
    assert "3 seeds (0, 1, 2) of BLD" in text and "| Puzzle | 1.1000 ± 0.2484 | 1.0000, 1.1000, 1.2000 |" in text
    assert "| uniform shrink - Puzzle | +1.0000 ± 0.2484 | |" in text  # paired: per-seed differences 1.0, 1.1, 0.9
    assert [line for line in lines if line.startswith("| layer drop - Puzzle")][0].endswith("(no measurable difference here) | |")
    assert text.endswith("Puzzle strictly best on KL in 2 of 3 seeds.")


def test_a_difference_within_its_interval_says_so(script):
    assert script.difference([0.30, 0.32, 0.31], [0.31, 0.30, 0.32]).endswith("(no measurable difference here)")
    clear = script.difference([0.50, 0.52, 0.51], [0.30, 0.31, 0.30])
    assert clear.startswith("+0.207 ± ") and "no measurable" not in clear
    assert script.difference([0.5], [0.4]) == "+0.100 (one seed: no interval)"


@pytest.mark.parametrize(("argv", "named"), [(["--grpo-seeds", "3"], "--grpo-seeds 3"), (["--puzzle-seeds", "-1"], "--puzzle-seeds -1")])
def test_bad_seed_counts_are_refused(script, capsys, argv, named):
    with pytest.raises(SystemExit):
        script.main(["--seeds", "2", *argv])
    assert named in capsys.readouterr().err



RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "reproduce_readme.json"
README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_quotes_the_committed_reproduction_verbatim(script):
    """The README's multi-seed tables are exactly `render` of the committed summary that
    `reproduce_readme.py` wrote, and that summary names the command and the environment."""
    saved = json.loads(RESULTS.read_text())
    text = README.read_text()
    begin, end = "<!-- reproduce_readme:begin -->\n", "<!-- reproduce_readme:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1
    quoted = text.split(begin, 1)[1].split(end, 1)[0]
    assert quoted == script.render(saved)
    assert saved["command"].startswith("reproduce_readme.py --seeds") and saved["command"] in text
    env = saved["per_seed"]["0"]["environment"]
    assert env["torch"] and env["cpu"] and env["torch_threads"] >= 1
