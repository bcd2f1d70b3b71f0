"""The stage contract on a parent that is not the tiny one: a random Hugging Face Llama directory
(sharded bf16 safetensors, tied embeddings, Llama-3 rope scaling, its own BPE tokenizer and ChatML
template) goes through every stage by the generic path, and each stage runs alone from the
directory the previous one wrote."""

import json
import shutil

import pytest
import torch

from nemo_plugins.cli.main import main
from nemo_plugins.config import DEFAULT_CONFIGS, load_config
from nemo_plugins.data.chat_tokenizer import ChatTokenizer
from nemo_plugins.model.checkpoint import load_checkpoint, read_config
from nemo_plugins.pipeline import STAGES, PipelineConfig, run_pipeline
from nemo_plugins.utils.environment import weights_digest

from hf_llama import CHATML_TEMPLATE, write_hf_llama

SMALL = [
    "progress=false", "world.n_train=96", "world.n_eval=16",
    "eval.n_problems=4", "eval.max_new_tokens=4", "eval.modes=[on]",
    "puzzle.library.kv_heads=[1]", "puzzle.library.ffn_fractions=[0.5]", "puzzle.library.attention_linear=false",
    "puzzle.bld.steps=2", "puzzle.bld.batch_size=8", "puzzle.init.calibration_batches=1",
    "puzzle.score_batches=1", "puzzle.score_batch_size=8", "puzzle.pareto_points=2",
    "puzzle.costs.measure=false", "puzzle.budget.max_attention_layers=1",
    "fusion.calibration_batches=1", "fusion.batch_size=8",
    "recovery.steps=2", "recovery.batch_size=4", "recovery.val_every=2", "recovery.ckpt_every=2",
    "recovery.val_batches=1", "recovery.eval_problems=2", "recovery.eval_batches=1", "recovery.warmup_steps=1",
    "sft.steps=1", "sft.world_problems=4", "sft.val_problems=2", "sft.val_batches=1", "sft.eval_problems=2",
    "sft.eval_batch_size=2", "sft.max_new_tokens=4", "sft.val_every=1", "sft.ckpt_every=1",
    "grpo.steps=1", "grpo.train_problems=4", "grpo.pass_rate_k=2", "grpo.prompts_per_step=2", "grpo.group_size=2",
    "grpo.max_new_tokens=8", "grpo.eval_problems=2", "grpo.rewards.workers=0", "grpo.compare_random=false",
    "grpo.eval_off=false", "grpo.difficulties=[1,2]", "grpo.ckpt_every=1",
    "rloo.steps=1", "rloo.train_problems=4", "rloo.prompts_per_step=2", "rloo.group_size=2", "rloo.max_new_tokens=8",
    "rloo.eval_problems=3", "rloo.rewards.workers=0", "rloo.difficulties=[1,2]", "rloo.ckpt_every=1",
]  # fmt: skip
MODEL_STAGES = ("puzzle", "fusion", "recovery", "sft", "grpo", "rloo")


@pytest.fixture(scope="module")
def hf_parent(tmp_path_factory):
    return write_hf_llama(tmp_path_factory.mktemp("user") / "my-llama")


@pytest.fixture(scope="module")
def chained(hf_parent, tmp_path_factory):
    """The whole pipeline on the HF parent, in one output directory."""
    out = tmp_path_factory.mktemp("chained")
    cfg = load_config(PipelineConfig, DEFAULT_CONFIGS, [*SMALL, f"output_dir={out}", f"cache_dir={out / 'cache'}",
                                                        f"parent.path={hf_parent}"])  # fmt: skip
    return out, run_pipeline(cfg)


def test_the_parent_directory_is_what_a_user_brings(hf_parent):
    shards = sorted(p.name for p in hf_parent.glob("*.safetensors"))
    assert len(shards) > 1 and (hf_parent / "model.safetensors.index.json").is_file()
    hf = json.loads((hf_parent / "config.json").read_text())
    assert hf["tie_word_embeddings"] and hf["rope_scaling"]["rope_type"] == "llama3"
    assert load_checkpoint(hf_parent).model.embed_tokens.weight.dtype == torch.bfloat16


def test_every_stage_runs_on_a_hf_parent_and_hands_over_its_template(hf_parent, chained):
    out, summary = chained
    assert [s for s in STAGES if s in summary] == list(STAGES)
    assert summary["parent"]["model"] == str(hf_parent.resolve()) and summary["parent"]["source"] == "path"
    assert not (out / "parent" / "model").exists()  # a user's parent is used in place, not copied
    parent = read_config(hf_parent)
    for stage in STAGES:
        assert (out / stage / "report.json").is_file(), stage
    for stage in MODEL_STAGES:
        model_dir = out / stage / "model"
        assert summary[stage]["model"] == str(model_dir), stage
        assert json.loads((out / stage / "report.json").read_text())["model"] == str(model_dir)
        chat = ChatTokenizer.from_dir(model_dir)  # the parent's tokenizer and template travel along
        assert chat.chat_template == CHATML_TEMPLATE and chat.eos_token == "<|im_end|>", stage
        cfg = read_config(model_dir)
        assert (cfg.vocab_size, cfg.hidden_size, cfg.tie_word_embeddings) == (parent.vocab_size, 64, True)
        assert cfg.rope_scaling == parent.rope_scaling, stage
    # each stage started from the one before it
    assert summary["sft"]["start"] == str(out / "recovery" / "model")
    assert summary["rloo"]["start"] == str(out / "grpo" / "model")
    assert summary["grpo"]["start"] == str(out / "sft" / "model")
    assert sum(b.attention.kind == "gqa" for b in read_config(out / "puzzle" / "model").blocks) <= 1
    # the prompts the stages trained and evaluated on are in the parent's own template
    sft_rep = json.loads((out / "sft" / "report.json").read_text())
    assert sft_rep["data"]["tokenized"]["kept"] == 8


def test_the_child_loads_in_transformers_with_its_chat_template(chained):
    import transformers

    out, _ = chained
    tok = transformers.AutoTokenizer.from_pretrained(out / "sft" / "model")
    text = tok.apply_chat_template([{"role": "system", "content": "detailed thinking off"}, {"role": "user", "content": "Q"}],
                                   tokenize=False, add_generation_prompt=True)  # fmt: skip
    assert text == ChatTokenizer.from_dir(out / "sft" / "model").prompt("Q", False)


def test_each_stage_runs_alone_from_the_directory_the_previous_one_wrote(hf_parent, chained, tmp_path):
    """`nemo-plugins <stage> model=DIR [teacher=DIR]`, each into an output directory of its own,
    from a copy of the previous stage's model (so nothing else in the chained run is read)."""
    src, _ = chained
    previous = {"puzzle": hf_parent, "fusion": src / "puzzle" / "model", "recovery": src / "fusion" / "model",
                "sft": src / "recovery" / "model", "grpo": src / "sft" / "model", "rloo": src / "grpo" / "model"}  # fmt: skip
    for stage, model in previous.items():
        moved = shutil.copytree(model, tmp_path / f"{stage}-input")  # e.g. written on another machine
        out = tmp_path / f"{stage}-out"
        argv = [stage, f"model={moved}", f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}", *SMALL]
        if stage == "recovery":
            argv.append(f"teacher={hf_parent}")
        assert main(argv) == 0, stage
        report = json.loads((out / "report.json").read_text())
        assert set(report) == {"config", "environment", "data", "resources", stage}, stage  # alone: no world, no parent
        assert set(report["resources"]) == {stage} and report["resources"][stage]["peak_rss_gb"] > 0
        assert report["resources"][stage]["weights_sha256"] == weights_digest(out / stage / "model")
        assert read_config(out / stage / "model").vocab_size == read_config(hf_parent).vocab_size
        if stage != "puzzle":  # puzzle's input is the parent itself
            assert json.loads((out / stage / "report.json").read_text()).get("model") == str(out / stage / "model")
    assert not (tmp_path / "recovery-out" / "parent").exists()  # the teacher came from teacher=


def test_a_stage_alone_names_a_missing_model_directory(tmp_path, capsys):
    assert main(["fusion", f"model={tmp_path / 'nope'}", f"output_dir={tmp_path / 'out'}", *SMALL]) == 2
    assert f"model={tmp_path / 'nope'}: not a directory" in capsys.readouterr().err


def test_recovery_refuses_a_teacher_with_another_vocabulary(hf_parent, chained, tiny_world, parent_checkpoint, tmp_path, capsys):
    src, _ = chained
    argv = ["recovery", f"model={src / 'fusion' / 'model'}", f"teacher={parent_checkpoint}", f"output_dir={tmp_path}", *SMALL]
    assert main(argv) == 2
    assert "different vocabularies" in capsys.readouterr().err


def test_a_real_parent_with_real_data_builds_no_tiny_world(hf_parent, tmp_path):
    """parent.path, data.text and data.problems all set: nothing of the tiny world is made (no
    problems, no tokenizer, no cache entry), and the world stage says so."""
    cache = tmp_path / "cache"
    overrides = [
        *SMALL, f"output_dir={tmp_path / 'out'}", f"cache_dir={cache}", f"parent.path={hf_parent}",
        "stages=[world,parent,evaluate,puzzle]", "data.text.builtin=champ", "data.text.seq_len=48",
        "data.text.train_tokens=480", "data.text.heldout_tokens=192", "data.problems.source=champ",
    ]  # fmt: skip
    summary = run_pipeline(load_config(PipelineConfig, DEFAULT_CONFIGS, overrides))
    assert summary["world"] == {"used": False, "why": "parent.path, data.text and data.problems are all real"}
    assert not (cache / "tiny_world").exists()
    assert summary["data"]["problems"]["source"] == "champ" and summary["puzzle"]["model"]
