"""Iterative online RPO on a tiny model: best/worst pairs (ties skipped), pair micro-batches that
add up to the full-batch update, the previous round's policy as reference, crash + resume bit for
bit, and the reward_model and rpo stages end to end; config errors."""

import copy
import json
import re

import lightning as L
import pytest
import torch

from nemo_plugins.config import CONF_DIR, ConfigError, load_config
from nemo_plugins.data import reasoning_world as rw
from nemo_plugins.data import tokenizer as T
from nemo_plugins.data.chat_tokenizer import as_chat
from nemo_plugins.data.curriculum import problems_by_id
from nemo_plugins.data.tiny_world import World, WorldConfig
from nemo_plugins.model.checkpoint import load_checkpoint
from nemo_plugins.rl import config as C
from nemo_plugins.rl import loop
from nemo_plugins.rl import rpo as R
from nemo_plugins.rl import update as U
from nemo_plugins.rl.experience import choose_modes, rollout, score_rollout
from nemo_plugins.rl.preference_loss import PreferenceLoss
from nemo_plugins.rl.reward_model import RewardModel, RewardModelScorer, load_reward_model, score_sequences
from nemo_plugins.rl.scoring import Reference
from nemo_plugins.rl.reward_model_stage import RewardModelStageConfig, run_reward_model_stage, split_by_prompt
from nemo_plugins.rl.rpo_stage import RPOStageConfig, run_rpo_stage, win_rate
from nemo_plugins.data.preference_pairs import PreferencePair
from nemo_plugins.utils.resume import latest

from rl_models import rl_tokenizer, start_policy

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return rl_tokenizer()


@pytest.fixture(scope="module")
def start_model(tok):
    """A tiny model briefly trained on difficulty-1 problems: its samples differ, so pairs form."""
    return start_policy(tok, problems=300, steps=40, off_every=0)


@pytest.fixture(scope="module")
def reward_model(start_model):
    torch.manual_seed(1)
    rm = RewardModel(copy.deepcopy(start_model))
    torch.nn.init.normal_(rm.head.weight, std=0.5)  # scores that differ between responses
    return rm.eval()


@pytest.fixture(scope="module")
def problems():
    return problems_by_id(rw.generate_problems(24, seed=3, difficulties=(1, 2)))


def small(**kw) -> R.RPOConfig:
    cfg = dict(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=16, micro_batch_size=8, lr=3e-3,
               ckpt_every=1, eval_problems=0, beta=0.5, rewards=C.RewardSettings(workers=0))  # fmt: skip
    cfg.update(kw)
    return R.RPOConfig(**cfg)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(a, b):
    return [k for k in a if not torch.equal(a[k], b[k])]


# ----------------------------------------------------------------------------- pairs


def test_best_and_worst_make_the_pair_and_ties_are_skipped():
    scores = torch.tensor([0.1, 0.9, -0.3, 0.5,  # group 0: best 1, worst 2
                           0.2, 0.2, 0.2, 0.2,  # group 1: all equal -> tie
                           1.0, 3.0, 3.0, -2.0,  # group 2: best 9 (first of the equal), worst 11
                           0.4, 0.7, 0.1, 0.3])  # group 3: best 13, worst 14 but the same response  # fmt: skip
    completions = [[i] for i in range(12)] + [[5, 6], [7, 8], [7, 8], [9]]
    pairs, ties = R.best_worst_pairs(scores, 4, completions)
    assert pairs.tolist() == [[1, 2], [9, 11]] and ties == 2
    pairs, ties = R.best_worst_pairs(scores, 4)  # without responses only equal scores tie
    assert pairs.tolist() == [[1, 2], [9, 11], [13, 14]] and ties == 1
    with pytest.raises(ValueError, match="group_size"):
        R.best_worst_pairs(scores[:6], 4)


def test_verified_pairs_take_the_best_right_response_against_the_worst_wrong_one():
    scores = torch.tensor([0.1, 0.9, -0.3, 0.5,  # right: 0, 2 (best 0); wrong: 1, 3 (worst 3)
                           0.2, 0.4, 0.6, 0.8,  # all right -> none
                           1.0, 3.0, 2.0, -2.0,  # right: 11 only; wrong: 8, 9, 10 (worst 8)
                           0.4, 0.7, 0.1, 0.3])  # all wrong -> none  # fmt: skip
    accepted = torch.tensor([1, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0], dtype=torch.float)
    pairs, skipped = R.verified_pairs(scores, accepted, 4)
    assert pairs.tolist() == [[0, 3], [11, 8]] and skipped == 2
    with pytest.raises(ValueError, match="group_size"):
        R.verified_pairs(scores[:6], accepted[:6], 4)


def test_random_pairs_are_two_different_responses_of_a_group_drawn_reproducibly():
    completions = [[i] for i in range(12)] + [[7]] * 4  # the last group: one response four times
    pairs, ties = R.random_pairs(completions, 4, seed=3)
    assert ties == 1 and len(pairs) == 3
    for c, r in pairs.tolist():
        assert c // 4 == r // 4 and c != r
    assert torch.equal(pairs, R.random_pairs(completions, 4, seed=3)[0])  # a resumed step draws the same
    draws = {tuple(map(tuple, R.random_pairs(completions, 4, seed=s)[0].tolist())) for s in range(20)}
    assert len(draws) > 10  # the seed matters
    firsts = {c % 4 for s in range(40) for c, _ in R.random_pairs(completions, 4, seed=s)[0].tolist()}
    assert firsts == {0, 1, 2, 3}  # not tied to a position


def rpo(cfg: R.RPOConfig, reward_model: RewardModel, tok) -> R.RPO:
    return R.RPO(cfg, RewardModelScorer(reward_model, tok))


def test_the_reward_model_behind_the_reward_protocol(tok, start_model, reward_model, problems):
    """Scored as text (encoded as the reward model's training pairs), a rollout's stopped responses
    get the scores of their sampled tokens; a reference without its question is refused."""
    cfg = small()
    probs = list(problems.values())[:4]
    roll = rollout(start_model, tok, probs, [True, False, True, False], cfg, seed=7)
    scorer = RewardModelScorer(reward_model, tok, batch_size=5)
    refs = [Reference(a, t, question=p.question) for a, t, p in zip(roll.answers, roll.thinking, [
        p for p in probs for _ in range(cfg.group_size)])]  # fmt: skip
    got = scorer.score(roll.texts, refs)
    sampled = score_sequences(reward_model, [p + c for p, c in zip(roll.prompt_ids, roll.completions)], as_chat(tok).pad_id)
    stopped = [not t for t in roll.truncated]
    assert sum(stopped) >= 8 and not got.failures and torch.equal(got.parts["reward_model"], got.total)
    torch.testing.assert_close(got.total[stopped], sampled[stopped])
    torch.testing.assert_close(scorer.score_ids([p + c for p, c in zip(roll.prompt_ids, roll.completions)]), sampled)
    assert len(set(got.total.tolist())) > 4  # the scores depend on the response
    with pytest.raises(ValueError, match="reference 0 has no question"):
        scorer.score(roll.texts[:1], [Reference(1, True)])


def test_prepare_pairs_the_reward_models_best_and_worst(tok, start_model, reward_model, problems):
    cfg = small()
    probs = list(problems.values())[:4]
    roll = rollout(start_model, tok, probs, choose_modes(4, 0.0, 0, 0), cfg, seed=7)
    prepared = rpo(cfg, reward_model, tok).prepare(roll, score_rollout(roll, cfg.rewards.scorer(), cfg))
    scores = prepared.rewards.view(4, 4)
    for c, r in prepared.pairs.tolist():
        g = c // 4
        assert r // 4 == g and scores[g].max() == prepared.rewards[c] and scores[g].min() == prepared.rewards[r]
    assert prepared.metrics["pairs"] + prepared.metrics["ties_skipped"] == 4 and prepared.metrics["pairs"] > 0
    assert int(prepared.keep.sum()) == 2 * prepared.metrics["pairs"]


def test_rule_weight_adds_the_rule_reward_to_the_reward_models_score(tok, start_model, reward_model, problems):
    """reward = RM score + w x rule reward: with a large w the one right response of a group is
    chosen although the reward model scores it lowest; rm_score logs the reward model alone."""
    import dataclasses

    probs = list(problems.values())[:4]
    base = small()
    roll = rollout(start_model, tok, probs, choose_modes(4, 0.0, 0, 0), base, seed=7)
    plain = rpo(base, reward_model, tok).prepare(roll, score_rollout(roll, base.rewards.scorer(), base))
    rm = plain.rewards.view(4, 4)
    right = torch.zeros(16)
    right[torch.arange(4) * 4 + rm.argmin(dim=1)] = 1.0  # the verifier accepts the RM's worst response of each group
    rewards = dataclasses.replace(score_rollout(roll, base.rewards.scorer(), base), total=right, accuracy=right)
    w = 100.0
    mixed = rpo(small(rule_weight=w), reward_model, tok).prepare(roll, rewards)
    torch.testing.assert_close(mixed.rewards, plain.rewards + w * right)
    assert mixed.metrics["rm_score"] == plain.metrics["rm_score"] and mixed.metrics["chosen_pass_rate"] == 1.0
    assert len(mixed.pairs) == 4
    for c, r in mixed.pairs.tolist():
        g = c // 4
        assert right[c] == 1 and rm[g].min() == plain.rewards[c]  # the verified response, the RM's lowest
        assert r == g * 4 + int(torch.where(right.view(4, 4)[g] == 1, torch.inf, rm[g]).argmin())  # worst of the wrong
    with pytest.raises(ValueError, match=r"rpo\.rule_weight"):
        small(rule_weight=-1.0)
    assert rpo(small(sft_loss_weight=0.5), reward_model, tok).loss == PreferenceLoss("rpo_bwd_kl", 0.5, 1.0, 0.5)


def test_verified_and_random_pairs_in_prepare(tok, start_model, reward_model, problems):
    """pairs=verified: every chosen response is accepted and every rejected one is not, the reward
    still RM + w x rule; pairs=random: pairs inside groups, not the reward's best and worst."""
    import dataclasses

    probs = list(problems.values())[:4]
    base = small()
    roll = rollout(start_model, tok, probs, choose_modes(4, 0.0, 0, 0), base, seed=7)
    right = torch.tensor([1.0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0])  # groups 0, 1 mixed
    rewards = dataclasses.replace(score_rollout(roll, base.rewards.scorer(), base), total=right, accuracy=right)
    ver = rpo(small(pairs="verified", rule_weight=0.5), reward_model, tok).prepare(roll, rewards)
    assert len(ver.pairs) == 2 and ver.metrics["ties_skipped"] == 2
    assert right[ver.pairs[:, 0]].tolist() == [1, 1] and right[ver.pairs[:, 1]].tolist() == [0, 0]
    rm = rpo(base, reward_model, tok).prepare(roll, rewards).rewards
    torch.testing.assert_close(ver.rewards, rm + 0.5 * right)
    for c, r in ver.pairs.tolist():  # the best-rewarded right one against the worst-rewarded wrong one
        g = slice(c // 4 * 4, c // 4 * 4 + 4)
        assert ver.rewards[c] == ver.rewards[g][right[g] == 1].max()
        assert ver.rewards[r] == ver.rewards[g][right[g] == 0].min()
    rnd = rpo(small(pairs="random", loss="dpo"), reward_model, tok).prepare(roll, rewards)
    assert torch.equal(rnd.pairs, R.random_pairs(roll.completions, 4, 0)[0])


def test_pair_micro_batches_sum_to_the_full_batch_update(tok, start_model, reward_model, problems):
    cfg = small()
    probs = list(problems.values())[:4]
    roll = rollout(start_model, tok, probs, choose_modes(4, 0.0, 0, 0), cfg, seed=3)
    scores = torch.randn(16, generator=torch.Generator().manual_seed(0))
    pairs, _ = R.best_worst_pairs(scores, 4, roll.completions)
    assert len(pairs) >= 3
    result = {}
    for mb in (2, 16):  # one pair per micro-batch, and all pairs in one
        policy = copy.deepcopy(start_model)
        opt = torch.optim.SGD(policy.parameters(), lr=0.5)
        batches = U.pair_batches(policy, start_model, roll, pairs, scores, small(micro_batch_size=mb), 0)
        assert len(batches) == (len(pairs) if mb == 2 else 1)
        assert all(torch.equal(b.pair_index[0::2], b.pair_index[1::2]) for b in batches)
        row = U.apply_updates(policy, opt, batches, PreferenceLoss("rpo_sq", 0.5, 1.0), small(micro_batch_size=mb))
        result[mb] = (weights(policy), row)
    for k in result[2][0]:
        torch.testing.assert_close(result[2][0][k], result[16][0][k], rtol=0, atol=1e-6, msg=k)
    assert result[2][1]["loss"] == pytest.approx(result[16][1]["loss"], rel=1e-5)
    assert result[2][1]["pref_accuracy"] == pytest.approx(result[16][1]["pref_accuracy"])
    assert changed(result[2][0], weights(start_model))


# ----------------------------------------------------------------------------- the reference


class RefRecorder:
    """Records (round, ids, ref_logp) of every loss call; the round from the loop's out_dir."""

    def __init__(self, monkeypatch):
        self.calls, self.round = [], None
        real_loop, real_call = R.run_loop, PreferenceLoss.__call__

        def run_loop(*a, **k):
            self.round = int(str(a[6]).rsplit("-", 1)[1])
            return real_loop(*a, **k)

        def call(loss, logp, batch, *rest):
            self.calls.append((self.round, batch.ids.clone(), batch.ref_logp.clone()))
            return real_call(loss, logp, batch, *rest)

        monkeypatch.setattr(R, "run_loop", run_loop)
        monkeypatch.setattr(PreferenceLoss, "__call__", call)


def test_the_reference_is_the_previous_rounds_policy(tok, start_model, reward_model, problems, tmp_path, monkeypatch):
    cfg = small(steps=2, iterations=2)
    after_one = copy.deepcopy(start_model)
    R.run_rpo(after_one, tok, problems, small(steps=2, iterations=1), reward_model, tmp_path / "one")
    rec = RefRecorder(monkeypatch)
    policy = copy.deepcopy(start_model)
    R.run_rpo(policy, tok, problems, cfg, reward_model, tmp_path / "two")
    assert changed(weights(start_model), weights(after_one)) and changed(weights(after_one), weights(policy))
    assert {r for r, _, _ in rec.calls} == {1, 2} and len(rec.calls) == 4
    for round_, ids, ref_logp in rec.calls:
        want = start_model if round_ == 1 else after_one  # never the start in round 2, never the live policy
        with torch.no_grad():
            expected = U.sequence_token_logprobs(want, ids, cfg.temperature)[0]
        torch.testing.assert_close(ref_logp, expected, rtol=0, atol=1e-6)
        if round_ == 2:
            with torch.no_grad():
                start_lp = U.sequence_token_logprobs(start_model, ids, cfg.temperature)[0]
            assert (ref_logp - start_lp).abs().max() > 1e-4


# ----------------------------------------------------------------------------- resume


class CrashInRound(L.Callback):
    """Raise after step `step` of round `round_` (rounds counted by the loop's fresh starts)."""

    def __init__(self, round_, step):
        self.round_, self.step, self.round = round_, step, 0

    def on_train_start(self, trainer, pl_module):
        self.round += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.round == self.round_ and pl_module.step_count == self.step:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("pairs", ["reward", "random"])
def test_crash_in_the_second_round_then_resume_is_bit_exact(tok, start_model, reward_model, problems, tmp_path, monkeypatch,
                                                            pairs):  # fmt: skip
    """Also with random pairs: a resumed step draws the same pairs (seeded by the round and the responses)."""
    cfg = small(steps=2, iterations=2, updates_per_rollout=2, off_fraction=0.25, pairs=pairs,
                loss="dpo" if pairs == "random" else "rpo_bwd_kl")  # fmt: skip
    clean = copy.deepcopy(start_model)
    ref = R.run_rpo(clean, tok, problems, cfg, reward_model, tmp_path / "clean")

    with pytest.raises(RuntimeError, match="simulated crash"):
        R.run_rpo(copy.deepcopy(start_model), tok, problems, cfg, reward_model, tmp_path / "crashed",
                  callbacks=[CrashInRound(2, 1)])  # fmt: skip
    assert latest(tmp_path / "crashed" / "iteration-2" / "checkpoints").name == "step-00000001"
    resumed = copy.deepcopy(start_model)
    out = R.run_rpo(resumed, tok, problems, cfg, reward_model, tmp_path / "crashed")
    assert [r["start_step"] for r in out["iterations"]] == [2, 1]
    for a, b in zip(out["iterations"], ref["iterations"]):
        assert [r["batch"] for r in a["history"]] == [r["batch"] for r in b["history"]]
        assert [r["pairs"] for r in a["history"]] == [r["pairs"] for r in b["history"]]
    assert ref["iterations"][0]["history"][0]["batch"] != ref["iterations"][1]["history"][0]["batch"]  # rounds differ
    final, expected = weights(resumed), weights(clean)
    assert changed(weights(start_model), expected)
    for k, v in expected.items():
        assert torch.equal(final[k], v), k  # bit for bit

    monkeypatch.setattr(loop, "_fit", lambda *a, **k: pytest.fail("trained again"))
    again = copy.deepcopy(start_model)
    R.run_rpo(again, tok, problems, cfg, reward_model, tmp_path / "crashed")
    assert not changed(weights(again), final)


# ----------------------------------------------------------------------------- the stages


def tiny_world(tok):
    train = rw.generate_problems(60, seed=21, difficulties=(1, 2))
    eval_ = rw.generate_problems(6, seed=22, difficulties=(1, 2))
    return World(WorldConfig(n_train=60, n_eval=6, difficulties=[1, 2]), train, eval_, tok)


def test_reward_model_and_rpo_stages_write_their_outputs(tok, start_model, tmp_path, monkeypatch):
    world = tiny_world(tok)
    rm_cfg = RewardModelStageConfig(steps=4, batch_size=8, train_pairs=40, heldout_pairs=8, val_every=2, ckpt_every=2)
    original = weights(start_model)
    rep, rm = run_reward_model_stage(start_model, world, rm_cfg, tmp_path / "reward_model")
    assert not changed(original, weights(start_model))
    on_disk = json.loads((tmp_path / "reward_model" / "report.json").read_text())
    assert on_disk["pairs"] == {"train": 40, "tuning": 8, "report": 8}
    assert 0 <= on_disk["heldout_accuracy"] <= 1 and on_disk["reward_model"] == str(tmp_path / "reward_model")
    loaded = load_reward_model(tmp_path / "reward_model")
    assert not changed(weights(loaded), weights(rm)) and changed(weights(loaded.backbone), original)
    assert (tmp_path / "reward_model" / "model" / T.TOKENIZER_FILE).is_file()

    cfg = RPOStageConfig(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=16, micro_batch_size=8, lr=3e-3,
                         ckpt_every=2, eval_problems=6, rewards=C.RewardSettings(workers=0), train_problems=24)  # fmt: skip
    report, policy = run_rpo_stage(start_model, world, cfg, tmp_path / "rpo", reward_model_dir=tmp_path / "reward_model")
    assert not changed(original, weights(start_model)) and changed(original, weights(policy))
    on_disk = json.loads((tmp_path / "rpo" / "report.json").read_text())
    rows = on_disk["iterations"]
    assert on_disk["pairs"] == "reward" and on_disk["rule_weight"] == 0.0 and on_disk["lr"] == 3e-3
    assert [r["iteration"] for r in rows] == [0, 1, 2] and rows[0]["win_rate"] == 0.5
    assert all(r["n"] == 6 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert all(r["steps"] == 2 and r["pairs"] + r["ties_skipped"] == 8 for r in rows[1:])
    assert (tmp_path / "rpo" / "rpo_iterations.png").stat().st_size > 5000
    assert not changed(weights(load_checkpoint(tmp_path / "rpo" / "model")), weights(policy))

    # again: nothing trained or evaluated, the same report
    monkeypatch.setattr(loop, "_fit", lambda *a, **k: pytest.fail("retrained"))
    monkeypatch.setattr("nemo_plugins.rl.rpo_stage.evaluate_policy", lambda *a, **k: pytest.fail("re-evaluated"))
    again, _ = run_rpo_stage(start_model, world, cfg, tmp_path / "rpo", reward_model_dir=tmp_path / "reward_model")
    assert again["iterations"] == report["iterations"]


def test_win_rate_counts_ties_and_same_responses_as_half():
    base = {"scores": [0.0, 1.0, 2.0, 3.0], "responses": ["a", "b", "c", "d"]}
    ev = {"scores": [1.0, 1.0, 1.0, 3.5], "responses": ["x", "y", "z", "d"]}
    assert win_rate(ev, base) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)


def test_jsonl_pairs_split_by_prompt_into_disjoint_sets():
    pairs = [PreferencePair(f"q{i % 50}", f"c{i}", f"r{i}") for i in range(200)]
    sets = split_by_prompt(pairs, 0.1, seed=0)
    prompts = {k: {p.prompt for p in v} for k, v in sets.items()}
    assert sum(map(len, sets.values())) == 200 and all(prompts.values())
    assert not prompts["train"] & prompts["report"] and not prompts["train"] & prompts["tuning"]
    assert not prompts["tuning"] & prompts["report"]


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("section", "override", "message"),
    [
        ("rpo", "rpo.loss=ipo", "rpo.loss='ipo': expected one of rpo_bwd_kl"),
        ("rpo", "rpo.beta=0", "rpo.beta=0"),
        ("rpo", "rpo.eta=-1", "rpo.eta=-1"),
        ("rpo", "rpo.iterations=0", "rpo.iterations=0"),
        ("rpo", "rpo.group_size=1", "rpo.group_size=1"),
        ("rpo", "rpo.curriculum.kind=easy", "rpo.curriculum.kind='easy'"),
        ("rpo", "rpo.eval_set=heldout", "rpo.eval_set='heldout'"),
        ("rpo", "rpo.train_problems=0", "rpo.train_problems=0"),
        ("rpo", "rpo.rewards.timeout_s=0", "rpo.rewards.timeout_s=0"),  # shared settings: named by this section
        ("rpo", "rpo.overlong.penalty=-1", "rpo.overlong.penalty=-1"),
        ("rpo", "rpo.rule_weight=-0.5", "rpo.rule_weight=-0.5"),
        ("rpo", "rpo.sft_loss_weight=-1", "rpo.sft_loss_weight=-1"),
        ("rpo", "rpo.pairs=best", "rpo.pairs='best': expected one of reward, verified, random"),
        ("rpo", "rpo.pairs=verified", "rpo.rule_weight=0.0: expected > 0 with rpo.pairs=verified"),
        ("reward_model", "reward_model.steps=0", "reward_model.steps"),
        ("reward_model", "reward_model.heldout_fraction=0.6", "reward_model.heldout_fraction=0.6"),
        ("reward_model", "reward_model.train_pairs=0", "reward_model.train_pairs=0"),
        ("reward_model", "reward_model.difficulties=[0]", "reward_model.difficulties=[0]"),
    ],
)
def test_config_errors_name_the_field(section, override, message):
    from dataclasses import dataclass, field

    @dataclass
    class Root:
        reward_model: RewardModelStageConfig = field(default_factory=RewardModelStageConfig)
        rpo: RPOStageConfig = field(default_factory=RPOStageConfig)

    with pytest.raises(ConfigError, match="^" + re.escape(message)):  # from the start: "grpo.x" contains "rpo.x"
        load_config(Root, [CONF_DIR / "reward_model" / "tiny.yaml", CONF_DIR / "rpo" / "tiny.yaml"], [override])
    assert load_config(Root, [CONF_DIR / "reward_model" / "tiny.yaml", CONF_DIR / "rpo" / "tiny.yaml"]).rpo.iterations == 2


# ----------------------------------------------------------------------------- the pipeline

RM_TINY = ["reward_model.steps=2", "reward_model.batch_size=4", "reward_model.train_pairs=16",
           "reward_model.heldout_pairs=4", "reward_model.val_every=1", "reward_model.ckpt_every=2"]  # fmt: skip
RPO_TINY = ["rpo.steps=1", "rpo.iterations=1", "rpo.train_problems=8", "rpo.prompts_per_step=2", "rpo.group_size=2",
            "rpo.max_new_tokens=8", "rpo.eval_problems=4", "rpo.rewards.workers=0", "rpo.ckpt_every=1"]  # fmt: skip


def test_rpo_continues_the_policy_not_the_reward_model_in_the_pipeline(tmp_path):
    from test_fusion_recovery_stages import small as pipeline

    from nemo_plugins.errors import CheckpointError
    from nemo_plugins.pipeline import run_pipeline

    with pytest.raises(CheckpointError, match="rpo.reward_model"):  # no reward model yet
        run_pipeline(pipeline(tmp_path, "stages=[world,parent,rpo]", *RPO_TINY))
    summary = run_pipeline(pipeline(tmp_path, "stages=[world,parent,reward_model,rpo]", *RM_TINY, *RPO_TINY))
    out = tmp_path / "out"
    assert "model" not in summary["reward_model"] and summary["reward_model"]["reward_model"] == str(out / "reward_model")
    assert summary["rpo"]["start"] == summary["parent"]["model"]  # the policy, not the reward model's backbone
    assert summary["rpo"]["reward_model"] == str(out / "reward_model")
    assert read_config_of(out / "rpo" / "model") == read_config_of(summary["parent"]["model"])
    # model=DIR with both stages: the reward model and RPO both start from DIR
    other = tmp_path / "other"
    summary = run_pipeline(pipeline(tmp_path, "stages=[reward_model,rpo]", f"model={summary['parent']['model']}",
                                    f"output_dir={other}", *RM_TINY, *RPO_TINY))  # fmt: skip
    assert summary["reward_model"]["start"] == summary["rpo"]["start"] == str(out / "parent" / "model")


def read_config_of(path):
    from nemo_plugins.model.checkpoint import read_config

    return read_config(path)
