"""Recovery distillation: the losses against their definitions, config checks, and the
Lightning loop (real gradient accumulation, crash-and-resume equals an uninterrupted run,
KD lowers the KL to the teacher, reports written)."""

import json
import random

import lightning as L
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from nemo_plugins.arch.config import homogeneous
from nemo_plugins.distill import RecoveryConfig, RecoveryLossConfig, recovery_loss, run_recovery
from nemo_plugins.model.losses import hidden_cosine_loss, kd_kl_loss, next_token_mask
from nemo_plugins.utils.training import StepSampler
from nemo_plugins.model.llama import HeteroLlamaForCausalLM, causal_lm_loss
from nemo_plugins.utils.resume import latest

from training_callbacks import Crash, Steps

VOCAB = 50




def tiny(seed, sharpen=1.0):
    """A random tiny Llama; `sharpen` > 1 scales its weights for peaked, input-dependent outputs."""
    torch.manual_seed(seed)
    cfg = homogeneous(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2, intermediate_size=64)
    model = HeteroLlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(sharpen)
    return model


def examples(n, seed, structured=False):
    """Random sequences of 6-14 tokens; the first 3 (the 'prompt') are not counted.
    `structured`: each token is the previous one + 3 (mod VOCAB), a pattern an LM can learn."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length, start = rng.randint(6, 14), rng.randrange(VOCAB)
        ids = [(start + 3 * i) % VOCAB for i in range(length)] if structured else [rng.randrange(VOCAB) for _ in range(length)]
        out.append((ids, [0] * 3 + [1] * (length - 3)))
    return out


def small_cfg(**kw):
    base = dict(steps=6, batch_size=4, lr=5e-3, warmup_steps=1, val_every=2, ckpt_every=3, val_batches=1, keep_last=2)
    return RecoveryConfig(**{**base, **kw})


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- losses


def random_logits(seed, shape=(2, 7, VOCAB), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(shape, generator=g)).to(dtype)


MASK = torch.tensor([[1, 1, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)


def test_kd_zero_for_identical_positive_otherwise():
    s, t = random_logits(0), random_logits(1)
    assert kd_kl_loss(s, s.clone(), MASK, 1.0) == 0
    assert kd_kl_loss(s, s.clone(), MASK, 3.0) == 0
    assert kd_kl_loss(s, t, MASK, 1.0) > 0


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_kd_matches_the_definition_with_temperature(temperature):
    s, t = random_logits(0), random_logits(1)
    kl = kl_divergence(Categorical(logits=t / temperature), Categorical(logits=s / temperature))  # [B, T]
    expected = temperature**2 * kl[MASK].mean()
    assert kd_kl_loss(s, t, MASK, temperature) == pytest.approx(float(expected), rel=1e-5)
    assert kd_kl_loss(s, t, MASK, temperature, reduction="sum") == pytest.approx(float(expected) * int(MASK.sum()), rel=1e-5)


def test_kd_and_cosine_ignore_masked_positions():
    s, t = random_logits(0), random_logits(1)
    hs, ht = random_logits(2, (2, 7, 32)), random_logits(3, (2, 7, 32))
    kd, cos = kd_kl_loss(s, t, MASK, 2.0), hidden_cosine_loss(hs, ht, MASK)
    for x in (s, t, hs, ht):
        x[~MASK] = float("nan")  # whatever sits at uncounted positions (padding) never leaks in
    assert kd_kl_loss(s, t, MASK, 2.0) == kd and hidden_cosine_loss(hs, ht, MASK) == cos
    t[0, 0, 0] += 1.0  # a counted position does matter
    assert kd_kl_loss(s, t, MASK, 2.0) != kd


def test_kd_half_precision_inputs_reduce_in_fp32():
    s, t = random_logits(0), random_logits(1)
    loss = kd_kl_loss(s.bfloat16(), t.bfloat16(), MASK, 1.0)
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(kd_kl_loss(s.bfloat16().float(), t.bfloat16().float(), MASK, 1.0)), rel=1e-6)


def test_hidden_cosine_values():
    h = random_logits(0, (2, 7, 32))
    assert float(hidden_cosine_loss(h, h.clone(), MASK)) == pytest.approx(0.0, abs=1e-6)
    assert float(hidden_cosine_loss(h, -h, MASK)) == pytest.approx(2.0, abs=1e-6)
    assert float(hidden_cosine_loss(h, 5 * h, MASK)) == pytest.approx(0.0, abs=1e-6)  # scale-free


def test_gradients_match_finite_differences():
    s = random_logits(0, (2, 4, 7), torch.float64).requires_grad_()
    t = random_logits(1, (2, 4, 7), torch.float64)
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: kd_kl_loss(x, t, mask, 1.7), (s,))
    hs = random_logits(2, (2, 4, 5), torch.float64).requires_grad_()
    ht = random_logits(3, (2, 4, 5), torch.float64)
    assert torch.autograd.gradcheck(lambda x: hidden_cosine_loss(x, ht, mask), (hs,))


def test_next_token_alignment_matches_causal_lm_loss():
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]])
    pos = next_token_mask(loss_mask)
    # position t counts iff token t+1 does; the last position predicts nothing
    assert pos.tolist() == [[0, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]]
    s, t = random_logits(0), random_logits(1)
    lm_sum = recovery_loss(RecoveryLossConfig(mode="cpt"), ids, loss_mask, s, reduction="sum")[0]
    assert float(lm_sum) == pytest.approx(float(causal_lm_loss(s, ids, loss_mask)) * int(pos.sum()), rel=1e-6)
    cfg = RecoveryLossConfig(kd_weight=0.5, lm_weight=2.0, cosine_weight=0.25)
    hs, ht = random_logits(2, (2, 7, 32)), random_logits(3, (2, 7, 32))
    total, parts = recovery_loss(cfg, ids, loss_mask, s, hs, t, ht)
    assert parts["kd"] == kd_kl_loss(s, t, pos, 1.0)
    assert float(total) == pytest.approx(float(0.5 * parts["kd"] + 2.0 * parts["lm"] + 0.25 * parts["cosine"]), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kd_weight": -1.0}, "recovery.loss.kd_weight=-1.0"),
        ({"cosine_weight": float("nan")}, "recovery.loss.cosine_weight=nan"),
        ({"temperature": 0.0}, "recovery.loss.temperature=0.0"),
        ({"mode": "sft"}, "recovery.loss.mode='sft'"),
        ({"kd_weight": 0.0}, "all weights are zero"),
    ],
)
def test_loss_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        RecoveryLossConfig(**kwargs)


def test_loss_config_cpt_needs_no_weights_or_teacher():
    cfg = RecoveryLossConfig(mode="cpt", kd_weight=0.0)
    assert not cfg.needs_teacher


@pytest.mark.parametrize(
    "kwargs, field",
    [({"steps": 0}, "recovery.steps=0"), ({"grad_accum": -2}, "recovery.grad_accum=-2"),
     ({"lr": 0.0}, "recovery.lr=0.0"), ({"precision": "fp8"}, "recovery.precision='fp8'"),
     ({"min_lr_ratio": 2.0}, "recovery.min_lr_ratio=2.0"), ({"val_batches": -1}, "recovery.val_batches=-1")],
)  # fmt: skip
def test_recovery_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        RecoveryConfig(**kwargs)


# ----------------------------------------------------------------------------- data order


def test_step_sampler_depends_only_on_seed_and_step():
    full = StepSampler(30, 8, seed=3, start=0, stop=10)
    tail = StepSampler(30, 8, seed=3, start=6, stop=10)
    assert list(full)[6:] == list(tail)
    epoch0 = [i for step in list(full)[:3] for i in step]
    assert len(set(epoch0)) == 24  # no repeats within an epoch (remainder dropped)
    assert list(full)[0] != list(full)[3]  # a new permutation each epoch
    with pytest.raises(ValueError, match="batch_size × grad_accum = 8"):
        StepSampler(5, 8, seed=0, start=0, stop=1)


# ----------------------------------------------------------------------------- training loop


def test_grad_accumulation_equals_one_large_batch(tmp_path):
    teacher, train, val = tiny(0, sharpen=5.0), examples(48, 0), examples(8, 1)
    results = {}
    for name, (bs, accum) in {"accum": (4, 2), "large": (8, 1)}.items():
        student = tiny(1)
        sizes = []  # batch size of every training forward: accumulation must run real micro-batches
        student.model.embed_tokens.register_forward_hook(lambda m, args, out: sizes.append(len(args[0])) if m.training else None)
        summary = run_recovery(student, teacher, train, val, small_cfg(steps=3, batch_size=bs, grad_accum=accum), tmp_path / name)
        results[name] = (weights(student), summary)
        assert sizes == [bs] * (3 * accum)
    (wa, sa), (wl, sl) = results["accum"], results["large"]
    assert sa["final_train_loss"] == pytest.approx(sl["final_train_loss"], rel=1e-5)
    for k in wa:
        torch.testing.assert_close(wa[k], wl[k], rtol=0, atol=1e-5, msg=k)
    assert not all(torch.equal(wa[k], tiny(1).state_dict()[k]) for k in wa)  # it did train


def test_crash_then_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    teacher, train, val = tiny(0, sharpen=5.0), examples(20, 0), examples(8, 1)
    cfg = small_cfg(steps=8, ckpt_every=3, val_every=2, grad_accum=2, batch_size=2)  # 5 steps per epoch: crosses one

    clean = tiny(1)
    ref = run_recovery(clean, teacher, train, val, cfg, tmp_path / "clean")

    with pytest.raises(RuntimeError, match="simulated crash after step 5"):
        run_recovery(tiny(1), teacher, train, val, cfg, tmp_path / "crashed", callbacks=[Crash(5)])
    assert latest(tmp_path / "crashed" / "checkpoints").name == "step-00000003"

    resumed, steps = tiny(7), Steps()  # another init: the weights must come from the checkpoint
    out = run_recovery(resumed, teacher, train, val, cfg, tmp_path / "crashed", callbacks=[steps])
    assert steps.seen == [4, 5, 6, 7, 8]  # the step counter continues
    assert out["start_step"] == 3 and out["steps"] == 8
    final = weights(resumed)
    for k, v in weights(clean).items():
        assert torch.equal(final[k], v), k  # bit for bit: same data, same state, same arithmetic
    assert [r["step"] for r in out["val_history"]] == [0, 2, 4, 6, 8]  # no duplicated rows from the crashed part
    for a, b in zip(out["val_history"], ref["val_history"]):
        assert a["step"] == b["step"] and a["val_kl"] == pytest.approx(b["val_kl"], abs=1e-6)
    assert (tmp_path / "crashed" / "metrics.csv").read_text().count("\n") == 6

    # a finished run is not trained again
    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: pytest.fail("trained again"))
    again = tiny(9)
    done = run_recovery(again, teacher, train, val, cfg, tmp_path / "crashed")
    assert done["start_step"] == done["steps"] == 8
    assert all(torch.equal(v, final[k]) for k, v in weights(again).items())


def test_kd_lowers_val_kl_and_writes_reports(tmp_path):
    teacher, student = tiny(0, sharpen=3.0), tiny(1)
    cfg = small_cfg(steps=30, batch_size=8, lr=1e-2, warmup_steps=2, val_every=10, ckpt_every=15, val_batches=2)
    out = run_recovery(student, teacher, examples(64, 0), examples(16, 1), cfg, tmp_path)
    history = out["val_history"]
    assert [r["step"] for r in history] == [0, 10, 20, 30]
    assert history[-1]["val_kl"] < 0.75 * history[0]["val_kl"]
    assert not student.training and not any(p.requires_grad for p in teacher.parameters())
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,train_loss,val_kl,val_lm_loss,lr" and len(rows) == 5
    png = (tmp_path / "recovery.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert json.loads((tmp_path / "recovery_summary.json").read_text())["steps"] == 30
    assert out["last_checkpoint"].endswith("step-00000030")


def test_cpt_mode_runs_without_teacher(tmp_path):
    cfg = small_cfg(steps=4, loss=RecoveryLossConfig(mode="cpt"), lr=2e-2)
    out = run_recovery(tiny(1), None, examples(32, 0, structured=True), examples(8, 1, structured=True), cfg, tmp_path)
    assert all(r["val_kl"] is None for r in out["val_history"])
    assert out["val_history"][-1]["val_lm_loss"] < out["val_history"][0]["val_lm_loss"]
    with pytest.raises(ValueError, match="needs a teacher"):
        run_recovery(tiny(1), None, examples(32, 0), examples(8, 1), small_cfg(), tmp_path / "kd")
