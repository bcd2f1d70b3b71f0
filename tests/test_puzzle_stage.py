"""The puzzle stage end to end on a very small world: budgets hold, outputs exist, and a
changed budget re-runs only the MIP and realization (BLD and scores come from the cache)."""

import json

import pytest

from nemo_plugins.arch import accounting as acc
from nemo_plugins.config import DEFAULT_CONFIGS, load_config
from nemo_plugins.model.checkpoint import load_checkpoint, read_config
from nemo_plugins.pipeline import PipelineConfig, run_pipeline
from nemo_plugins.puzzle import bld as bld_mod
from nemo_plugins.puzzle.stage import BudgetConfig, budget_bounds
from nemo_plugins.puzzle.costs import CostConfig


def small(tmp_path, *extra):
    overrides = [
        f"output_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}", "progress=false",
        "stages=[world,parent,puzzle]", "world.n_train=96", "world.n_eval=20",
        "parent.steps=20", "parent.batch_size=8", "parent.hidden_size=64", "parent.intermediate_size=512",
        "parent.num_layers=2", "parent.num_attention_heads=4", "parent.num_kv_heads=4",
        "puzzle.library.kv_heads=[2,1]", "puzzle.library.ffn_fractions=[0.5]",
        "puzzle.bld.steps=4", "puzzle.bld.batch_size=8", "puzzle.init.calibration_batches=2",
        "puzzle.score_batches=2", "puzzle.score_batch_size=8", "puzzle.pareto_points=4",
        "puzzle.costs.measure_reps=1", "puzzle.costs.prefill_len=8", "puzzle.costs.decode_len=4",
        *extra,
    ]  # fmt: skip
    return load_config(PipelineConfig, DEFAULT_CONFIGS, overrides)


def test_puzzle_stage_meets_budget_and_resumes(tmp_path, monkeypatch):
    summary = run_pipeline(small(tmp_path))
    out = tmp_path / "out" / "puzzle"
    report = json.loads((out / "puzzle_report.json").read_text())
    child_cfg = read_config(out / "child")
    parent = load_checkpoint(summary["parent"]["checkpoint"])
    block_params = lambda cfg: sum(acc.block_params(cfg, b) for b in cfg.blocks)  # noqa: E731
    assert block_params(child_cfg) <= 0.7 * block_params(parent.config) + 1e-6
    kv = lambda cfg: acc.report(cfg).kv_cache_bytes_per_token  # noqa: E731
    assert kv(child_cfg) <= 0.5 * kv(parent.config)
    assert json.loads((out / "child" / "config.json").read_text())["architectures"] == ["DeciLMForCausalLM"]
    assert (out / "architecture.png").stat().st_size > 1000 and (out / "pareto.png").stat().st_size > 1000
    lib = json.loads((out / "library.json").read_text())
    assert set(lib) == {"0.attention", "0.ffn", "1.attention", "1.ffn"}
    assert {"stats", "metrics"} <= set(lib["0.ffn"]["no_op"]) and "kl_div" in lib["0.ffn"]["no_op"]["metrics"]
    assert report["quality"]["kl_div"] >= 0 and set(report["task_accuracy_easy"]) == {"parent", "child"}

    # a new budget: no BLD training, no rescoring
    monkeypatch.setattr(bld_mod.L.Trainer, "fit", lambda *a, **k: pytest.fail("BLD retrained"))
    from nemo_plugins.puzzle import stage

    monkeypatch.setattr(stage, "score_variants", lambda *a, **k: pytest.fail("rescored"))
    run_pipeline(small(tmp_path, "puzzle.budget.params_fraction=0.9", "puzzle.budget.kv_cache_fraction=0.75"))
    looser = read_config(out / "child")
    assert kv(looser) <= 0.75 * kv(parent.config)


def test_budget_translation():
    costs = CostConfig(batch_size=4, decode_len=100)
    parent = {"num_params": 1000.0, "kv_cache_mib": 8.0}
    non_block = {"memory_mib": 100.0, "runtime_ms": 2.0}
    b = budget_bounds(BudgetConfig(params_fraction=0.5, kv_cache_fraction=0.25, memory_gib=1.0, throughput=400.0,
                                   latency_ms=500.0, max_attention_layers=3), parent, non_block, costs)  # fmt: skip
    assert b == {
        "stats.num_params": 500.0, "stats.kv_cache_mib": 2.0, "stats.memory_mib": 1024.0 - 100.0,
        # throughput 400 tok/s at batch 4 x 100 tokens allows 1000 ms; the 500 ms latency is tighter
        "stats.runtime_ms": min(1000.0 * 4 * 100 / 400.0, 500.0) - 2.0, "stats.num_attention_layers": 3,
    }  # fmt: skip
    with pytest.raises(ValueError, match="params_fraction"):
        BudgetConfig(params_fraction=1.5)
