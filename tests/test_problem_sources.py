"""`data.problems`: CHAMP or the user's RL prompt JSONL as what evaluation, SFT and GRPO ask and
check, split by problem id; the tiny world when unset."""

import json

import pytest

from nemo_plugins.config import DEFAULT_CONFIGS, ConfigError, load_config
from nemo_plugins.data.problems import ProblemSet, ProblemSourceConfig
from nemo_plugins.data.text_data import is_heldout
from nemo_plugins.pipeline import PipelineConfig, run_pipeline
from nemo_plugins.rl.rewards import answer_checker

pytest.importorskip("champ_dataset")

SMALL = [
    "progress=false", "world.n_train=64", "world.n_eval=8",
    "parent.steps=3", "parent.batch_size=8", "parent.hidden_size=64", "parent.intermediate_size=256",
    "parent.num_layers=2", "parent.num_attention_heads=4", "parent.num_kv_heads=2",
    "eval.n_problems=3", "eval.max_new_tokens=8", "eval.modes=[on]",
    "sft.steps=1", "sft.world_problems=6", "sft.val_problems=2", "sft.val_batches=1", "sft.eval_problems=2",
    "sft.eval_batch_size=2", "sft.max_new_tokens=8", "sft.val_every=1", "sft.ckpt_every=1", "sft.max_len=512",
    "sft.overflow=truncate",
    "grpo.steps=1", "grpo.train_problems=4", "grpo.pass_rate_k=2", "grpo.prompts_per_step=2", "grpo.group_size=2",
    "grpo.max_new_tokens=8", "grpo.eval_problems=2", "grpo.rewards.workers=0", "grpo.compare_random=false",
    "grpo.eval_off=false", "grpo.difficulties=null", "grpo.eval_difficulties=null", "grpo.ckpt_every=1", "grpo.pass_rate_threshold=1.0",
]  # fmt: skip


def test_champ_problems_split_by_id_with_references(tiny_world):
    ps = ProblemSet(tiny_world, ProblemSourceConfig(source="champ", heldout_fraction=0.2))
    assert ps.task == "math" and len(ps.train) + len(ps.eval) == 212
    assert all(is_heldout(p.id, 0.2) for p in ps.eval) and not any(is_heldout(p.id, 0.2) for p in ps.train)
    verify = answer_checker(ps.task)
    p = ps.eval[0]
    assert verify(f"<think>work</think>The answer is \\boxed{{{p.answer}}}.", p)
    assert not verify("<think>work</think>The answer is \\boxed{12345678}.", p)
    pairs = ps.sft_examples(ps.train[:3])
    assert [ex.thinking for ex in pairs] == [True, False] * 3 and ps.train[0].steps[0] in pairs[0].reasoning  # human steps in the think block
    assert not pairs[0].reasoning.splitlines()[-1].startswith("So the answer is")
    concluded = ProblemSet(tiny_world, ProblemSourceConfig(source="champ", conclude_trace=True))
    on, off = concluded.sft_examples(ps.train[:1])
    assert on.reasoning == pairs[0].reasoning + "\nSo the answer is " + on.reasoning.rsplit("So the answer is ", 1)[1]
    assert off == pairs[1] and concluded.key == ps.key  # the problems and their split are the same
    worded = ProblemSet(tiny_world, ProblemSourceConfig(source="champ", answer_wording="champ"))
    assert worded.key == ps.key and all(  # plain by default: the boxed reference alone
        off.response == f"The answer is \\boxed{{{p.answer}}}." for p in ps.train for _, off in [ps.sft_examples([p])]
    )  # fmt: skip
    changed = [p for p in ps.train if worded.sft_examples([p])[1] != ps.sft_examples([p])[1]]
    assert changed and all(", so the answer is \\boxed{" in worded.sft_examples([p])[1].response for p in changed)
    with pytest.raises(ValueError, match="data.problems.answer_wording='words'"):
        ProblemSourceConfig(source="champ", answer_wording="words")


def test_jsonl_prompts_need_one_task_and_name_bad_records(tiny_world, tmp_path):
    good = [{"id": f"q{i}", "prompt": f"What is {i} + 1?", "answer": str(i + 1), "task": "math"} for i in range(20)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in good) + "\n{bad json\n")
    ps = ProblemSet(tiny_world, ProblemSourceConfig(source="jsonl", paths=[str(path)]))
    assert ps.task == "math" and len(ps.train) + len(ps.eval) == 20
    assert ps.report["jsonl"]["skipped"] == 1 and "prompts.jsonl:21" in ps.report["jsonl"]["problems"][0]
    assert ps.sft_examples(ps.train) == []  # prompts without solutions make no SFT pairs
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(good[0]) + "\n" + json.dumps({**good[1], "task": "world", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match="one task"):
        ProblemSet(tiny_world, ProblemSourceConfig(source="jsonl", paths=[str(mixed)]))
    with pytest.raises(ConfigError, match="data.problems.source=jsonl: give data.problems.paths"):
        load_config(PipelineConfig, DEFAULT_CONFIGS, ["data.problems.source=jsonl"])


def test_evaluate_sft_and_grpo_run_on_champ(tmp_path):
    overrides = [*SMALL, f"output_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}",
                 "stages=[world,parent,evaluate,sft,grpo]", "data.problems.source=champ", "grpo.rewards.task=math"]  # fmt: skip
    summary = run_pipeline(load_config(PipelineConfig, DEFAULT_CONFIGS, overrides))
    problems = summary["data"]["problems"]
    assert problems["source"] == "champ" and problems["task"] == "math"
    assert summary["evaluate"]["on"]["n"] == 3
    sft = json.loads((tmp_path / "out" / "sft" / "report.json").read_text())
    assert sft["data"]["world_examples"] == 12 and sft["after"]["on"]["n"] == 2
    grpo = json.loads((tmp_path / "out" / "grpo" / "report.json").read_text())
    assert grpo["pass_rates"]["problems"] == 4
    pool = json.loads((tmp_path / "out" / "grpo" / "pass_rates.json").read_text())["pass_rates"]
    assert len(pool) == 4


def test_grpo_refuses_settings_that_do_not_fit_the_problems(tmp_path):
    """The pipeline refuses them when its config loads; the stage alone (a library call) too."""
    from nemo_plugins.rl.grpo_stage import GRPOStageConfig, heldout_set, run_grpo_stage

    overrides = [*SMALL, f"output_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}",
                 "stages=[world,parent,grpo]", "data.problems.source=champ"]  # fmt: skip
    with pytest.raises(ConfigError, match="grpo.rewards.task=world: the rewards must check the problems' task"):
        load_config(PipelineConfig, DEFAULT_CONFIGS, overrides)
    with pytest.raises(ConfigError, match=r"grpo.eval_difficulties=\[2\]: levels exist only in the tiny world"):
        load_config(PipelineConfig, DEFAULT_CONFIGS, [*overrides, "grpo.rewards.task=math",
                                                      "grpo.eval_difficulties=[2]"])  # fmt: skip
    assert not (tmp_path / "out").exists()
    champ = ProblemSet(None, ProblemSourceConfig(source="champ"))
    with pytest.raises(ValueError, match="grpo.rewards.task='world': expected 'math'"):
        run_grpo_stage(None, None, GRPOStageConfig(), tmp_path / "alone", chat=object(), problems=champ)
    with pytest.raises(ValueError, match=r"grpo.eval_difficulties=\[2\]: expected null: it draws new tiny-world"):
        heldout_set(champ, GRPOStageConfig(eval_difficulties=[2]))


def test_grpo_results_are_keyed_by_the_problems(tmp_path):
    """Another problem set is another GRPO run and another 'before' evaluation, not a cache hit."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"What is {i} + 1?", "answer": str(i + 1),
                                           "task": "math"}) + "\n" for i in range(30)))  # fmt: skip
    base = [*SMALL, f"output_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}", "stages=[world,parent,grpo]",
            "grpo.rewards.task=math"]  # fmt: skip
    run_pipeline(load_config(PipelineConfig, DEFAULT_CONFIGS, [*base, "data.problems.source=champ"]))
    before = json.loads((tmp_path / "out" / "grpo" / "before.json").read_text())["key"]
    run_pipeline(load_config(PipelineConfig, DEFAULT_CONFIGS, [*base, "data.problems.source=jsonl",
                                                               f"data.problems.paths=[{prompts}]"]))  # fmt: skip
    assert len(list((tmp_path / "out" / "grpo").glob("curriculum-*"))) == 2
    assert json.loads((tmp_path / "out" / "grpo" / "before.json").read_text())["key"] != before
