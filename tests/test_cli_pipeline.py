"""CLI, configs and the main job (plumbing on a very small world; quality on the real parent)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_plugins.cli.main import main
from nemo_plugins.config import DEFAULT_CONFIGS, ConfigError, load_config
from nemo_plugins.pipeline import PipelineConfig, run_pipeline

FIXTURES = Path(__file__).parent / "fixtures"
SUPER = FIXTURES / "llama33_nemotron_super_49b_config.json"


def test_inspect_json_totals_and_layers(capsys):
    assert main(["inspect", str(SUPER), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["totals"]["params"] == 49_867_145_216
    assert out["totals"]["kv_cache_bytes_per_token"] == 49 * 2 * 8 * 128 * 2
    assert len(out["layers"]) == 80
    assert main(["inspect", str(SUPER), "--json", "--dtype", "fp8"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["kv_cache_bytes_per_token"] == 49 * 2 * 8 * 128


def test_inspect_table_prints_layers_and_totals(capsys):
    assert main(["inspect", str(SUPER)]) == 0
    out = capsys.readouterr().out
    assert "49,867,145,216" in out and "no_op" in out and "swiglu(28672)" in out
    assert len([line for line in out.splitlines() if line.strip().startswith("79 ")]) == 1


def test_inspect_malformed_config_names_field_and_fails(tmp_path, capsys):
    cfg = json.loads(SUPER.read_text())
    cfg["block_configs"][3]["attention"]["n_heads_in_group"] = 7
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps(cfg))
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "block_configs[3].attention.n_heads_in_group=7" in err and "config.json" in err


def test_console_script_exit_code(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_plugins.cli.main", "inspect", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "not valid JSON" in proc.stderr


def test_config_overrides_and_rejections():
    yaml = DEFAULT_CONFIGS  # pipeline, then puzzle
    cfg = load_config(PipelineConfig, yaml, ["parent.steps=7", "eval.modes=[on]", "world.difficulties=[1,2]"])
    assert cfg.parent.steps == 7 and cfg.eval.modes == ["on"] and cfg.world.difficulties == [1, 2]
    assert cfg.parent.hidden_size == 192  # from the YAML, untouched
    with pytest.raises(ConfigError, match="unknown key 'parent.hiden_size'"):
        load_config(PipelineConfig, yaml, ["parent.hiden_size=8"])
    with pytest.raises(ConfigError, match="parent.steps"):
        load_config(PipelineConfig, yaml, ["parent.steps=many"])
    with pytest.raises(ConfigError, match="parent.lr=-0.1"):
        load_config(PipelineConfig, yaml, ["parent.lr=-0.1"])
    with pytest.raises(ConfigError, match="stages: unknown stage 'puzzle2'"):
        load_config(PipelineConfig, yaml, ["stages=[world,puzzle2]"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(PipelineConfig, yaml, ["parent.steps"])


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("parent:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'parent.stepz'"):
        load_config(PipelineConfig, bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(PipelineConfig, tmp_path / "missing.yaml")


def test_cli_rejects_bad_override_without_touching_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("previous")
    assert main(["pipeline", f"output_dir={out}", "parent.steps=0"]) == 2
    assert "parent.steps=0" in capsys.readouterr().err
    assert (out / "report.json").read_text() == "previous"


def test_pipeline_plumbing_on_a_small_world(tmp_path):
    """Every stage runs, writes its outputs, and a rerun restores the cached parent."""
    overrides = [
        f"output_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}", "progress=false",
        "stages=[world,parent,evaluate]", "world.n_train=64", "world.n_eval=10", "parent.steps=3", "parent.batch_size=8",
        "parent.hidden_size=64", "parent.intermediate_size=256", "parent.num_layers=2",
        "eval.n_problems=10", "eval.max_new_tokens=8",
    ]  # fmt: skip
    cfg = load_config(PipelineConfig, DEFAULT_CONFIGS, overrides)
    summary = run_pipeline(cfg)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["parent"]["model"] == summary["parent"]["model"] == str(tmp_path / "out" / "parent" / "model")
    assert set(report["evaluate"]) == {"on", "off"} and report["evaluate"]["on"]["n"] == 10
    exported = tmp_path / "out" / "parent" / "model"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (exported / name).is_file()
    assert json.loads((tmp_path / "out" / "evaluate" / "report.json").read_text())["model_in"] == str(exported)
    ckpt = Path(summary["parent"]["cache"])
    stamp = (ckpt / "model.safetensors").stat().st_mtime_ns
    run_pipeline(cfg)  # resumes: the parent is not retrained
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == stamp


# ----------------------------------------------------------------------------- the real tiny parent


def test_parent_solves_easy_problems(tiny_world, parent_checkpoint):
    from nemo_plugins.evaluate import task_accuracy
    from nemo_plugins.model.checkpoint import load_checkpoint

    model = load_checkpoint(parent_checkpoint)
    easy = [p for p in tiny_world.eval if p.difficulty == 1][:40]
    hard = [p for p in tiny_world.eval if p.difficulty == 5][:40]
    on_easy = task_accuracy(model, tiny_world.tokenizer, easy, thinking=True)
    on_hard = task_accuracy(model, tiny_world.tokenizer, hard, thinking=True)
    assert on_easy["accuracy"] >= 0.6, on_easy
    assert on_easy["format_ok"] >= 0.9, on_easy
    assert on_hard["accuracy"] < on_easy["accuracy"]  # graded difficulty leaves headroom


def test_exported_parent_loads_in_transformers(tiny_world, parent_checkpoint, tmp_path):
    import transformers

    from nemo_plugins.model.checkpoint import load_checkpoint, save_checkpoint

    ours = load_checkpoint(parent_checkpoint)
    save_checkpoint(ours, tmp_path / "hf", extra_files={"tokenizer.json": tiny_world.tokenizer.to_str()})
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"))
    ids = torch.tensor([tok.encode("<|bos|><|user|>What is (3 + 4) * 2?<|assistant|>")])
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4


def test_recipe_script_rejects_unknown_key():
    script = Path(__file__).parent.parent / "recipes" / "pipeline.py"
    proc = subprocess.run([sys.executable, str(script), "parent.nope=1"], capture_output=True, text=True)
    assert proc.returncode == 1 and "unknown key 'parent.nope'" in proc.stderr


def test_yaml_layers_merge_in_order_and_errors_name_the_file(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("puzzle:\n  budget:\n    kv_cache_fraction: 0.25\n")
    cfg = load_config(PipelineConfig, [*DEFAULT_CONFIGS, preset], ["puzzle.bld.steps=3"])
    assert cfg.puzzle.budget.kv_cache_fraction == 0.25 and cfg.puzzle.bld.steps == 3
    assert cfg.puzzle.budget.params_fraction == 0.7  # from conf/puzzle/tiny.yaml
    bad = tmp_path / "bad.yaml"
    bad.write_text("puzzle:\n  bld:\n    stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'puzzle\.bld\.stepz'"):
        load_config(PipelineConfig, [*DEFAULT_CONFIGS, bad])


def test_puzzle_command_validates_puzzle_keys(capsys):
    assert main(["puzzle", "puzzle.budget.params_fraction=1.5"]) == 2
    assert "params_fraction" in capsys.readouterr().err
    assert main(["config", "puzzle.library.mode=coupled"]) == 0
    assert "mode: coupled" in capsys.readouterr().out


def test_a_broken_record_with_on_error_raise_is_a_clear_error(parent_checkpoint, tmp_path, capsys):
    """sft.on_error=raise: the CLI names the file, the line and the reason, and exits 2."""
    bad = tmp_path / "sft.jsonl"
    bad.write_text('{"thinking": false, "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}\n{oops\n')
    argv = ["sft", f"model={parent_checkpoint}", f"output_dir={tmp_path / 'out'}", f"sft.train_jsonl=[{bad}]",
            "sft.on_error=raise", "sft.world_problems=0", "progress=false"]  # fmt: skip
    assert main(argv) == 2
    assert f"{bad}:2: bad_json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("parent.lr=nan", "parent.lr=nan: expected a finite number > 0"),
        ("parent.warmup_steps=-3", "parent.warmup_steps=-3: expected an integer >= 0"),
        ("puzzle.bld.lr=nan", "puzzle.bld.lr=nan: expected a finite number > 0"),
        ("puzzle.bld.warmup_steps=-1", "puzzle.bld.warmup_steps=-1: expected an integer >= 0"),
        ("eval.modes=[]", "eval.modes=[]: expected a non-empty list"),
        ("world.difficulties=[]", "world.difficulties=[]: expected a non-empty list"),
        ("world.difficulties=[1,9]", "world.difficulties=[1, 9]: 9 is not one of [1, 2, 3, 4, 5]"),
        ("world.n_train=-1", "world.n_train=-1: expected a positive integer"),
        ("recovery.loss=5", "override 'recovery.loss=5': recovery.loss is a section, not a value; set its fields "
                            "(recovery.loss.mode"),
    ],
)  # fmt: skip
def test_bad_values_fail_at_load_naming_the_full_key(override, message):
    """Values that used to be accepted, or to fail only at run time, or with a message that named
    neither the section nor the override: each is refused when the config loads."""
    with pytest.raises(ConfigError) as e:
        load_config(PipelineConfig, list(DEFAULT_CONFIGS), [override])
    assert message in str(e.value)


def test_presets_only_run_stages_their_data_can_feed():
    """The reward model builds its own pairs only on the tiny world; a preset on other problems
    that runs it must name a pairs file, or it fails after every stage before it has run."""
    from nemo_plugins.pipeline import load_pipeline_config

    for preset in ("tiny", "smollm2"):
        cfg = load_pipeline_config(preset)
        if "reward_model" in cfg.stages and cfg.data.problems.source != "tiny":
            assert cfg.reward_model.pairs_path, preset
    assert "rloo" in load_pipeline_config("smollm2").stages


# The tiny-world RL defaults that CHAMP's problems cannot feed: no levels, and a math task.
CHAMP_MISFITS = [
    "grpo.difficulties=[2,3,4]", "grpo.eval_difficulties=[2,3,4]", "grpo.rewards.task=world",
    "rloo.difficulties=[2,3,4]", "rloo.rewards.task=world",
    "rpo.difficulties=[2,3,4]", "rpo.eval_difficulties=[2,3,4]", "rpo.rewards.task=world",
]  # fmt: skip


def _listed(message: str) -> list[str]:
    """The key=value settings an error lists, one a line as '  key=value: why'."""
    return [line.split(": ", 1)[0].strip() for line in message.splitlines() if line.startswith("  ")]


def _fix_line(message: str) -> list[str]:
    return next(line for line in message.splitlines() if line.startswith("fix: add ")).removeprefix("fix: add ").split()


def test_the_cli_refuses_tiny_world_rl_settings_on_champ_naming_every_key(tmp_path, capsys):
    """On CHAMP the RL stages' tiny-world defaults are refused when the config loads, every one at
    once with its reason, and the error's fix line is overrides that load as they are."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main(["pipeline", f"output_dir={out}", f"cache_dir={cache}", "data.problems.source=champ"]) == 2
    err = capsys.readouterr().err
    assert _listed(err) == CHAMP_MISFITS
    assert "levels exist only in the tiny world; champ problems have none" in err
    assert "the rewards must check the problems' task, and champ's is math" in err
    assert "reward_model.pairs_path=None" in err  # the reward model's missing pairs in the same error
    assert not out.exists() and not cache.exists()
    fix = _fix_line(err)
    assert fix == [s.split("=")[0] + ("=math" if s.endswith("=world") else "=null") for s in CHAMP_MISFITS]
    cfg = load_config(PipelineConfig, DEFAULT_CONFIGS, ["data.problems.source=champ", "reward_model.pairs_path=p.jsonl",
                                                        *fix])  # fmt: skip
    assert cfg.grpo.difficulties is None and cfg.rpo.rewards.task == "math"
    assert " ".join(fix) in (Path(__file__).parents[1] / "README.md").read_text()  # the line the README gives


def test_only_the_selected_rl_stages_must_fit_the_problems():
    from nemo_plugins.pipeline import load_pipeline_config

    def refused(*overrides, preset=None) -> list[str]:
        with pytest.raises(ConfigError) as e:
            load_pipeline_config(preset, overrides)
        return _listed(str(e.value))

    assert load_pipeline_config().data.problems.source == "tiny"  # the tiny defaults fit the tiny world
    assert refused("grpo.rewards.task=math") == ["grpo.rewards.task=math"]  # ... whose task is world
    # the SmolLM2 preset (CHAMP) fits for the stages it runs; adding rpo brings rpo's defaults in
    smol = load_pipeline_config("smollm2")
    assert "rpo" not in smol.stages and smol.grpo.rewards.task == "math"
    assert refused(f"stages=[{','.join(smol.stages)},reward_model,rpo]", "reward_model.pairs_path=p.jsonl",
                   preset="smollm2") == [s for s in CHAMP_MISFITS if s.startswith("rpo.")]  # fmt: skip
    champ = ["data.problems.source=champ"]
    assert load_pipeline_config(None, [*champ, "stages=[world,parent,evaluate,sft]"])  # no RL stage selected
    assert refused(*champ, "stages=[grpo]") == [s for s in CHAMP_MISFITS if s.startswith("grpo.")]
    assert refused(*champ, "stages=[grpo]", "grpo.difficulties=null", "grpo.eval_difficulties=null",
                   "grpo.rewards.task=math", "grpo.prompt_source=fresh") == ["grpo.prompt_source=fresh"]  # fmt: skip


def test_a_jsonl_task_is_checked_when_the_prompts_are_read_before_any_stage(tmp_path, capsys):
    """A JSONL's task is known only once read: at load the levels are refused (the error says the
    task comes later), and the task as soon as the file is read, before the first stage."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"What is {i} + 1?", "answer": str(i + 1),
                                           "task": "math"}) + "\n" for i in range(10)))  # fmt: skip
    out = tmp_path / "out"
    base = ["pipeline", f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}", "stages=[grpo]",
            "data.problems.source=jsonl", f"data.problems.paths=[{prompts}]"]  # fmt: skip
    assert main(base) == 2
    err = capsys.readouterr().err
    assert _listed(err) == ["grpo.difficulties=[2,3,4]", "grpo.eval_difficulties=[2,3,4]"]
    assert "rewards.task must also be the task of the prompts in data.problems.paths" in err
    assert main([*base, *_fix_line(err)]) == 2
    err = capsys.readouterr().err
    assert _listed(err) == ["grpo.rewards.task=world"] and "jsonl's is math" in err
    assert _fix_line(err) == ["grpo.rewards.task=math"]
    assert not out.exists()
