"""Reward task "judge": an LLM judge behind the reward protocol (`scoring.JudgeScorer`), selected
by `rewards.task=judge`, checking held-out answers too (`RewardSettings.verifier()`); a GRPO run
scored by a judge that agrees with the rule is the rule's run, step for step."""

import copy
import json

import pytest
import torch

from nemo_plugins.config import DEFAULT_CONFIGS, ConfigError, load_config
from nemo_plugins.data import reasoning_world as rw
from nemo_plugins.data.chat import THINK_END, THINK_START
from nemo_plugins.data.curriculum import problems_by_id
from nemo_plugins.pipeline import PipelineConfig, run_pipeline
from nemo_plugins.rl import config as C
from nemo_plugins.rl import grpo as G
from nemo_plugins.rl.rewards import RewardConfig, answer_checker, check_reference, format_reward
from nemo_plugins.rl.scoring import InstructionScorer, JudgeScorer, Reference, RuleScorer, SandboxLimits

from judge_stub import GradingJudge, start_judge
from rl_models import rl_tokenizer, start_policy

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def judge_url():
    server, url = start_judge()
    yield url
    server.shutdown()
    server.server_close()


def settings(url, **kw) -> C.RewardSettings:
    judge = C.JudgeSettings(base_url=url, model="stub-judge", timeout_s=5.0, retries=0)
    return C.RewardSettings(task="judge", judge=judge, workers=0, **kw)


def think(body: str, answer: str) -> str:
    return f"{THINK_START}{body}{THINK_END}{answer}"


CASES = [  # (completion, reference, thinking)
    (think("2 + 3 = 5", "The answer is 5."), 5, True),
    (think("2 + 3 = 6", "The answer is 6."), 5, True),
    (f"{THINK_START}The answer is 5.", 5, True),  # only inside an unclosed think block
    ("The answer is 7.", 7, False),
    (think("", "The answer is 7."), 7, False),  # right answer, wrong layout for the mode
    ("It is seven.", 7, False),
]


def test_judge_scorer_agrees_with_the_rule_and_counts_failures(judge_url):
    refs = [Reference(answer, thinking, question=f"q{i}") for i, (_, answer, thinking) in enumerate(CASES)]
    texts = [c for c, _, _ in CASES]
    scorer = settings(judge_url).scorer()
    assert isinstance(scorer, JudgeScorer)
    got = scorer.score(texts, refs)
    rule = RuleScorer(RewardConfig("world"), SandboxLimits(workers=0)).score(texts, refs)
    assert got.parts["accuracy"].tolist() == rule.parts["accuracy"].tolist() == [1, 0, 0, 1, 1, 0]
    assert got.parts["format"].tolist() == [format_reward(t, th) for t, _, th in CASES]
    assert torch.allclose(got.total, got.parts["accuracy"] + 0.1 * got.parts["format"])
    assert not got.failures
    assert {q for q, _ in GradingJudge.seen} >= {f"q{i}" for i in range(len(CASES))}

    GradingJudge.seen.clear()
    long = "The answer is 5." + " " * 5000
    bad = scorer.score([CASES[0][0], CASES[0][0], long], [Reference(5, True, question="judge-down"),
                                                          Reference(5, True, question="fine"),
                                                          Reference(5, True, question="long")])  # fmt: skip
    assert bad.parts["accuracy"].tolist() == [0, 1, 0] and bad.total[2] == 0
    assert bad.failures == {"http:500": 1, "too_long": 1}
    assert [q for q, _ in GradingJudge.seen if q == "long"] == []  # too long: never sent


def test_rloo_instruction_reward_over_the_judge(judge_url):
    """RLOO's instruction reward adds to the judge's task reward as it does to the rule's."""
    refs = [Reference(12, True, "steps", question="a"), Reference(13, True, "steps", question="b"),
            Reference(12, False, "brackets", question="c")]  # fmt: skip
    texts = ["<think>7 + 5 = 12</think>The answer is 12.", "<think>7 + 5 = 12</think>The answer is 12.",
             "The answer is 12."]  # fmt: skip
    with InstructionScorer(settings(judge_url, accuracy_weight=0.5).scorer(), instruction_weight=2.0) as scorer:
        got = scorer.score(texts, refs)
    assert got.parts["accuracy"].tolist() == [1, 0, 1] and got.parts["instruction"].tolist() == [1, 1, 0]
    assert got.total.tolist() == pytest.approx([2.6, 2.1, 0.6])


def test_judge_settings_name_what_is_wrong(judge_url):
    with pytest.raises(ValueError, match=r"grpo.rewards.judge.base_url=None: expected a value with rewards.task=judge"):
        C.RewardSettings(task="judge")
    with pytest.raises(ValueError, match=r"grpo.rewards.judge.model=None"):
        C.RewardSettings(task="judge", judge={"base_url": judge_url})
    with pytest.raises(ValueError, match=r"grpo.rewards.judge.base_url must start with http"):
        C.RewardSettings(task="judge", judge={"base_url": "ftp://x", "model": "m"})
    with pytest.raises(ValueError, match=r"grpo.rewards.judge.retries must be >= 0"):
        C.RewardSettings(task="judge", judge={"base_url": judge_url, "model": "m", "retries": -1})
    C.RewardSettings(judge={"base_url": "ftp://unused"})  # another task does not read the judge
    with pytest.raises(ValueError, match="task 'judge' is scored by JudgeScorer"):
        RuleScorer(RewardConfig("judge"))
    with pytest.raises(ValueError, match=r"RewardSettings.verifier\(\)"):
        answer_checker("judge")
    with pytest.raises(ValueError, match="prompt p3: reference ' ' is not a non-blank text"):
        check_reference(" ", "judge", "prompt p3")
    check_reference("12 meters", "judge", "prompt p4")


def test_the_verifier_asks_the_judge(judge_url):
    problem = rw.generate_problems(1, seed=5, difficulties=(2,))[0]
    verify = settings(judge_url).verifier()
    right, wrong = rw.response_for(problem, True), think("x", f"The answer is {problem.answer + 1}.")
    assert (verify(right, problem), verify(wrong, problem)) == (True, False)
    assert GradingJudge.seen[-1][0] == problem.question
    assert verify.many([wrong, right, right], [problem] * 3) == [False, True, True]


def test_answers_are_checked_in_one_concurrent_call_when_the_verifier_can(judge_url, monkeypatch):
    """Held-out accuracy, pass rates and toggle evaluation check through `check_answers`, which
    hands the judge every answer at once (its calls then run `concurrency` at a time)."""
    from nemo_plugins.evaluate import check_answers, task_accuracy

    problems = rw.generate_problems(6, seed=6, difficulties=(1, 2))
    texts = [rw.response_for(p, True) if i % 2 else "The answer is 0." for i, p in enumerate(problems)]
    verify = settings(judge_url).verifier()
    assert check_answers(verify, texts, problems) == [bool(i % 2) for i in range(6)]
    assert check_answers(rw.is_correct, texts, problems) == [bool(i % 2) for i in range(6)]  # a plain function
    monkeypatch.setattr(C.JudgeVerifier, "__call__", lambda *a: pytest.fail("one call per answer"))
    tok = rl_tokenizer()
    acc = task_accuracy(start_policy(tok, steps=5), tok, problems, max_new_tokens=8, verify=verify)
    assert acc["n"] == 6


def test_grpo_scored_by_an_agreeing_judge_is_the_rule_run(judge_url, tmp_path):
    tok = rl_tokenizer()
    start = start_policy(tok)
    problems = problems_by_id(rw.generate_problems(24, seed=3, difficulties=(1, 2)))
    rates = {i: 0.5 for i in problems}
    held_out = rw.generate_problems(4, seed=4, difficulties=(1,))
    runs = {}
    for name, rewards in (("rule", C.RewardSettings(workers=0, format_weight=0.0)),
                          ("judge", settings(judge_url, format_weight=0.0))):  # fmt: skip
        cfg = G.GRPOConfig(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=24, micro_batch_size=8, lr=3e-3,
                           ckpt_every=2, eval_problems=4, rewards=rewards)  # fmt: skip
        policy = copy.deepcopy(start)
        GradingJudge.seen.clear()
        summary = G.run_grpo(policy, tok, problems, rates, cfg, tmp_path / name, eval_problems=held_out)
        runs[name] = (summary, policy.state_dict(), list(GradingJudge.seen))
    (rule, rule_w, _), (judged, judged_w, seen) = runs["rule"], runs["judge"]
    for a, b in zip(rule["history"], judged["history"]):
        assert (a["reward"], a["pass_rate"], a["batch"]) == (b["reward"], b["pass_rate"], b["batch"])
    assert all(torch.equal(rule_w[k], judged_w[k]) for k in rule_w)
    assert rule["final_eval"]["accuracy"] == judged["final_eval"]["accuracy"]
    asked = {q for q, _ in seen}
    assert {p.question for p in held_out} <= asked  # held-out accuracy came from the judge
    assert asked <= {p.question for p in [*problems.values(), *held_out]}  # the samples' own questions
    assert len(seen) == 2 * 4 * 4 + len(held_out)  # every sample of both steps, then each held-out answer


PIPELINE = [
    "progress=false", "world.n_train=64", "world.n_eval=8", "stages=[world,parent,evaluate,grpo]",
    "parent.steps=3", "parent.batch_size=8", "parent.hidden_size=64", "parent.intermediate_size=256",
    "parent.num_layers=2", "parent.num_attention_heads=4", "parent.num_kv_heads=2",
    "eval.n_problems=3", "eval.max_new_tokens=8", "eval.modes=[on]",
    "grpo.steps=1", "grpo.train_problems=4", "grpo.pass_rate_k=2", "grpo.prompts_per_step=2", "grpo.group_size=2",
    "grpo.max_new_tokens=8", "grpo.eval_problems=2", "grpo.compare_random=false", "grpo.eval_off=false",
    "grpo.difficulties=null", "grpo.eval_difficulties=null", "grpo.ckpt_every=1", "grpo.pass_rate_threshold=1.0",
    "grpo.rewards.task=judge", "grpo.rewards.judge.model=stub-judge",
]  # fmt: skip


def test_the_pipeline_runs_judge_prompts_and_asks_for_the_judge(judge_url, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"What is {i} plus one?", "answer": str(i + 1),
                                           "task": "judge"}) + "\n" for i in range(30)))  # fmt: skip
    data = ["data.problems.source=jsonl", f"data.problems.paths=[{prompts}]"]
    out = [f"output_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(ConfigError, match="grpo.rewards.judge.base_url=None"):
        load_config(PipelineConfig, DEFAULT_CONFIGS, [*PIPELINE, *data, *out])
    GradingJudge.seen.clear()
    summary = run_pipeline(load_config(PipelineConfig, DEFAULT_CONFIGS,
                                       [*PIPELINE, *data, *out, f"grpo.rewards.judge.base_url={judge_url}"]))  # fmt: skip
    assert summary["data"]["problems"]["task"] == "judge" and summary["evaluate"]["on"]["n"] == 3
    report = json.loads((tmp_path / "out" / "grpo" / "report.json").read_text())
    assert report["pass_rates"]["problems"] == 4
    asked = {q for q, _ in GradingJudge.seen}
    # evaluate (3 held-out), pass rates (4 x 2 samples), one GRPO step (2 x 2) and its held-out check (2)
    assert len(GradingJudge.seen) == 3 + 8 + 4 + 2 + 2 and all(q.startswith("What is ") for q in asked)


def test_the_readme_judge_overrides_load(tmp_path):
    """The README's judge override line makes a valid grpo config on a JSONL of judge prompts."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (line,) = [b.strip() for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S) if "rewards.task=judge" in b]
    data = ["data.problems.source=jsonl", f"data.problems.paths=[{tmp_path / 'p.jsonl'}]",
            "grpo.difficulties=null", "grpo.eval_difficulties=null"]  # fmt: skip
    cfg = load_config(PipelineConfig, DEFAULT_CONFIGS, ["stages=[world,parent,grpo]", *data, *shlex.split(line)])
    judge = cfg.grpo.rewards.judge
    assert cfg.grpo.rewards.task == "judge" and judge.base_url.startswith("http://") and judge.model


def test_the_aligner_reward_server_grades_judge_prompts_with_the_judge(judge_url, tmp_path):
    """The reward server behind Aligner's trainer (its verifier; PyTriton itself is the aligner
    tier's) scores token rows of judge prompts through the judge, with each row's question."""
    import numpy as np

    from nemo_plugins.aligner.reward_server import RewardServerConfig, build_verifier
    from nemo_plugins.data.chat_tokenizer import ChatTokenizer

    tok = ChatTokenizer.tiny(rl_tokenizer())
    prompts = tmp_path / "prompts.jsonl"
    questions = {"q1": ("What is 2 + 3?", "5"), "q2": ("What is 4 * 3?", "12")}
    prompts.write_text("".join(json.dumps({"id": k, "prompt": q, "answer": a, "task": "judge"}) + "\n"
                               for k, (q, a) in questions.items()))  # fmt: skip
    (tmp_path / "tok").mkdir()
    for name, text in tok.files().items():
        (tmp_path / "tok" / name).write_text(text)
    base = {"prompts": [str(prompts)], "tokenizer": str(tmp_path / "tok"), "workers": 0}
    with pytest.raises(ValueError, match="are of task 'judge': set judge.base_url= and judge.model="):
        build_verifier(RewardServerConfig(**base))
    with pytest.raises(ValueError, match="^judge.base_url must start with http"):
        RewardServerConfig(**base, judge={"base_url": "ftp://x", "model": "m"})
    verifier = build_verifier(RewardServerConfig(**base, judge={"base_url": judge_url, "model": "stub-judge"}))
    rows = [("What is 2 + 3?", True, "<think>2 + 3 = 5</think>The answer is 5."),
            ("What is 4 * 3?", True, "<think>4 * 3 = 13</think>The answer is 13."),
            ("What is 4 * 3?", False, "The answer is 12.")]  # fmt: skip
    seqs = [tok.example_ids(q, text, thinking)[0] for q, thinking, text in rows]
    tokens = np.zeros((len(seqs), max(map(len, seqs))), dtype=np.int64)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    GradingJudge.seen.clear()
    out = verifier(tokens, np.array([len(s) for s in seqs]))
    assert out.rewards.tolist() == pytest.approx([1.1, 0.1, 1.1]) and not out.failures
    assert sorted(q for q, _ in GradingJudge.seen) == sorted(q for q, _, _ in rows)


def test_unused_judge_settings_do_not_make_another_run(judge_url):
    """A run directory is named by the settings the run reads: the judge's only under task judge."""
    from nemo_plugins.rl.grpo_stage import GRPOStageConfig

    plain, other = GRPOStageConfig(), GRPOStageConfig(rewards=C.RewardSettings(judge={"timeout_s": 5.0}))
    assert C.run_key(plain) == C.run_key(other) and "judge" not in C.run_key(plain)["rewards"]
    judged = [GRPOStageConfig(rewards=C.RewardSettings(task="judge", judge={"base_url": judge_url, "model": "m",
                                                                            "timeout_s": t})) for t in (5.0, 9.0)]  # fmt: skip
    assert C.run_key(judged[0])["rewards"]["judge"]["base_url"] == judge_url
    assert C.run_key(judged[0]) != C.run_key(judged[1])
    assert "compare_random" not in C.run_key(plain, ("compare_random",))


def test_resuming_ignores_judge_settings_no_run_reads(tmp_path, caplog):
    """A checkpoint from before the judge existed (its rewards have no judge block) resumes without
    a "changed" warning; a changed setting the run reads still warns."""
    from dataclasses import asdict, replace

    from nemo_plugins.rl.loop import _unread_judge_as_now
    from nemo_plugins.utils.resume import TrainingState
    from nemo_plugins.utils.training import check_resumable

    cfg = G.GRPOConfig(rewards=C.RewardSettings(judge={"timeout_s": 3.0}))
    old = asdict(cfg)
    del old["rewards"]["judge"]
    state = TrainingState(tmp_path, 5, {"config": old})
    with caplog.at_level("WARNING"):
        check_resumable(_unread_judge_as_now(state, cfg), cfg, cfg.run_defining)
        assert "changed" not in caplog.text
        check_resumable(state, cfg, cfg.run_defining)  # unnormalized, the warning this prevents
        assert "changed ['rewards']" in caplog.text
    caplog.clear()
    other = replace(cfg, rewards=C.RewardSettings(accuracy_weight=2.0))
    with caplog.at_level("WARNING"):
        check_resumable(_unread_judge_as_now(state, other), other, other.run_defining)
    assert "changed ['rewards']" in caplog.text
    judged = replace(cfg, rewards=settings("http://127.0.0.1:1"))
    assert _unread_judge_as_now(state, judged) is state  # under task judge the judge counts


def test_the_pipeline_checks_judge_answers_with_grpos_judge(judge_url):
    """Outside the RL stages (evaluate, SFT's toggle evaluation), judge-task answers are checked by
    `grpo.rewards.judge`; unset, the error names its key."""
    from types import SimpleNamespace

    from nemo_plugins.pipeline import StageContext

    ctx = SimpleNamespace(problems=SimpleNamespace(task="judge"), cfg=PipelineConfig())
    with pytest.raises(ValueError, match=r"grpo.rewards.judge.base_url=None"):
        StageContext.verify(ctx)
    ctx.cfg.grpo.rewards.judge = C.JudgeSettings(base_url=judge_url, model="stub-judge")
    verify = StageContext.verify(ctx)
    problem = rw.generate_problems(1, seed=8, difficulties=(1,))[0]
    assert isinstance(verify, C.JudgeVerifier) and verify(rw.response_for(problem, True), problem)
    assert StageContext.verify(SimpleNamespace(problems=SimpleNamespace(task="world"))) is rw.is_correct
