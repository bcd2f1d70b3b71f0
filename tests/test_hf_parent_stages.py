"""The stage contract on a parent that is not the tiny one: a random Hugging Face Llama directory
(sharded bf16 safetensors, tied embeddings, Llama-3 rope scaling, its own BPE tokenizer and ChatML
template) goes through every stage by the generic path on real problems (CHAMP, with a JSONL of
preference pairs for the reward model, as a user of `--preset smollm2` adding reward_model and rpo
would give), and each stage runs alone from the directory the previous one wrote (puzzle..rloo on
the tiny world's problems, so both kinds of problems meet the parent's template)."""

import json
import re
import shutil

import pytest
import torch

from nemo_plugins.cli.main import main
from nemo_plugins.config import DEFAULT_CONFIGS, load_config
from nemo_plugins.data.chat_tokenizer import ChatTokenizer
from nemo_plugins.data.preference_pairs import PreferencePair, load_pairs, write_pairs
from nemo_plugins.data.problems import ProblemSet, ProblemSourceConfig
from nemo_plugins.model.checkpoint import fingerprint, load_checkpoint, read_config
from nemo_plugins.pipeline import STAGES, PipelineConfig, load_model, run_pipeline
from nemo_plugins.rl.reward_model import load_reward_model
from nemo_plugins.rl.reward_model_stage import split_by_prompt
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
    "reward_model.steps=1", "reward_model.batch_size=4", "reward_model.val_every=1", "reward_model.ckpt_every=1",
    "reward_model.heldout_fraction=0.25",
    "rpo.steps=1", "rpo.iterations=1", "rpo.train_problems=4", "rpo.prompts_per_step=2", "rpo.group_size=2",
    "rpo.max_new_tokens=8", "rpo.eval_problems=2", "rpo.rewards.workers=0", "rpo.ckpt_every=1",
]  # fmt: skip
MODEL_STAGES = ("puzzle", "fusion", "recovery", "sft", "grpo", "rloo", "rpo")
# CHAMP's problems for every stage that asks questions: no tiny-world levels, math-verified answers
CHAMP = [
    "data.problems.source=champ", "sft.max_len=512", "sft.batch_size=2",  # CHAMP's thinking-on examples are long
    "grpo.difficulties=null", "grpo.eval_difficulties=null", "grpo.rewards.task=math",
    "rloo.difficulties=null", "rloo.rewards.task=math",
    "rpo.difficulties=null", "rpo.eval_difficulties=null", "rpo.rewards.task=math",
]  # fmt: skip
N_PAIRS = 16


def champ_pairs() -> list[PreferencePair]:
    """Preference pairs on CHAMP training prompts, as a user would bring them: the reference
    answer boxed against a wrong one."""
    problems = ProblemSet(None, ProblemSourceConfig(source="champ")).train[:N_PAIRS]
    return [PreferencePair(p.question, f"The answer is \\boxed{{{p.answer}}}.", "The answer is \\boxed{0.5}.",
                           kind="wrong_answer") for p in problems]  # fmt: skip


@pytest.fixture(scope="module")
def hf_parent(tmp_path_factory):
    return write_hf_llama(tmp_path_factory.mktemp("user") / "my-llama")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    assert write_pairs(champ_pairs(), path) == N_PAIRS
    return path


@pytest.fixture(scope="module")
def chained(hf_parent, pairs_file, tmp_path_factory):
    """The whole pipeline on the HF parent and CHAMP's problems, in one output directory."""
    out = tmp_path_factory.mktemp("chained")
    cfg = load_config(PipelineConfig, DEFAULT_CONFIGS, [*SMALL, *CHAMP, f"reward_model.pairs_path={pairs_file}",
                                                        f"output_dir={out}", f"cache_dir={out / 'cache'}",
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
    # the prompts the stages trained and evaluated on are CHAMP's, in the parent's own template
    assert summary["data"]["problems"]["source"] == "champ"
    sft_rep = json.loads((out / "sft" / "report.json").read_text())
    tokenized = sft_rep["data"]["tokenized"]  # 4 problems, both modes; 3 thinking-on ones over sft.max_len
    assert sft_rep["data"]["world_problems"] == 4 and (tokenized["examples"], tokenized["kept"]) == (8, 5)


def test_the_reward_model_and_rpo_continue_rloos_policy_on_real_problems(hf_parent, pairs_file, chained):
    """reward_model trains from rloo's model on the pairs file and passes that policy on; rpo
    starts from the same policy (not the reward model's backbone) and scores with the head the
    reward_model stage wrote."""
    out, summary = chained
    rloo_model = out / "rloo" / "model"
    rm_dir = out / "reward_model"
    assert summary["reward_model"]["start"] == summary["rpo"]["start"] == str(rloo_model)
    assert summary["reward_model"]["reward_model"] == summary["rpo"]["reward_model"] == str(rm_dir)
    assert "model" not in summary["reward_model"]  # the policy goes on, not the reward model
    start = fingerprint(load_model(rloo_model))
    rm_rep = json.loads((rm_dir / "report.json").read_text())
    rpo_rep = json.loads((out / "rpo" / "report.json").read_text())
    assert rm_rep["start_fingerprint"] == rpo_rep["start_fingerprint"] == start
    # the pairs came from the file, split by prompt into the three sets
    expected = {k: len(v) for k, v in split_by_prompt(load_pairs(pairs_file)[0], 0.25, seed=0).items()}
    assert rm_rep["source"] == str(pairs_file) and rm_rep["pairs"] == expected and sum(expected.values()) == N_PAIRS
    # the reward model: a backbone with the parent's tokenizer and template, and a head beside it
    rm = load_reward_model(rm_dir)
    assert fingerprint(rm.backbone) != start  # trained from the policy's weights, a step away
    assert rm.backbone.config.vocab_size == read_config(hf_parent).vocab_size
    assert ChatTokenizer.from_dir(rm_dir / "model").chat_template == CHATML_TEMPLATE
    # rpo: one round on CHAMP's prompts, judged on CHAMP's held-out split by that reward model
    rows = rpo_rep["iterations"]
    assert [r["iteration"] for r in rows] == [0, 1] and rows[0]["win_rate"] == 0.5
    assert all(r["n"] == 2 for r in rows) and rows[1]["steps"] == 1 and rows[1]["pairs"] + rows[1]["ties_skipped"] == 2
    assert rpo_rep["heldout"]["set"] == "eval split" and rpo_rep["train_prompts"] == 4


def test_the_child_loads_in_transformers_with_its_chat_template(chained):
    import transformers

    out, _ = chained
    tok = transformers.AutoTokenizer.from_pretrained(out / "sft" / "model")
    text = tok.apply_chat_template([{"role": "system", "content": "detailed thinking off"}, {"role": "user", "content": "Q"}],
                                   tokenize=False, add_generation_prompt=True)  # fmt: skip
    assert text == ChatTokenizer.from_dir(out / "sft" / "model").prompt("Q", False)


def test_each_stage_runs_alone_from_the_directory_the_previous_one_wrote(hf_parent, pairs_file, chained, tmp_path):
    """`nemo-plugins <stage> model=DIR [teacher=DIR]`, each into an output directory of its own,
    from a copy of the previous stage's model (so nothing else in the chained run is read)."""
    src, _ = chained
    previous = {"puzzle": hf_parent, "fusion": src / "puzzle" / "model", "recovery": src / "fusion" / "model",
                "sft": src / "recovery" / "model", "grpo": src / "sft" / "model", "rloo": src / "grpo" / "model",
                "reward_model": src / "rloo" / "model", "rpo": src / "rloo" / "model"}  # fmt: skip
    moved_rm = shutil.copytree(src / "reward_model", tmp_path / "reward-model-input", ignore=shutil.ignore_patterns("run-*"))
    for stage, model in previous.items():
        moved = shutil.copytree(model, tmp_path / f"{stage}-input")  # e.g. written on another machine
        out = tmp_path / f"{stage}-out"
        argv = [stage, f"model={moved}", f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}", *SMALL]
        if stage == "recovery":
            argv.append(f"teacher={hf_parent}")
        if stage in ("reward_model", "rpo"):  # on real problems: the pairs file, and the reward model it made
            argv += [*CHAMP, f"reward_model.pairs_path={pairs_file}", f"rpo.reward_model={moved_rm}"]
        assert main(argv) == 0, stage
        report = json.loads((out / "report.json").read_text())
        assert set(report) == {"config", "environment", "data", "resources", stage}, stage  # alone: no world, no parent
        assert set(report["resources"]) == {stage} and report["resources"][stage]["peak_rss_gb"] > 0
        if stage == "reward_model":  # a reward model beside the policy it leaves as it was
            assert report[stage]["start"] == str(moved) and report[stage]["reward_model"] == str(out / stage)
            assert load_reward_model(out / stage).backbone.config.vocab_size == read_config(hf_parent).vocab_size
            continue
        assert report["resources"][stage]["weights_sha256"] == weights_digest(out / stage / "model")
        assert read_config(out / stage / "model").vocab_size == read_config(hf_parent).vocab_size
        if stage != "puzzle":  # puzzle's input is the parent itself
            assert json.loads((out / stage / "report.json").read_text()).get("model") == str(out / stage / "model")
    assert not (tmp_path / "recovery-out" / "parent").exists()  # the teacher came from teacher=
    rpo = json.loads((tmp_path / "rpo-out" / "report.json").read_text())["rpo"]
    assert rpo["start"] == str(tmp_path / "rpo-input") and rpo["reward_model"] == str(moved_rm)
    assert ChatTokenizer.from_dir(tmp_path / "rpo-out" / "rpo" / "model").chat_template == CHATML_TEMPLATE


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


def test_the_reward_model_on_real_problems_without_pairs_names_the_key_before_any_stage_runs(hf_parent, tmp_path, capsys):
    """Only the tiny world builds its own pairs: on other problems the reward model needs a pairs
    file, and the run is refused when its config loads (not after the stages before it)."""
    from nemo_plugins.rl.reward_model_stage import RewardModelStageConfig, stage_pairs

    out = tmp_path / "out"
    wanted = "reward_model.pairs_path=None: data.problems.source=champ has no tiny-world responses"
    assert main(["reward_model", f"model={hf_parent}", f"output_dir={out}", *SMALL, *CHAMP]) == 2
    err = capsys.readouterr().err
    assert wanted in err and "give reward_model.pairs_path=PAIRS.jsonl" in err
    assert not out.exists()
    with pytest.raises(ValueError, match=re.escape(wanted)):  # the stage itself, called as a library
        stage_pairs(ProblemSet(None, ProblemSourceConfig(source="champ")), RewardModelStageConfig())
    # stages without the reward model, or with a pairs file, load
    assert load_config(PipelineConfig, DEFAULT_CONFIGS, ["data.problems.source=champ", "stages=[world,parent,sft]"])
    assert load_config(PipelineConfig, DEFAULT_CONFIGS, [*CHAMP, "reward_model.pairs_path=p.jsonl"])


def test_the_reward_model_from_the_policys_own_samples_runs_on_real_problems(hf_parent, tmp_path, capsys):
    """`reward_model.policy_samples` builds pairs from the policy's verified samples on any problem
    source: the config loads on CHAMP; a policy with no right answer (a random one) gets a clear
    error naming the setting and the counts, and nothing is written in place of a reward model."""
    assert load_config(PipelineConfig, DEFAULT_CONFIGS, [*CHAMP, "reward_model.policy_samples=4"])
    out = tmp_path / "out"
    small = ["reward_model.policy_samples=2", "reward_model.train_pairs=2", "reward_model.heldout_pairs=2",
             "reward_model.policy_max_new_tokens=4"]  # fmt: skip
    assert main(["reward_model", f"model={hf_parent}", f"output_dir={out}", *SMALL, *CHAMP, *small]) == 2
    err = capsys.readouterr().err
    assert "reward_model.policy_samples=2: expected samples that give pairs (the train set has none: " in err
    assert "'all_wrong': 2" in err and not (out / "reward_model" / "report.json").exists()
