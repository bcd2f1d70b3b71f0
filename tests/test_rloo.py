"""RLOO: the leave-one-out baseline and loss against hand formulas, the KL term's wiring (the
mutations 'beta dropped' and 'the policy as its own reference' must fail here), the instruction
verifier and augmentation, the InstructionScorer, config errors, crash + resume, and the stage."""

import copy
import json
import math
import re
from dataclasses import dataclass, field

import pytest
import torch

from nemo_plugins.config import CONF_DIR, DEFAULT_CONFIGS, ConfigError, load_config
from nemo_plugins.data import instructions as I
from nemo_plugins.data import reasoning_world as rw
from nemo_plugins.data import tokenizer as T
from nemo_plugins.data.curriculum import problems_by_id
from nemo_plugins.data.problems import ProblemSet, TaskProblem
from nemo_plugins.model.checkpoint import load_checkpoint
from nemo_plugins.rl import config as C
from nemo_plugins.rl import loop
from nemo_plugins.rl import rloo as R
from nemo_plugins.rl import rloo_loss as RL
from nemo_plugins.rl import rloo_stage as S
from nemo_plugins.rl import scoring
from nemo_plugins.rl.instructions import instruction_followed
from nemo_plugins.rl.rewards import RewardBreakdown
from nemo_plugins.utils.resume import latest

from test_grpo import Batches, changed, noisy_copy, tiny_world, weights
from training_callbacks import Crash

from rl_models import rl_tokenizer, start_policy

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return rl_tokenizer()


@pytest.fixture(scope="module")
def start_model(tok):
    """A tiny model briefly trained on difficulty-1 problems in both modes (as test_grpo's)."""
    return start_policy(tok)


# ----------------------------------------------------------------------------- baseline and loss


def test_leave_one_out_baseline_and_advantages_match_the_hand_formula():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, -1.0, 3.0, 0.0])
    k = 4
    expected_b = []
    for g in range(3):
        group = r[g * k : (g + 1) * k].tolist()
        expected_b += [(sum(group) - x) / (k - 1) for x in group]
    assert RL.leave_one_out_baseline(r, k).tolist() == pytest.approx(expected_b)
    adv = RL.rloo_advantages(r, k)
    assert adv.tolist() == pytest.approx([x - b for x, b in zip(r.tolist(), expected_b)])
    assert adv[4:8].tolist() == [0.0] * 4  # equal rewards: no signal
    assert RL.rloo_advantages(r.view(3, 4), k).shape == (3, 4)
    with pytest.raises(ValueError, match="group_size=5"):
        RL.leave_one_out_baseline(r, 5)


def _hand_loss(logp, ref, adv, mask, beta, aggregation):
    """−A·log π and β·k3 with Python loops (independent of rloo_loss's tensor code)."""
    B, Tn = len(logp), len(logp[0])
    lengths = [sum(mask[b]) for b in range(B)]
    n_tok, n_seq = sum(lengths), sum(1 for n in lengths if n)
    pg = kl = 0.0
    for b in range(B):
        seq_kl = 0.0
        for t in range(Tn):
            if mask[b][t]:
                pg += -adv[b] * logp[b][t]
                d = ref[b][t] - logp[b][t]
                seq_kl += math.exp(d) - d - 1
        kl += seq_kl / lengths[b] if aggregation == "sequence" and lengths[b] else 0.0
        kl += seq_kl if aggregation == "token" else 0.0
    denom = n_seq if aggregation == "sequence" else n_tok
    return pg / denom + beta * kl / denom


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_rloo_loss_and_its_gradient_match_the_hand_formula(aggregation, beta):
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 2
    ref = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    logp[0, 4] = float("nan")  # masked garbage changes nothing
    adv = torch.tensor([0.5, -1.25, 2.0], dtype=torch.float64)
    cfg = RL.RLOOLossConfig(kl_beta=beta, aggregation=aggregation)
    x = logp.clone().requires_grad_(True)
    loss, metrics = RL.rloo_loss(x, ref, adv, mask, cfg)
    clean = torch.where(mask, logp, torch.zeros(()))
    expected = _hand_loss(clean.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), beta, aggregation)
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    loss.backward()
    # d/dlogp of −A·logp is −A; of k3 = e^d − d − 1 (d = ref − logp) it is 1 − e^d
    lengths = mask.sum(1).tolist()
    n_seq, n_tok = 3, sum(lengths)
    for b in range(3):
        for t in range(5):
            if not mask[b, t]:
                assert float(x.grad[b, t]) == 0.0
                continue
            kl_scale = 1 / (lengths[b] * n_seq) if aggregation == "sequence" else 1 / n_tok
            pg_scale = 1 / n_seq if aggregation == "sequence" else 1 / n_tok
            d = float(ref[b, t] - logp[b, t])
            want = -float(adv[b]) * pg_scale + beta * (1 - math.exp(d)) * kl_scale
            assert float(x.grad[b, t]) == pytest.approx(want, rel=1e-10, abs=1e-14)
    assert float(metrics["loss"]) == pytest.approx(float(metrics["pg_loss"]) + beta * float(metrics["kl_loss"]))
    # the step's global counts: two micro-batches sum to the full batch
    parts = [RL.rloo_loss(logp[s], ref[s], adv[s], mask[s], cfg, n_tok, n_seq)[0] for s in (slice(0, 2), slice(2, 3))]
    assert float(sum(parts)) == pytest.approx(float(loss), rel=1e-12)


def test_rloo_loss_refuses_a_kl_without_reference_and_bad_settings():
    with pytest.raises(ValueError, match="needs reference log-probs"):
        RL.rloo_loss(torch.zeros(1, 2), None, torch.zeros(1), torch.ones(1, 2), RL.RLOOLossConfig(kl_beta=0.1))
    with pytest.raises(ValueError, match="kl_beta=-1"):
        RL.RLOOLossConfig(kl_beta=-1)
    with pytest.raises(ValueError, match="aggregation='mean'"):
        RL.RLOOLossConfig(aggregation="mean")


# ----------------------------------------------------------------------------- verifier and augmentation


@pytest.mark.parametrize(
    "text, spec, followed",
    [
        ("<think>7 + 5 = 12</think>The answer is 12.", "steps", True),
        ("<think>\n7 + 5 = 12\n12 * 2 = 24\n</think> The answer is 24.", "steps", True),
        ("The answer is 12.", "steps", False),  # no think block
        ("<think></think>The answer is 12.", "steps", False),  # empty trace
        ("<think>7 + 5 = 12</think>", "steps", False),  # no answer
        ("<think>7 + 5 = 12", "steps", False),  # unclosed
        ("x<think>7</think>The answer is 7.", "steps", False),  # not at the start
        ("<think>a</think><think>b</think>The answer is 7.", "steps", False),  # two blocks
        ("The answer is 12.", "max_words:4", True),
        ("The answer is twelve, clearly.", "max_words:4", False),
        ("twelve", "max_words:1", True),
        ("", "max_words:4", False),  # nothing is not an answer
        ("   \n\t ", "max_words:4", False),
        ("<think>7 + 5 = 12</think>The answer is 12.", "max_words:4", False),  # the trace counts
        ("[The answer is 12.]", "brackets", True),
        ("<think>7 + 5 = 12</think> [The answer is 12.] ", "brackets", True),
        ("The answer is [12].", "brackets", False),  # brackets inside, not around
        ("[The answer is 12.", "brackets", False),
        ("[]", "brackets", False),
        ("[ ]", "brackets", False),
        ("[[12]]", "brackets", False),  # one pair
        ("[12] and [13]", "brackets", False),
        ("<think>7</think>[12]<think>", "brackets", False),  # malformed tags
        ("[12]</think>", "brackets", False),
    ],
)
def test_verifier_on_each_instruction_kind(text, spec, followed):
    assert instruction_followed(text, spec) is followed


def test_verifier_on_hostile_inputs():
    long_spaces = "[" + " " * 200_000 + "x]"
    assert instruction_followed(long_spaces, "brackets") is False  # over max_chars
    assert instruction_followed(long_spaces, "brackets", max_chars=10**6) is True
    assert instruction_followed("a " * 10_000, "max_words:4") is False
    assert instruction_followed("<think>" * 1000 + "</think>x", "steps") is False
    assert instruction_followed(None, "steps") is False
    assert instruction_followed(b"[12]", "brackets") is False
    assert instruction_followed("\u3000[\u200b数字\u200b]\u3000", "brackets") is True  # unicode spaces are spaces
    for spec in ("shout", "max_words", "max_words:0", "max_words:-3", "max_words:x", "steps:2", "", None):
        with pytest.raises(ValueError, match="instruction spec"):
            instruction_followed("[1]", spec)


def test_augmentation_works_on_a_real_data_problem_and_deals_kinds_evenly():
    champ_like = [TaskProblem(f"Find x if {i}x = {2 * i}. Give \\boxed{{x}}.", "2", f"champ-{i}") for i in range(1, 10)]
    out = I.augment_all(champ_like, ["steps", "max_words", "brackets"], [16, 32], seed=0, tag="t")
    assert [p.base_question for p in out] == [p.question for p in champ_like]
    assert [(p.answer, p.id) for p in out] == [(p.answer, p.id) for p in champ_like]
    assert all(p.question.startswith(p.base_question + " ") for p in out)
    kinds = [p.kind for p in out]
    assert {k: kinds.count(k) for k in set(kinds)} == {"steps": 3, "max_words": 3, "brackets": 3}
    for p in out:
        assert p.question.endswith(I.instruction_text(p.instruction))
        if p.kind == "max_words":
            assert p.instruction in ("max_words:16", "max_words:32")
            assert p.question.endswith(f"at most {p.instruction.split(':')[1]} words.")
    assert I.augment_all(champ_like, ["steps", "max_words", "brackets"], [16, 32], seed=0, tag="t") == out
    assert I.augment_all(champ_like, ["steps", "max_words", "brackets"], [16, 32], seed=1, tag="t") != out
    tiny = I.augment(rw.generate_problems(1, seed=0)[0], "brackets")
    assert tiny.question.endswith("? Put your answer in brackets.") and isinstance(tiny.answer, int)
    assert rw.is_correct("[The answer is %d.]" % tiny.answer, tiny)  # the task check still finds the answer
    with pytest.raises(ValueError, match=r"rloo\.instructions=\['steps', 'steps'\]"):
        I.check_choices(["steps", "steps"], [4])
    with pytest.raises(ValueError, match=r"rloo\.max_words=\[0\]"):
        I.check_choices(["max_words"], [0])


def test_instruction_scorer_adds_the_weighted_instruction_to_the_task_reward():
    refs = [scoring.Reference(12, True, "brackets"), scoring.Reference(12, True, "max_words:4"),
            scoring.Reference(12, True, "steps"), scoring.Reference(13, True, "steps")]  # fmt: skip
    texts = ["[The answer is 12.]", "The answer is 12.", "<think>7 + 5 = 12</think>The answer is 12.",
             "<think>7 + 5 = 12</think>The answer is 12."]  # fmt: skip
    rules = C.RewardSettings(workers=0, accuracy_weight=0.5, format_weight=0.0)
    with scoring.InstructionScorer(rules.scorer(), instruction_weight=2.0) as scorer:
        s = scorer.score(texts, refs)
        assert s.parts["instruction"].tolist() == [1.0, 1.0, 1.0, 1.0]
        assert s.parts["accuracy"].tolist() == [1.0, 1.0, 1.0, 0.0]
        assert s.total.tolist() == pytest.approx([2.5, 2.5, 2.5, 2.0])
        assert (scorer.config, scorer.limits) == (rules.reward_config(), rules.limits())
        with pytest.raises(ValueError, match="reference 0 has no instruction"):
            scorer.score(["x"], [scoring.Reference(1, True)])


# ----------------------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def instructed():
    base = rw.generate_problems(40, seed=3, difficulties=(1, 2))
    return problems_by_id(I.augment_all(base, ["steps", "max_words", "brackets"], [4, 8], seed=0))


def small(**kw) -> R.RLOOConfig:
    cfg = dict(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=24, micro_batch_size=8, lr=3e-3,
               ckpt_every=1, rewards=C.RewardSettings(workers=0), overlong=C.OverlongConfig(buffer=4, penalty=0.5))  # fmt: skip
    cfg.update(kw)
    return R.RLOOConfig(**cfg)


def test_one_step_trains_on_leave_one_out_advantages_and_logs_the_instruction_rate(tok, start_model, instructed, tmp_path, monkeypatch):
    seen = {}
    original = R.rloo_advantages

    def spy(rewards, k):
        seen["rewards"], seen["adv"] = rewards.clone(), original(rewards, k)
        return seen["adv"]

    monkeypatch.setattr(R, "rloo_advantages", spy)
    policy = copy.deepcopy(start_model)
    (row,) = R.run_rloo(policy, tok, instructed, small(steps=1), tmp_path)["history"]
    r = seen["rewards"].view(-1, 4)
    assert torch.allclose(seen["adv"].view(-1, 4), r - (r.sum(1, keepdim=True) - r) / 3)
    assert row["seqs_trained"] == 16 and row["updates"] == 1  # every sequence, one on-policy update
    assert 0.0 <= row["instruction_rate"] <= 1.0 and "kl_ref" in row
    assert changed(weights(start_model), weights(policy))
    with pytest.raises(ValueError, match="no instruction"):
        R.run_rloo(copy.deepcopy(start_model), tok, rw.generate_problems(8, seed=3), small(steps=1), tmp_path / "x")


def test_default_reference_is_the_frozen_start_and_kl_beta_reaches_the_update(tok, start_model, instructed, tmp_path):
    """Fails if the policy is its own reference (KL stays 0 at step 2) or kl_beta is dropped
    anywhere between the config and the loss (the weights then equal the kl_beta=0 run's)."""
    runs = {}
    for beta in (0.0, 2.0):
        policy = copy.deepcopy(start_model)
        runs[beta] = (R.run_rloo(policy, tok, instructed, small(loss={"kl_beta": beta}), tmp_path / str(beta))["history"],
                      weights(policy))  # fmt: skip
    (first, second), trained = runs[2.0]
    assert first["kl_ref"] == 0.0 and first["kl_loss"] == 0.0  # step 1: the policy is still the reference
    assert second["kl_ref"] > 1e-4 and second["kl_loss"] > 1e-4  # step 1 moved it; the reference stayed
    assert second["loss"] == pytest.approx(second["pg_loss"] + 2.0 * second["kl_loss"], rel=1e-5)
    assert runs[0.0][0][0]["batch"] == first["batch"] and runs[0.0][0][1]["batch"] == second["batch"]
    assert changed(runs[0.0][1], trained)  # the same prompts, another update: the KL term acted


def test_kl_term_alone_moves_the_policy_and_uses_the_given_reference(tok, start_model, instructed, tmp_path, monkeypatch):
    """Equal rewards make every advantage 0: with kl_beta > 0 only the KL term moves the weights
    (with kl_beta = 0 nothing moves), and the KL is to the reference passed in."""
    monkeypatch.setattr(scoring, "combined_reward", lambda *a, **k: RewardBreakdown(1.0, 1.0, 0.0))
    monkeypatch.setattr(scoring, "instruction_followed", lambda *a, **k: True)
    reference = noisy_copy(start_model)
    rows, moved = {}, {}
    for beta in (0.0, 1.0):
        policy = copy.deepcopy(start_model)
        cfg = small(steps=1, overlong=C.OverlongConfig(penalty=0.0), loss={"kl_beta": beta})
        rows[beta] = R.run_rloo(policy, tok, instructed, cfg, tmp_path / str(beta), reference=reference)["history"]
        moved[beta] = changed(weights(start_model), weights(policy))
    assert all(r["pg_loss"] == 0.0 for r in rows[0.0] + rows[1.0])
    assert rows[0.0][0]["grad_norm"] == 0.0 and not moved[0.0]
    assert rows[1.0][0]["grad_norm"] > 0 and moved[1.0]
    assert rows[1.0][0]["kl_ref"] == rows[0.0][0]["kl_ref"] > 0.01  # the same samples, KL to the noisy reference
    assert rows[1.0][0]["loss"] == pytest.approx(rows[1.0][0]["kl_loss"], rel=1e-6) and rows[1.0][0]["kl_loss"] > 0.01


def test_crash_then_resume_gives_the_same_batches_and_weights(tok, start_model, instructed, tmp_path, monkeypatch):
    cfg = small(steps=4, ckpt_every=2, loss={"kl_beta": 0.1}, off_fraction=0.25)
    clean, clean_batches = copy.deepcopy(start_model), Batches()
    ref = R.run_rloo(clean, tok, instructed, cfg, tmp_path / "clean", callbacks=[clean_batches])
    with pytest.raises(RuntimeError, match="simulated crash after step 3"):
        R.run_rloo(copy.deepcopy(start_model), tok, instructed, cfg, tmp_path / "crashed", callbacks=[Crash(3)])
    assert latest(tmp_path / "crashed" / "checkpoints").name == "step-00000002"
    resumed, batches = copy.deepcopy(start_model), Batches()
    out = R.run_rloo(resumed, tok, instructed, cfg, tmp_path / "crashed", callbacks=[batches])
    assert out["start_step"] == 2 and out["steps"] == 4
    assert batches.seen == {3: clean_batches.seen[3], 4: clean_batches.seen[4]}
    assert [r["batch"] for r in out["history"]] == [r["batch"] for r in ref["history"]]
    final, expected = weights(resumed), weights(clean)
    assert changed(weights(start_model), expected)
    for k, v in expected.items():
        assert torch.equal(final[k], v), k  # bit for bit
    assert [r["step"] for r in out["history"]] == [1, 2, 3, 4]
    monkeypatch.setattr(loop, "_fit", lambda *a, **k: pytest.fail("trained again"))
    assert R.run_rloo(copy.deepcopy(start_model), tok, instructed, cfg, tmp_path / "crashed")["start_step"] == 4


# ----------------------------------------------------------------------------- config and stage


@pytest.mark.parametrize(
    "override, message",
    [
        ("rloo.steps=0", "rloo.steps=0: expected a positive integer"),
        ("rloo.group_size=1", "rloo.group_size=1"),
        ("rloo.lr=-1", "rloo.lr=-1"),
        ("rloo.rewards.task=poetry", "rloo.rewards.task='poetry'"),
        ("rloo.loss.kl_beta=-0.5", "rloo.loss.kl_beta=-0.5"),
        ("rloo.loss.aggregation=mean", "rloo.loss.aggregation='mean'"),
        ("rloo.updates_per_rollout=2", "rloo.updates_per_rollout=2: expected 1"),
        ("rloo.instruction_weight=-1", "rloo.instruction_weight=-1"),
        ("rloo.instructions=[shout]", "rloo.instructions=['shout']"),
        ("rloo.max_words=[0]", "rloo.max_words=[0]"),
        ("rloo.eval_set=heldout", "rloo.eval_set='heldout'"),
        ("rloo.train_problems=2", "rloo.prompts_per_step=16: expected <= rloo.train_problems (2)"),
        ("rloo.difficulties=[0]", "rloo.difficulties=[0]"),
    ],
)
def test_config_errors_name_the_rloo_key(override, message):
    from nemo_plugins.pipeline import PipelineConfig

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(PipelineConfig, DEFAULT_CONFIGS, [override])


def test_tiny_yaml_loads_and_the_stage_is_registered():
    from nemo_plugins.pipeline import REGISTRY, STAGES, PipelineConfig

    @dataclass
    class Root:
        rloo: S.RLOOStageConfig = field(default_factory=S.RLOOStageConfig)

    cfg = load_config(Root, CONF_DIR / "rloo" / "tiny.yaml").rloo
    assert cfg.rewards.task == "world" and cfg.loss.kl_beta > 0 and cfg.updates_per_rollout == 1
    assert "rloo" in STAGES and REGISTRY["rloo"].starts_from == ("grpo", "sft", "recovery", "fusion", "puzzle", "parent")
    assert "rloo" in load_config(PipelineConfig, DEFAULT_CONFIGS).stages


def test_stage_writes_model_and_report_on_held_out_prompts_and_resumes(tok, start_model, tmp_path, monkeypatch):
    world = tiny_world(tok)
    cfg = S.RLOOStageConfig(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=24, micro_batch_size=16, lr=3e-3,
                            ckpt_every=2, eval_problems=6, train_problems=24, rewards=C.RewardSettings(workers=0))  # fmt: skip
    original = weights(start_model)
    report, model = S.run_rloo_stage(start_model, world, cfg, tmp_path)
    assert not changed(original, weights(start_model)) and changed(original, weights(model))
    on_disk = json.loads((tmp_path / "report.json").read_text())
    for when in ("before", "after"):
        assert on_disk[when]["n"] == 6 and set(on_disk[when]["by_kind"]) == {"steps", "max_words", "brackets"}
        assert 0 <= on_disk[when]["instruction_accuracy"] <= 1 and 0 <= on_disk[when]["task_accuracy"] <= 1
    delta = on_disk["after_minus_before"]
    assert delta["instruction_accuracy"] == pytest.approx(on_disk["after"]["instruction_accuracy"] - on_disk["before"]["instruction_accuracy"])
    assert on_disk["training"]["steps"] == 2 and (tmp_path / "rloo_curves.png").stat().st_size > 5000
    assert not changed(weights(load_checkpoint(tmp_path / "model")), weights(model))
    assert (tmp_path / "model" / T.TOKENIZER_FILE).is_file()
    problems = ProblemSet(world)
    train = {p.base_question for p in S.training_prompts(problems, cfg)}
    report_set = {p.base_question for p in S.heldout_prompts(problems, cfg, "report")}
    tuning_set = {p.base_question for p in S.heldout_prompts(problems, cfg, "tuning")}
    assert len(report_set) == len(tuning_set) == 6
    assert not (train & report_set) and not (train & tuning_set) and not (report_set & tuning_set)
    assert not report_set & {p.question for p in world.train + world.eval}

    monkeypatch.setattr(loop, "_fit", lambda *a, **k: pytest.fail("retrained"))
    monkeypatch.setattr(S, "instruction_eval", lambda *a, **k: pytest.fail("re-evaluated"))
    again, model2 = S.run_rloo_stage(start_model, world, cfg, tmp_path)
    assert again["after"] == report["after"] and not changed(weights(model2), weights(model))


def test_stage_crashed_then_rerun_ends_with_the_uninterrupted_weights(tok, start_model, tmp_path):
    world = tiny_world(tok)
    cfg = S.RLOOStageConfig(steps=3, prompts_per_step=4, group_size=4, max_new_tokens=24, micro_batch_size=16, lr=3e-3,
                            ckpt_every=1, eval_problems=3, train_problems=24, rewards=C.RewardSettings(workers=0))  # fmt: skip
    clean_report, clean = S.run_rloo_stage(start_model, world, cfg, tmp_path / "clean")
    with pytest.raises(RuntimeError, match="simulated crash after step 2"):
        S.run_rloo_stage(start_model, world, cfg, tmp_path / "crashed", callbacks=[Crash(2)])
    assert not (tmp_path / "crashed" / "report.json").exists()
    report, resumed = S.run_rloo_stage(start_model, world, cfg, tmp_path / "crashed")
    assert report["training"]["steps"] == 3 and report["after"] == clean_report["after"]
    expected = weights(clean)
    for k, v in weights(resumed).items():
        assert torch.equal(v, expected[k]), k  # bit for bit
    assert not changed(weights(load_checkpoint(tmp_path / "crashed" / "model")), expected)


def test_a_directly_built_config_names_the_rloo_curriculum_key_and_defaults_to_random_order():
    """Without the config loader (a library user building RLOOConfig), a bad sampler setting still
    names `rloo.curriculum.<key>`, not the shared settings' `grpo.` section."""
    from nemo_plugins.rl.rloo import RLOOConfig

    assert RLOOConfig().curriculum.kind == "random"
    with pytest.raises(ValueError, match=r"^rloo\.curriculum\.kind='bogus'"):
        RLOOConfig(curriculum={"kind": "bogus"})
