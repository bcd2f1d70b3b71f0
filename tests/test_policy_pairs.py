"""Reward-model pairs from the policy's own samples: which sample is chosen and which rejected,
the counts of prompts without a pair, the stage's sets and cache, and config errors."""

import json

import pytest
import torch

from nemo_plugins.data import reasoning_world as rw
from nemo_plugins.data.problems import ProblemSet, ProblemSourceConfig
from nemo_plugins.data.tiny_world import World, WorldConfig
from nemo_plugins.model.rollout import Completions
from nemo_plugins.rl import policy_pairs as PP
from nemo_plugins.rl import reward_model_stage as S
from nemo_plugins.rl.reward_model_stage import RewardModelStageConfig, run_reward_model_stage

from rl_models import rl_tokenizer, start_policy

torch.set_num_threads(1)


def _fake_samples(monkeypatch, texts_per_prompt):
    def fake(model, chat, questions, thinking, cfg, **kw):
        assert thinking is True and cfg.n == len(texts_per_prompt[0]) and cfg.sampling.temperature == 0.7
        texts = [t for group in texts_per_prompt for t in group]
        return Completions(n=cfg.n, prompt_ids=[[]] * len(texts), ids=[[]] * len(texts), texts=texts,
                           lengths=[0] * len(texts), stopped=[True] * len(texts))  # fmt: skip

    monkeypatch.setattr(PP, "sample_questions", fake)


def test_the_first_right_well_formed_sample_is_chosen_against_the_first_wrong_one(monkeypatch):
    problems = [rw.Problem("q1", (), 5, 1), rw.Problem("q2", (), 7, 1), rw.Problem("q3", (), 9, 1),
                rw.Problem("q4", (), 4, 1)]  # fmt: skip
    ok = lambda n: f"<think>work</think>The answer is {n}."  # noqa: E731
    _fake_samples(monkeypatch, [
        ["The answer is 5.", ok(6), ok(5), ok(5) + " "],  # right without a think block: not chosen
        [ok(7), ok(7), ok(7), ok(7)],  # all right: no pair
        [ok(1), ok(2), ok(3), "The answer is 9."],  # no right, well-formed sample: no pair
        [ok(3), ok(4), ok(8), ok(4)],
    ])  # fmt: skip
    settings = PP.PolicyPairSettings(samples=4, temperature=0.7)
    pairs, counts = PP.policy_pairs(None, None, problems, "world", settings)
    assert [(p.prompt, p.chosen, p.rejected, p.thinking, p.kind) for p in pairs] == [
        ("q1", ok(5), ok(6), True, "policy"), ("q4", ok(4), ok(3), True, "policy")]  # fmt: skip
    assert counts == {"prompts": 4, "pairs": 2, "all_right": 1, "all_wrong": 1}


def _world(tok):
    train = rw.generate_problems(60, seed=21, difficulties=(1,))
    eval_ = rw.generate_problems(6, seed=22, difficulties=(1,))
    return World(WorldConfig(n_train=60, n_eval=6, difficulties=[1]), train, eval_, tok)


def test_the_stage_trains_on_verified_pairs_of_the_policys_samples_and_caches_them(tmp_path, monkeypatch):
    tok = rl_tokenizer()
    model, world = start_policy(tok, steps=300, off_every=0), _world(tok)  # right in about half its samples
    cfg = RewardModelStageConfig(steps=2, batch_size=8, train_pairs=40, heldout_pairs=12, val_every=2, ckpt_every=2,
                                 policy_samples=4, policy_max_new_tokens=48)  # fmt: skip
    calls = []
    real = PP.policy_pairs
    monkeypatch.setattr(S, "policy_pairs", lambda *a: calls.append(len(a[2])) or real(*a))
    report, _ = run_reward_model_stage(model, world, cfg, tmp_path)
    assert calls == [40, 12, 12]  # train, tuning, report problems
    sampled = report["sampled"]
    assert report["source"] == "the policy's samples (policy_pairs)"
    for name in ("train", "tuning", "report"):
        n = sampled[name]
        assert report["pairs"][name] == n["pairs"] > 0 and n["pairs"] + n["all_right"] + n["all_wrong"] >= n["prompts"]
    files = {f.name.split("-")[2]: json.loads(f.read_text())["value"] for f in tmp_path.glob("policy-pairs-*.json")}
    by_question = {p.question: p for p in world.train + world.extra_heldout(12, [1], tag="rm-tuning")}
    for rec in files["train"]["pairs"] + files["tuning"]["pairs"]:
        p = by_question[rec["prompt"]]
        assert rw.is_correct(rec["chosen"], p) and rw.has_think_block(rec["chosen"]) and not rw.is_correct(rec["rejected"], p)
    prompts = [{r["prompt"] for r in files[n]["pairs"]} for n in ("train", "tuning", "report")]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])

    again, _ = run_reward_model_stage(model, world, cfg, tmp_path)  # the samples come from the cache
    assert calls == [40, 12, 12] and again["pairs"] == report["pairs"]


def test_world_pairs_take_the_configured_kinds_and_thinking_share(tiny_world):
    problems = ProblemSet(tiny_world)
    sets = S.stage_pairs(problems, RewardModelStageConfig(world_kinds=["carried_step"], thinking_fraction=1.0,
                                                          train_pairs=30, heldout_pairs=6, difficulties=[2, 3]))  # fmt: skip
    assert [len(v) for v in sets.values()] == [30, 6, 6]
    assert {(p.kind, p.thinking) for v in sets.values() for p in v} == {("carried_step", True)}
    default = S.stage_pairs(problems, RewardModelStageConfig(train_pairs=30, heldout_pairs=6, difficulties=[2, 3]))
    assert {p.kind for p in default["train"]} == {"wrong_answer", "wrong_step", "bad_format"}
    assert {p.thinking for p in default["train"]} == {True, False}


def test_real_problem_sets_split_their_heldout_problems_into_tuning_and_report():
    champ = pytest.importorskip("champ_dataset") and ProblemSet(None, ProblemSourceConfig(source="champ"))
    sets = S.pair_prompts(champ, RewardModelStageConfig(train_pairs=50, heldout_pairs=10))
    ids = {name: [p.id for p in ps] for name, ps in sets.items()}
    assert ids["train"] == [p.id for p in champ.train[:50]]
    assert ids["tuning"] == [p.id for p in champ.eval[0::2][:10]] and ids["report"] == [p.id for p in champ.eval[1::2][:10]]


@pytest.mark.parametrize("bad, match", [
    ({"policy_samples": 1}, "policy_samples=1: expected 0"),
    ({"policy_samples": -2}, "policy_samples=-2: expected 0"),
    ({"policy_samples": True}, "policy_samples=True: expected 0"),
    ({"policy_samples": 4, "pairs_path": "p.jsonl"}, "policy_samples=4: expected 0 with reward_model.pairs_path='p.jsonl'"),
    ({"policy_samples": 4, "policy_temperature": 0.0}, "policy_temperature=0.0: expected a temperature > 0"),
    ({"policy_batch_size": 0}, "policy_batch_size=0: expected a positive integer"),
    ({"world_kinds": ["wrong_step", "typo"]}, r"world_kinds=\['wrong_step', 'typo'\]: expected a non-empty list of \['wrong_answer'"),
    ({"world_kinds": []}, r"world_kinds=\[\]: expected a non-empty list"),
    ({"thinking_fraction": 1.5}, "thinking_fraction=1.5: expected a number in"),
])  # fmt: skip
def test_config_names_the_bad_policy_pair_setting(bad, match):
    with pytest.raises(ValueError, match=f"reward_model.{match}"):
        RewardModelStageConfig(**bad)
