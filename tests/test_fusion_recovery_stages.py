"""The fusion and recovery stages in the pipeline on a very small world: outputs, reports,
which model each stage starts from, and resume without retraining."""

import json
from pathlib import Path

import pytest

from nemo_plugins.config import DEFAULT_CONFIGS, load_config
from nemo_plugins.distill import recovery as recovery_mod
from nemo_plugins.errors import CheckpointError
from nemo_plugins.model.checkpoint import read_config
from nemo_plugins.pipeline import PipelineConfig, run_pipeline


def small(tmp_path, *extra):
    overrides = [
        f"output_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}", "progress=false",
        "stages=[world,parent,puzzle,fusion,recovery]", "world.n_train=96", "world.n_eval=20",
        "parent.steps=20", "parent.batch_size=8", "parent.hidden_size=64", "parent.intermediate_size=512",
        "parent.num_layers=3", "parent.num_attention_heads=4", "parent.num_kv_heads=4",
        "puzzle.library.kv_heads=[2]", "puzzle.library.ffn_fractions=[0.5]", "puzzle.library.attention_linear=false",
        "puzzle.bld.steps=4", "puzzle.bld.batch_size=8", "puzzle.init.calibration_batches=2",
        "puzzle.score_batches=2", "puzzle.score_batch_size=8", "puzzle.pareto_points=4",
        "puzzle.costs.measure=false", "puzzle.budget.max_attention_layers=1",
        "fusion.calibration_batches=2", "fusion.batch_size=8",
        "recovery.steps=4", "recovery.batch_size=8", "recovery.val_every=2", "recovery.ckpt_every=2",
        "recovery.val_batches=1", "recovery.eval_problems=8", "recovery.eval_batches=1", "recovery.warmup_steps=1",
        *extra,
    ]  # fmt: skip
    return load_config(PipelineConfig, DEFAULT_CONFIGS, overrides)


def test_fusion_and_recovery_stages_run_report_and_resume(tmp_path, monkeypatch):
    summary = run_pipeline(small(tmp_path))
    out = tmp_path / "out"
    child = read_config(out / "puzzle" / "model")
    assert sum(b.attention.kind == "gqa" for b in child.blocks) <= 1  # the budget removed attention

    fusion = json.loads((out / "fusion" / "report.json").read_text())
    fused = read_config(fusion["checkpoint"]["path"])
    assert fused.num_layers == child.num_layers
    assert fusion["layers_saved"] == fusion["depth_before"] - fusion["depth_after"] == summary["fusion"]["layers_saved"]
    assert fusion["layers_saved"] >= 1  # two attention no-ops leave a run of FFNs
    assert (out / "fusion" / "dependency.png").stat().st_size > 1000

    rec = json.loads((out / "recovery" / "report.json").read_text())
    assert set(rec) >= {"parent", "before", "kd", "cpt", "kd_gap_closed", "cpt_gap_closed", "model"}
    assert rec["kd"]["steps"] == rec["cpt"]["steps"] == 4 and rec["kd"]["examples_seen"] == rec["cpt"]["examples_seen"]
    assert rec["parent"]["kl_div"] == pytest.approx(0.0, abs=1e-6)
    assert read_config(out / "recovery" / "model") == fused  # recovery started from the fused model
    for run in ("kd", "cpt"):
        run_dir = Path(rec[run]["metrics_csv"]).parent
        assert run_dir.parent == out / "recovery" and run_dir.name.startswith(run + "-")
        assert (run_dir / "metrics.csv").is_file() and (run_dir / "recovery.png").is_file()

    # again: both recovery runs resume from their final checkpoints and train nothing
    monkeypatch.setattr(recovery_mod, "_fit", lambda *a, **k: pytest.fail("recovery retrained"))
    again = run_pipeline(small(tmp_path, "stages=[world,parent,recovery]"))
    assert again["recovery"]["kd"]["kl_div"] == pytest.approx(rec["kd"]["kl_div"])
    # a changed setting is a new run, not a resume of the old one
    monkeypatch.undo()
    changed = run_pipeline(small(tmp_path, "stages=[world,parent,recovery]", "recovery.lr=0.002"))
    assert changed["recovery"]["kd"]["kl_div"] != pytest.approx(rec["kd"]["kl_div"])
    assert len(list((out / "recovery").glob("kd-*"))) == 2


def test_recovery_without_a_compressed_child_names_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match="run the puzzle stage first"):
        run_pipeline(small(tmp_path, "stages=[world,parent,recovery]"))


def test_sft_stage_starts_from_the_parent_when_there_is_no_child(tmp_path):
    sft = ["sft.steps=2", "sft.val_every=1", "sft.ckpt_every=1", "sft.world_problems=16", "sft.val_problems=4",
           "sft.val_batches=1", "sft.eval_problems=4", "sft.eval_batch_size=4", "sft.max_new_tokens=8"]  # fmt: skip
    summary = run_pipeline(small(tmp_path, "stages=[world,parent,sft]", *sft))
    assert summary["sft"]["start"] == summary["parent"]["model"]
    report = json.loads((tmp_path / "out" / "sft" / "report.json").read_text())
    assert set(report["after"]) == {"on", "off"} and report["after"]["on"]["n"] == 4
    assert read_config(tmp_path / "out" / "sft" / "model") == read_config(summary["parent"]["model"])


def test_grpo_stage_runs_in_the_pipeline_after_sft(tmp_path):
    grpo = ["grpo.steps=1", "grpo.train_problems=8", "grpo.pass_rate_k=2", "grpo.prompts_per_step=2",
            "grpo.group_size=2", "grpo.max_new_tokens=8", "grpo.eval_problems=4", "grpo.rewards.workers=0",
            "grpo.compare_random=false", "grpo.eval_off=false", "grpo.difficulties=[1,2]", "grpo.ckpt_every=1"]  # fmt: skip
    sft = ["sft.steps=1", "sft.world_problems=8", "sft.val_problems=2", "sft.val_batches=1", "sft.eval_problems=2",
           "sft.max_new_tokens=4", "sft.val_every=1", "sft.ckpt_every=1"]  # fmt: skip
    summary = run_pipeline(small(tmp_path, "stages=[world,parent,sft,grpo]", *sft, *grpo))
    assert summary["grpo"]["start"] == str(tmp_path / "out" / "sft" / "model")  # GRPO follows SFT
    assert [row["model"] for row in summary["grpo"]["table"]][:2] == ["before", "curriculum"]
    assert read_config(summary["grpo"]["model"]) == read_config(summary["parent"]["model"])
