"""The puzzle stage end to end on a very small world: budgets hold, outputs exist, the
reported KL is the scoring function's on the saved child, and a changed budget re-runs only the
MIP and realization (BLD and scores come from the cache, the trained variants from disk)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nemo_plugins.arch import accounting as acc
from nemo_plugins.config import DEFAULT_CONFIGS, load_config
from nemo_plugins.model.checkpoint import load_checkpoint, read_config
from nemo_plugins.pipeline import PipelineConfig, load_model, run_pipeline
from nemo_plugins.puzzle import bld as bld_mod
from nemo_plugins.puzzle.library import build_variants
from nemo_plugins.model.metrics import model_metrics
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


def assert_child_holds_saved_variants(child_dir: Path, report: dict, parent_cfg, library_cfg) -> int:
    """Every chosen variant's weights in the saved child equal its file in the library (what BLD
    trained, not a fresh initialization); returns how many of them BLD trained."""
    child = load_model(child_dir).state_dict()
    by_key = {v.key: v for v in build_variants(parent_cfg, library_cfg)}
    trained = 0
    for group, name in report["choices"].items():
        v = by_key[f"{group}/{name}"]
        saved = bld_mod.load_variant_state(Path(report["library_dir"]), v)
        for k, t in saved.items():
            assert torch.equal(child[f"model.layers.{v.layer}.{k}"], t), f"{v.key}: {k}"
        with safe_open(str(bld_mod.variant_path(Path(report["library_dir"]), v)), "pt") as f:
            trained += f.metadata()["trained"] == "true"
    return trained


def test_puzzle_stage_meets_budget_and_resumes(tmp_path, monkeypatch):
    from nemo_plugins.puzzle import stage

    quality_batches = []  # the held-out batches the report's quality was measured on

    def recording_model_metrics(parent, child, batches):
        quality_batches[:] = list(batches)
        return model_metrics(parent, child, quality_batches)

    monkeypatch.setattr(stage, "model_metrics", recording_model_metrics)
    summary = run_pipeline(small(tmp_path))
    out = tmp_path / "out" / "puzzle"
    report = json.loads((out / "report.json").read_text())
    child_cfg = read_config(out / "model")
    parent = load_checkpoint(summary["parent"]["model"])
    block_params = lambda cfg: sum(acc.block_params(cfg, b) for b in cfg.blocks)  # noqa: E731
    assert block_params(child_cfg) <= 0.7 * block_params(parent.config) + 1e-6
    kv = lambda cfg: acc.report(cfg).kv_cache_bytes_per_token  # noqa: E731
    assert kv(child_cfg) <= 0.5 * kv(parent.config)
    assert json.loads((out / "model" / "config.json").read_text())["architectures"] == ["DeciLMForCausalLM"]
    assert (out / "architecture.png").stat().st_size > 1000 and (out / "pareto.png").stat().st_size > 1000
    lib = json.loads((out / "library.json").read_text())
    assert set(lib) == {"0.attention", "0.ffn", "1.attention", "1.ffn"}
    assert {"stats", "metrics"} <= set(lib["0.ffn"]["no_op"]) and "kl_div" in lib["0.ffn"]["no_op"]["metrics"]
    assert set(report["task_accuracy_easy"]) == {"parent", "child"}
    speed = report["bld_speed"]  # 4 steps of 8 rows, every trained variant in one wave
    assert speed["variants"] == report["bld_trained"] > 0 and 0 < speed["tokens"] <= 4 * 8 * 64
    assert speed["variant_tokens"] == speed["tokens"] * speed["variants"] and speed["tokens_per_s"] > 0
    # the reported KL is KL(parent || saved child) on the held-out batches, and the child differs
    assert child_cfg.blocks != parent.config.blocks and quality_batches
    kl = model_metrics(load_model(summary["parent"]["model"]), load_model(out / "model"), quality_batches)["kl_div"]
    assert report["quality"]["kl_div"] > 1e-4 and report["quality"]["kl_div"] == pytest.approx(kl, rel=1e-5)
    # the naive compressions at the same budget, measured on the same batches
    children = report["baselines"]["children"]
    assert children["puzzle"]["kl_div"] == report["quality"]["kl_div"]
    assert children["drop"]["layers_dropped"] >= 1 and children["uniform"]["layers_dropped"] == 0
    for row in children.values():
        assert row["params_fraction"] <= 0.7 + 1e-9 and row["kv_fraction"] <= 0.5 + 1e-9
        assert 0 <= row["greedy_agreement"] <= 1 and row["kl_div"] > 0
    best = min(r["kl_div"] for n, r in children.items() if n != "puzzle")
    assert report["baselines"]["puzzle_strictly_best_kl"] == (children["puzzle"]["kl_div"] < best)

    # a new budget: no BLD training, no rescoring, and the child is built from the trained variants on disk
    monkeypatch.setattr(bld_mod.L.Trainer, "fit", lambda *a, **k: pytest.fail("BLD retrained"))
    monkeypatch.setattr(stage, "score_shard", lambda *a, **k: pytest.fail("rescored"))
    cfg = small(tmp_path, "puzzle.budget.params_fraction=0.9", "puzzle.budget.kv_cache_fraction=0.75")
    run_pipeline(cfg)
    looser = read_config(out / "model")
    assert kv(looser) <= 0.75 * kv(parent.config)
    rerun = json.loads((out / "report.json").read_text())
    assert assert_child_holds_saved_variants(out / "model", rerun, parent.config, cfg.puzzle.library) > 0


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


def test_choices_and_measurements_use_disjoint_halves_of_the_held_out_rows():
    from nemo_plugins.puzzle.stage import PuzzleConfig, held_out_batches

    rows = [([i + 1] * 5, [1] * 5) for i in range(10)]  # row i holds token i + 1 only
    cfg = PuzzleConfig(score_batches=1, score_batch_size=2)
    scoring, measuring = held_out_batches(cfg, rows)
    tokens = lambda batches: {int(t) for ids, _ in batches for t in ids.flatten()} - {0}  # noqa: E731
    assert tokens(scoring) == {1, 2}  # score_batches x score_batch_size rows of the first half
    assert tokens(measuring) == {6, 7, 8, 9, 10}  # all of the second half
    with pytest.raises(ValueError, match="held-out"):
        held_out_batches(cfg, rows[:1])


def test_library_key_ignores_how_often_bld_checkpoints():
    """A trained library is reused whatever puzzle.bld.ckpt_every is (it changes no weight), and
    not reused when a setting that trains the variants differently changes."""
    from dataclasses import replace

    from nemo_plugins.puzzle.stage import PuzzleConfig, library_dir

    cfg = PuzzleConfig()
    base = library_dir(cfg, "p", Path("/w"))
    assert library_dir(replace(cfg, bld=replace(cfg.bld, ckpt_every=7)), "p", Path("/w")) == base
    assert library_dir(replace(cfg, bld=replace(cfg.bld, lr=0.5)), "p", Path("/w")) != base
