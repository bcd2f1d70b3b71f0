"""The H100 preset at the scale it is meant for: a Llama-3.1-70B-shaped parent (no weights),
its library, costs at batch 256 in FP8, and a MIP that fits one H100."""

from nemo_plugins.arch import accounting as acc
from nemo_plugins.arch.config import homogeneous
from nemo_plugins.config import CONF_DIR, DEFAULT_CONFIGS, load_config
from nemo_plugins.pipeline import PipelineConfig
from nemo_plugins.puzzle import mip
from nemo_plugins.puzzle.costs import non_block_stats, variant_stats
from nemo_plugins.puzzle.library import build_variants, child_config, is_parent_variant
from nemo_plugins.puzzle.stage import budget_bounds, choice_totals

LLAMA_70B = homogeneous(vocab_size=128256, hidden_size=8192, num_layers=80, num_attention_heads=64, num_kv_heads=8,
                        intermediate_size=28672, rope_theta=500000.0)  # fmt: skip
GIB = 1024**3


def test_h100_preset_plans_a_70b_child_that_fits_one_gpu():
    cfg = load_config(PipelineConfig, [*DEFAULT_CONFIGS, CONF_DIR / "puzzle" / "h100.yaml"]).puzzle
    assert (cfg.costs.batch_size, cfg.costs.dtype, cfg.costs.hardware) == (256, "fp8", "h100-sxm")
    variants = build_variants(LLAMA_70B, cfg.library)
    per_layer = {v.group for v in variants if v.layer == 0}
    assert per_layer == {"0.attention", "0.ffn"}
    assert sum(v.layer == 0 for v in variants) == 6 + 10  # kv 8/4/2/1, linear, no-op; 8 widths, linear, no-op

    # a library with made-up quality (bigger is better) and real costs at the preset's point
    library: dict = {}
    for v in variants:
        stats = variant_stats(LLAMA_70B, v, cfg.costs)
        library.setdefault(v.group, {})[v.name] = {"stats": stats, "metrics": {"kl_div": 1.0 / (1.0 + stats["num_params"])}}
    parent_choice = {v.group: v.name for v in variants if is_parent_variant(LLAMA_70B, v)}
    parent_totals = choice_totals(library, parent_choice)
    non_block = non_block_stats(LLAMA_70B, cfg.costs)
    # the parent itself does not fit one H100 at batch 256 x 2048 tokens in FP8 (~145 GiB)
    assert (parent_totals["memory_mib"] + non_block["memory_mib"]) / 1024 > 140
    bounds = budget_bounds(cfg.budget, parent_totals, non_block, cfg.costs)
    assert set(bounds) == {"stats.memory_mib"}
    sol = mip.solve(library, "metrics.kl_div", max_bounds=bounds)[0]
    child = child_config(LLAMA_70B, sol.choices, variants)
    r = acc.report(child, dtype="fp8", batch_size=256, seq_len=2048)
    assert r.memory_bytes <= 79 * GIB
    assert sol.status == "optimal"
