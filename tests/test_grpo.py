"""GRPO loop and stage on a tiny model: one step end to end, zero-signal groups, the direction of
an update, micro-batching, crash + resume, and the stage's report and resume."""

import copy
import csv
import dataclasses
import json
import re

import lightning as L
import pytest
import torch

from nemo_plugins.data.problems import ProblemSet
from nemo_plugins.config import CONF_DIR, ConfigError, load_config
from nemo_plugins.data import reasoning_world as rw
from nemo_plugins.data import tokenizer as T
from nemo_plugins.data.chat import EOS, THINKING_OFF, render_prompt
from nemo_plugins.data.curriculum import problems_by_id
from nemo_plugins.data.tiny_world import World, WorldConfig
from nemo_plugins.model import rollout as engine
from nemo_plugins.model.checkpoint import load_checkpoint
from nemo_plugins.model.losses import next_token_mask
from nemo_plugins.rl import config as C
from nemo_plugins.rl import experience as X
from nemo_plugins.rl import grpo as G
from nemo_plugins.rl import loop
from nemo_plugins.rl import metrics as M
from nemo_plugins.rl import update as U
from nemo_plugins.rl import grpo_stage as S
from nemo_plugins.rl import scoring
from nemo_plugins.rl.rewards import RewardBreakdown
from nemo_plugins.utils.resume import latest

from training_callbacks import Crash

from rl_models import rl_tokenizer, start_policy

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return rl_tokenizer()


@pytest.fixture(scope="module")
def start_model(tok):
    """A tiny model briefly trained on difficulty-1 problems (both modes): its samples vary in
    format and answer, so groups carry a learning signal."""
    return start_policy(tok)


@pytest.fixture(scope="module")
def problems():
    return problems_by_id(rw.generate_problems(40, seed=3, difficulties=(1, 2)))


def rates_for(problems):
    return {i: (0.2 if p.difficulty == 1 else 0.6) for i, p in problems.items()}


def small(**kw) -> G.GRPOConfig:
    cfg = dict(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=24, micro_batch_size=8, lr=3e-3,
               ckpt_every=1, eval_problems=0, rewards=C.RewardSettings(workers=0),
               overlong=C.OverlongConfig(buffer=4, penalty=0.5))  # fmt: skip
    cfg.update(kw)
    return G.GRPOConfig(**cfg)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(a, b):
    return [k for k in a if not torch.equal(a[k], b[k])]


# ----------------------------------------------------------------------------- the loop


def test_one_step_end_to_end_in_the_sandbox_changes_weights_and_logs_every_metric(tok, start_model, problems, tmp_path):
    policy, before = copy.deepcopy(start_model), weights(start_model)
    cfg = small(steps=1, off_fraction=0.5, rewards=C.RewardSettings(workers=1, timeout_s=20), updates_per_rollout=2,
                eval_problems=4)
    summary = G.run_grpo(policy, tok, problems, rates_for(problems), cfg, tmp_path,
                         eval_problems=list(problems.values())[:4])  # fmt: skip
    assert changed(before, weights(policy))  # the update moved the weights
    (row,) = summary["history"]
    assert row["reward_failures"] == 0 and row["groups"] == 4 and row["updates"] == 2
    assert row["groups_dropped"] < 4 and row["seqs_trained"] == 4 * (4 - row["groups_dropped"])
    for key in ("len_on", "len_off", "pass_rate_on", "pass_rate_off"):  # 2 prompts per mode
        assert row[key] is not None, key
    parts = row["reward_accuracy"] + row["reward_format"] + row["reward_overlong"]
    assert row["reward"] == pytest.approx(parts, abs=1e-6)
    assert row["kl_ref"] >= 0 and row["entropy"] > 0 and 0 <= row["clip_fraction"] <= 1 and row["grad_norm"] > 0
    assert summary["final_eval"]["n"] == 4 and row["eval_accuracy"] == summary["final_eval"]["accuracy"]
    with open(tmp_path / "metrics.csv") as f:
        (csv_row,) = list(csv.DictReader(f))
    empty = [c for c in M.CSV_COLUMNS if csv_row[c] == ""]
    assert list(csv_row) == list(M.CSV_COLUMNS) and not empty, empty
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["failures"] == {}
    assert (tmp_path / "grpo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert latest(tmp_path / "checkpoints").name == "step-00000001"


def test_off_prompts_are_rendered_with_thinking_off(tok, problems, monkeypatch):
    modes = X.choose_modes(8, 0.25, seed=0, step=3)
    assert modes.count(False) == 2 and modes == X.choose_modes(8, 0.25, seed=0, step=3)
    seen = []

    def fake_generate(model, prompts, cfg, *, pad_id, generator):
        seen.extend(T.decode(tok, p) for p in prompts)
        return [[T.token_id(tok, EOS)] for _ in prompts]

    monkeypatch.setattr(engine, "generate", fake_generate)
    ps = list(problems.values())[:8]
    roll = X.rollout(_Stub(), tok, ps, modes, small(), seed=0)
    assert [THINKING_OFF in s for s in seen[::4]] == [not m for m in modes]
    assert seen[4:8] == [render_prompt(ps[1].question, modes[1])] * 4  # G copies per prompt, groups contiguous
    assert roll.thinking == [m for m in modes for _ in range(4)] and not any(roll.truncated)


class _Stub(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lm_head = torch.nn.Linear(1, 1)


def test_all_equal_rewards_give_zero_policy_gradient_and_drop_groups(tok, start_model, problems, tmp_path, monkeypatch):
    monkeypatch.setattr(scoring, "combined_reward", lambda *a, **k: RewardBreakdown(1.0, 1.0, 0.0))
    no_overlong = C.OverlongConfig(penalty=0.0)
    policy, before = copy.deepcopy(start_model), weights(start_model)
    cfg = small(steps=1, overlong=no_overlong)
    row = G.run_grpo(policy, tok, problems, rates_for(problems), cfg, tmp_path / "drop")["history"][0]
    assert row["groups_dropped"] == 4 and row["seqs_trained"] == 0 and row["updates"] == 0 and row["pg_loss"] == 0
    assert not changed(before, weights(policy))  # no signal, no step
    # kept instead of dropped: every advantage is 0, so the policy-gradient loss is exactly 0
    keep_all = small(steps=1, overlong=no_overlong, loss=G.LossConfig(drop_zero_variance=False))
    policy = copy.deepcopy(start_model)
    row = G.run_grpo(policy, tok, problems, rates_for(problems), keep_all, tmp_path / "keep")["history"][0]
    assert row["groups_dropped"] == 0 and row["groups_zero_variance"] == 4 and row["seqs_trained"] == 16
    assert row["updates"] == 1 and row["pg_loss"] == 0.0 and row["grad_norm"] == 0.0


def hand_rollout(tok, problem, completions: list[str]) -> X.Rollout:
    eos = T.token_id(tok, EOS)
    prompt = T.encode(tok, render_prompt(problem.question, True))
    ids = [T.encode(tok, c) + [eos] for c in completions]
    n = len(completions)
    return X.Rollout([prompt] * n, ids, completions, [True] * n, [problem.answer] * n, [False] * n)


@torch.no_grad()
def completion_logprob(model, roll, i):
    ids, response = roll.sequences([i], 0)
    logp, _ = U.sequence_token_logprobs(model, ids, 1.0)
    return float((logp * next_token_mask(response)).sum())


def test_update_raises_the_log_prob_of_the_rewarded_completion(tok, start_model):
    p = rw.generate_problems(1, seed=11, difficulties=(1,))[0]
    right = rw.reasoning_response(p)
    texts = [right] + [right.replace(f"is {p.answer}.", f"is {p.answer + d}.") for d in (1, 2, 3)]
    roll = hand_rollout(tok, p, texts)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    cfg = small(loss=G.LossConfig(kl_beta=0.0), updates_per_rollout=2, micro_batch_size=3)
    adv = G.group_advantages(rewards, 4)
    policy = copy.deepcopy(start_model).train()
    before = [completion_logprob(policy, roll, i) for i in range(4)]
    opt = torch.optim.SGD(policy.parameters(), lr=0.05)
    row = G.policy_update(policy, None, opt, roll, adv, torch.ones(4, dtype=torch.bool), cfg)
    after = [completion_logprob(policy, roll, i) for i in range(4)]
    assert row["updates"] == 2 and row["pg_loss"] < 0
    assert after[0] > before[0] + 1e-3  # the rewarded completion became more likely
    assert all(a < b for a, b in zip(after[1:], before[1:]))  # the others less


def test_micro_batches_sum_to_the_full_batch_update(tok, start_model):
    p = rw.generate_problems(1, seed=12, difficulties=(2,))[0]
    texts = [rw.reasoning_response(p), "The answer is 1.", "<think>1 + 1 = 2</think>The answer is 2.",
             rw.direct_response(p)]  # fmt: skip
    roll = hand_rollout(tok, p, texts)
    adv = G.group_advantages(torch.tensor([1.0, 0.0, 0.1, 0.5]), 4)
    result = {}
    for mb in (1, 4):
        policy = copy.deepcopy(start_model)
        opt = torch.optim.SGD(policy.parameters(), lr=0.1)
        G.policy_update(policy, None, opt, roll, adv, torch.ones(4, dtype=torch.bool), small(micro_batch_size=mb))
        result[mb] = weights(policy)
    for k in result[1]:
        torch.testing.assert_close(result[1][k], result[4][k], rtol=0, atol=1e-6, msg=k)
    assert changed(result[1], weights(start_model))


# ----------------------------------------------------------------------------- the KL to the reference


def test_default_reference_is_the_frozen_start_and_kl_beta_reaches_the_loss(tok, start_model, problems, tmp_path):
    """The loop's reference is a frozen copy of the starting weights (KL 0 before any update,
    > 0 once the policy moved) and the KL term enters the loss with weight kl_beta."""
    beta = 0.05
    cfg = small(steps=2, loss=G.LossConfig(kl_beta=beta))
    first, second = G.run_grpo(copy.deepcopy(start_model), tok, problems, rates_for(problems), cfg, tmp_path)["history"]
    assert first["updates"] == second["updates"] == 1
    assert first["kl_ref"] == 0.0  # step 1, on-policy: the policy is still the reference
    assert second["kl_ref"] > 1e-4  # step 1 moved the policy away from the (unchanged) reference
    for row in (first, second):
        assert row["kl_loss"] == pytest.approx(row["kl_ref"], rel=1e-5, abs=1e-9)  # token mean of k3, as logged
        assert row["loss"] == pytest.approx(row["pg_loss"] + beta * row["kl_loss"], rel=1e-5, abs=1e-9)


def noisy_copy(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


def test_kl_penalty_alone_moves_the_policy_and_uses_the_given_reference(tok, start_model, problems, tmp_path, monkeypatch):
    """Equal rewards make every advantage 0, so only the KL term can move the weights: with
    kl_beta > 0 they move, with kl_beta = 0 they do not; the KL is to the reference passed in."""
    monkeypatch.setattr(scoring, "combined_reward", lambda *a, **k: RewardBreakdown(1.0, 1.0, 0.0))
    reference = noisy_copy(start_model)
    rows, moved = {}, {}
    for beta in (0.0, 1.0):
        policy = copy.deepcopy(start_model)
        cfg = small(steps=1, overlong=C.OverlongConfig(penalty=0.0), loss=G.LossConfig(kl_beta=beta, drop_zero_variance=False))
        (rows[beta],) = G.run_grpo(policy, tok, problems, rates_for(problems), cfg, tmp_path / str(beta),
                                   reference=reference)["history"]  # fmt: skip
        moved[beta] = changed(weights(start_model), weights(policy))
    on, off = rows[1.0], rows[0.0]
    assert on["pg_loss"] == off["pg_loss"] == 0.0 and off["grad_norm"] == 0.0 and not moved[0.0]
    assert on["grad_norm"] > 0 and moved[1.0]  # the KL term alone moved the weights
    assert on["kl_ref"] > 0.01 and on["kl_ref"] == off["kl_ref"]  # the same sample, KL to the noisy reference
    assert on["kl_loss"] == pytest.approx(on["kl_ref"], rel=1e-5) and on["loss"] == pytest.approx(on["kl_loss"], rel=1e-5)


class Batches(L.Callback):
    def __init__(self):
        self.seen = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen[pl_module.step_count] = list(pl_module.last_batch)


def test_crash_then_resume_gives_the_same_batches_and_weights(tok, start_model, problems, tmp_path, monkeypatch):
    cfg = small(steps=4, ckpt_every=2, loss=G.LossConfig(kl_beta=0.05), off_fraction=0.25, updates_per_rollout=2)
    rates = rates_for(problems)
    clean, clean_batches = copy.deepcopy(start_model), Batches()
    ref = G.run_grpo(clean, tok, problems, rates, cfg, tmp_path / "clean", callbacks=[clean_batches])

    with pytest.raises(RuntimeError, match="simulated crash after step 3"):
        G.run_grpo(copy.deepcopy(start_model), tok, problems, rates, cfg, tmp_path / "crashed", callbacks=[Crash(3)])
    assert latest(tmp_path / "crashed" / "checkpoints").name == "step-00000002"

    resumed, batches = copy.deepcopy(start_model), Batches()
    out = G.run_grpo(resumed, tok, problems, rates, cfg, tmp_path / "crashed", callbacks=[batches])
    assert out["start_step"] == 2 and out["steps"] == 4
    assert batches.seen == {3: clean_batches.seen[3], 4: clean_batches.seen[4]}  # the same next prompts
    assert clean_batches.seen[3] != clean_batches.seen[2]
    assert [r["batch"] for r in out["history"]] == [r["batch"] for r in ref["history"]]
    final, expected = weights(resumed), weights(clean)
    assert changed(weights(start_model), expected)
    for k, v in expected.items():
        assert torch.equal(final[k], v), k  # bit for bit
    assert [r["step"] for r in out["history"]] == [1, 2, 3, 4]  # no duplicated rows from the crashed part
    assert (tmp_path / "crashed" / "metrics.csv").read_text().count("\n") == 5

    monkeypatch.setattr(loop, "_fit", lambda *a, **k: pytest.fail("trained again"))
    again = copy.deepcopy(start_model)
    assert G.run_grpo(again, tok, problems, rates, cfg, tmp_path / "crashed")["start_step"] == 4
    assert not changed(weights(again), final)

    fewer = dict(list(rates.items())[:-1])  # another set of prompts: the sampler state refuses it
    with pytest.raises(ValueError, match="set of prompts"):
        G.run_grpo(copy.deepcopy(start_model), tok, problems, fewer, cfg, tmp_path / "crashed")


# ----------------------------------------------------------------------------- the stage


def tiny_world(tok):
    train = rw.generate_problems(60, seed=21, difficulties=(1, 2))
    eval_ = rw.generate_problems(6, seed=22, difficulties=(1, 2))
    return World(WorldConfig(n_train=60, n_eval=6, difficulties=[1, 2]), train, eval_, tok)


def test_stage_writes_its_report_and_resumes_without_retraining(tok, start_model, tmp_path, monkeypatch):
    world = tiny_world(tok)
    cfg = S.GRPOStageConfig(
        steps=2, prompts_per_step=4, group_size=4, max_new_tokens=24, micro_batch_size=16, lr=3e-3, ckpt_every=2,
        eval_problems=6, rewards=C.RewardSettings(workers=0), train_problems=24, pass_rate_k=2, pass_rate_batch_size=48,
        pass_rate_threshold=1.0,
    )  # fmt: skip
    original = weights(start_model)
    report, model = S.run_grpo_stage(start_model, world, cfg, tmp_path)
    assert not changed(original, weights(start_model))  # the stage trains copies
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert [r["model"] for r in on_disk["table"]] == ["before", "curriculum", "random"]
    assert on_disk["curriculum"]["steps"] == on_disk["random"]["steps"] == 2
    rates = on_disk["pass_rates"]
    assert rates["problems"] == 24 and rates["kept"] + rates["dropped"] == 24
    assert {"accuracy", "accuracy_off", "by_difficulty"} <= set(on_disk["before"])
    assert "| curriculum |" in (tmp_path / "grpo_report.md").read_text()
    assert (tmp_path / "reward_curves.png").stat().st_size > 5000
    for name in ("curriculum", "random"):
        run_dir = tmp_path / on_disk[name]["run_dir"].rsplit("/", 1)[1]
        assert run_dir.name.startswith(name + "-") and (run_dir / "metrics.csv").is_file()
    saved = load_checkpoint(tmp_path / "model")
    assert not changed(weights(saved), weights(model)) and (tmp_path / "model" / T.TOKENIZER_FILE).is_file()
    assert S.heldout_set(ProblemSet(world), cfg) == world.eval
    extra = S.heldout_set(ProblemSet(world), dataclasses.replace(cfg, eval_difficulties=[2]))
    assert len(extra) == 6 and {p.difficulty for p in extra} == {2}
    assert not {p.question for p in extra} & {p.question for p in world.train + world.eval}
    tuning = S.heldout_set(ProblemSet(world), dataclasses.replace(cfg, eval_difficulties=[2], eval_set="tuning"))
    assert len(tuning) == 6 and not {p.question for p in extra} & {p.question for p in tuning}

    assert changed(original, weights(model))

    # again: nothing is trained, sampled or evaluated; the same report
    monkeypatch.setattr(loop, "_fit", lambda *a, **k: pytest.fail("retrained"))
    monkeypatch.setattr(S, "heldout_accuracy", lambda *a, **k: pytest.fail("re-evaluated"))
    monkeypatch.setattr("nemo_plugins.model.rollout.generate", lambda *a, **k: pytest.fail("pass rates re-estimated"))
    again, model2 = S.run_grpo_stage(start_model, world, cfg, tmp_path)
    assert again["table"] == report["table"] and not changed(weights(model2), weights(model))

    # curriculum.kind=random: the stage keeps the random-order run (found on disk, not retrained)
    by_random = dataclasses.replace(cfg, curriculum=dataclasses.replace(cfg.curriculum, kind="random"))
    alone, model3 = S.run_grpo_stage(start_model, world, by_random, tmp_path)
    assert [r["model"] for r in alone["table"]] == ["before", "random"] and "curriculum" not in alone
    assert alone["random"] == report["random"] and changed(weights(model3), weights(model))
    assert not changed(weights(load_checkpoint(tmp_path / "model")), weights(model3))


def test_fresh_prompts_are_in_no_split_and_apart_from_the_held_out_set(tok):
    world = tiny_world(tok)
    cfg = S.GRPOStageConfig(train_problems=12, difficulties=[2], eval_problems=6, eval_difficulties=[2],
                            prompt_source="fresh")  # fmt: skip
    pool = S.training_pool(ProblemSet(world), cfg)
    questions = {p.question for p in pool.values()}
    assert len(pool) == 12 and {p.difficulty for p in pool.values()} == {2}
    tuning = S.heldout_set(ProblemSet(world), dataclasses.replace(cfg, eval_set="tuning"))
    used = world.train + world.eval + S.heldout_set(ProblemSet(world), cfg) + tuning
    assert not questions & {p.question for p in used}
    assert S.training_pool(ProblemSet(world), cfg) == pool  # deterministic
    train_pool = S.training_pool(ProblemSet(world), dataclasses.replace(cfg, prompt_source="train"))
    assert {p.question for p in train_pool.values()} <= {p.question for p in world.train}


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("grpo.group_size=1", "grpo.group_size=1"),
        ("grpo.loss.clip_low=1.5", "grpo.loss.clip_low=1.5"),
        ("grpo.curriculum.std=0", "grpo.curriculum.std=0"),
        ("grpo.curriculum.kind=easy", "grpo.curriculum.kind='easy'"),
        ("grpo.rewards.timeout_s=0", "grpo.rewards.timeout_s=0"),
        ("grpo.overlong.max_len=500", "grpo.overlong.max_len=500"),
        ("grpo.off_fraction=2", "grpo.off_fraction=2"),
        ("grpo.pass_rate_threshold=0", "grpo.pass_rate_threshold=0"),
        ("grpo.eval_difficulties=[0]", "grpo.eval_difficulties=[0]"),
        ("grpo.eval_set=heldout", "grpo.eval_set='heldout': expected report"),
        ("grpo.prompt_source=eval", "grpo.prompt_source='eval'"),
    ],
)
def test_config_errors_name_the_field(override, message):
    from dataclasses import dataclass, field

    @dataclass
    class Root:
        grpo: S.GRPOStageConfig = field(default_factory=S.GRPOStageConfig)

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(Root, CONF_DIR / "grpo" / "tiny.yaml", [override])


def test_tiny_yaml_loads():
    from dataclasses import dataclass, field

    @dataclass
    class Root:
        grpo: S.GRPOStageConfig = field(default_factory=S.GRPOStageConfig)

    cfg = load_config(Root, CONF_DIR / "grpo" / "tiny.yaml").grpo
    assert cfg.compare_random and cfg.curriculum.kind == "curriculum" and cfg.rewards.task == "world"
