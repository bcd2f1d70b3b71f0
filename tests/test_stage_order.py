"""The alignment stages after GRPO run in the order `stages` lists them, each continuing the
policy the stage before it left (the registry's other stages keep their fixed order)."""

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import save_file

from nemo_plugins import pipeline
from nemo_plugins.pipeline import load_pipeline_config, run_order, run_pipeline


def test_run_order_keeps_the_registry_then_the_listed_alignment_order():
    assert run_order(["rpo", "sft", "reward_model", "grpo", "rloo", "world"]) == [
        "world", "sft", "grpo", "rpo", "reward_model", "rloo"]  # fmt: skip
    assert run_order(pipeline.STAGES) == list(pipeline.STAGES)


def _fake(name: str, seen: list, makes_model: bool):
    def run(ctx):
        seen.append((name, Path(ctx.model_dir).parent.name if ctx.model_dir else None))
        if not makes_model:  # like reward_model: reads the policy, passes it on
            return {"start": str(ctx.model_dir)}
        out = ctx.out_dir / "model"
        out.mkdir(parents=True)
        save_file({"w": torch.full((2,), float(len(seen)))}, str(out / "model.safetensors"))
        return {"model": str(out)}

    return run


def test_each_alignment_stage_continues_the_previous_stages_policy(tmp_path, monkeypatch):
    seen: list = []
    registry = {n: dataclasses.replace(s, run=_fake(n, seen, makes_model=not s.passes_policy))
                for n, s in pipeline.REGISTRY.items()}  # fmt: skip
    monkeypatch.setattr(pipeline, "REGISTRY", registry)
    start = tmp_path / "given" / "model"
    start.mkdir(parents=True)
    cfg = load_pipeline_config(overrides=[f"output_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}",
                                          f"model={start}", "progress=false",
                                          "stages=[grpo,rpo,reward_model,rloo]"])  # fmt: skip
    run_pipeline(cfg)
    assert seen == [("grpo", "given"), ("rpo", "grpo"), ("reward_model", "rpo"), ("rloo", "rpo")]
