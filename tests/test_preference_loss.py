"""The preference losses (RPO's three and DPO) against hand formulas on small tensors, both signs
of Δπ − Δr, stability at large |Δ|, a gradient, and `PreferenceLoss` over micro-batches."""

import math

import pytest
import torch

from nemo_plugins.rl.policy_loss import TrainBatch
from nemo_plugins.rl.preference_loss import LOSS_KINDS, PreferenceLoss, preference_loss, sequence_logp

BETA, ETA = 0.5, 2.0
# per pair: policy chosen/rejected, reference chosen/rejected, reward chosen/rejected (floats)
PAIRS = [
    (-3.0, -5.0, -4.0, -4.5, 1.2, 0.2),  # Δπ = 0.5·(1 − (−0.5)) = 0.75, Δr = 2.0  (Δπ < Δr)
    (-2.0, -6.0, -3.0, -3.0, 0.4, 0.3),  # Δπ = 0.5·(1 + 3) = 2.0,     Δr = 0.2  (Δπ > Δr)
    (-7.0, -2.0, -6.5, -2.5, -0.5, 0.5),  # Δπ = 0.5·(−0.5 − 0.5) = −0.5, Δr = −2.0 (both negative)
    (-1.0, -1.0, -1.0, -1.0, 0.0, 0.0),  # Δπ = Δr = 0
]


def sig(x):
    return 1 / (1 + math.exp(-x))


def deltas(pc, pr, rc, rr, gc, gr):
    return BETA * ((pc - rc) - (pr - rr)), ETA * (gc - gr)


def kl(p, q):
    """KL(Bern p ‖ Bern q), written out."""
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


HAND = {
    "rpo_bwd_kl": lambda dp, dr: kl(sig(dr), sig(dp)),
    "rpo_fwd_kl": lambda dp, dr: kl(sig(dp), sig(dr)),
    "rpo_sq": lambda dp, dr: (dp - dr) ** 2,
    "dpo": lambda dp, dr: -math.log(sig(dp)),
}


def columns(pairs, dtype=torch.float64, grad=False):
    return [torch.tensor([p[j] for p in pairs], dtype=dtype, requires_grad=grad) for j in range(6)]


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_every_kind_matches_its_hand_formula(kind):
    got = preference_loss(kind, *columns(PAIRS), BETA, ETA)
    want = [HAND[kind](*deltas(*p)) for p in PAIRS]
    assert got.shape == (len(PAIRS),)
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)
    signs = {math.copysign(1, a - b) for a, b in (deltas(*p) for p in PAIRS[:3])}
    assert signs == {1.0, -1.0}  # both signs of Δπ − Δr are covered
    if kind != "dpo":  # the RPO losses vanish where the margins agree, and only there
        assert got[3].item() == pytest.approx(0.0, abs=1e-15) and (got[:3] > 1e-3).all()


def test_the_kinds_differ_and_dpo_ignores_the_rewards():
    cols = columns(PAIRS[:3])
    losses = {k: preference_loss(k, *cols, BETA, ETA) for k in LOSS_KINDS}
    for a in LOSS_KINDS:
        for b in LOSS_KINDS:
            if a < b:
                assert not torch.allclose(losses[a], losses[b]), (a, b)
    other_rewards = [*cols[:4], cols[4] * 3, cols[5] - 1]
    assert torch.equal(preference_loss("dpo", *other_rewards, BETA, ETA), losses["dpo"])
    assert not torch.allclose(preference_loss("rpo_sq", *other_rewards, BETA, ETA), losses["rpo_sq"])
    swapped = [cols[1], cols[0], cols[3], cols[2], cols[5], cols[4]]  # chosen <-> rejected
    assert not torch.allclose(preference_loss("dpo", *swapped, BETA, ETA), losses["dpo"])  # the order matters


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_large_margins_stay_finite(kind):
    big = [(-1.0, -801.0, 0.0, 0.0, 300.0, -300.0), (-801.0, -1.0, 0.0, 0.0, -300.0, 300.0),
           (-1.0, -801.0, 0.0, 0.0, -300.0, 300.0)]  # fmt: skip
    cols = columns(big, torch.float32, grad=True)
    loss = preference_loss(kind, *cols, 1.0, 1.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and all(torch.isfinite(c.grad).all() for c in cols[:2])
    if kind == "dpo":
        assert loss.tolist() == pytest.approx([0.0, 800.0, 0.0], abs=1e-3)
    elif kind == "rpo_sq":
        assert loss.tolist() == pytest.approx([200.0**2, 200.0**2, 1400.0**2], rel=1e-6)
    else:  # margins of the same sign and far out: ~0; opposite signs: ~ the gap in log-odds
        assert loss[0].item() == pytest.approx(0.0, abs=1e-3) and loss[1].item() == pytest.approx(0.0, abs=1e-3)
        assert loss[2].item() == pytest.approx(800.0 if kind == "rpo_bwd_kl" else 600.0, rel=1e-3)


def test_bwd_kl_gradient_matches_the_hand_derivative():
    # d/dΔπ KL(Bern p* ‖ Bern σ(Δπ)) = σ(Δπ) − p*, and dΔπ/d(log π chosen) = β, d/d(log π rejected) = −β
    cols = columns(PAIRS, grad=True)
    preference_loss("rpo_bwd_kl", *cols, BETA, ETA).sum().backward()
    want = [BETA * (sig(dp) - sig(dr)) for dp, dr in (deltas(*p) for p in PAIRS)]
    assert cols[0].grad.tolist() == pytest.approx(want, rel=1e-10, abs=1e-15)
    assert cols[1].grad.tolist() == pytest.approx([-w for w in want], rel=1e-10, abs=1e-15)
    assert cols[2].grad.tolist() == pytest.approx([-w for w in want], rel=1e-10, abs=1e-15)  # log π − log π_ref
    # d/dΔr = σ'(Δr)·(Δr − Δπ), and dΔr/d(r chosen) = η
    want_r = [ETA * sig(dr) * (1 - sig(dr)) * (dr - dp) for dp, dr in (deltas(*p) for p in PAIRS)]
    assert cols[4].grad.tolist() == pytest.approx(want_r, rel=1e-10, abs=1e-15)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind='ipo'"):
        preference_loss("ipo", *columns(PAIRS), BETA, ETA)


# ----------------------------------------------------------------------------- the PolicyLoss


def pair_batch(seed: int, n_pairs: int, T: int = 6):
    g = torch.Generator().manual_seed(seed)
    B = 2 * n_pairs
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[:, 0] = 1  # every sequence has a response token
    return TrainBatch(
        ids=torch.zeros(B, T, dtype=torch.long), mask=mask,
        pair_index=torch.arange(n_pairs).repeat_interleave(2),
        rewards=torch.randn(B, generator=g), ref_logp=-torch.rand(B, T, generator=g) * 3,
    ), -torch.rand(B, T, generator=g) * 3  # fmt: skip


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_policy_loss_is_the_mean_of_hand_pair_losses_and_micro_batches_add_up(kind):
    batch, logp = pair_batch(0, 4)
    logp.requires_grad_(True)
    fn = PreferenceLoss(kind, BETA, ETA)
    tokens, seqs = batch.normalizers()
    loss, metrics = fn(logp, batch, tokens, seqs)
    m = batch.mask.bool()
    s = [(logp[i][m[i]].sum().item(), batch.ref_logp[i][m[i]].sum().item(), batch.rewards[i].item()) for i in range(8)]
    want = [HAND[kind](BETA * ((s[2 * p][0] - s[2 * p][1]) - (s[2 * p + 1][0] - s[2 * p + 1][1])),
                       ETA * (s[2 * p][2] - s[2 * p + 1][2])) for p in range(4)]  # fmt: skip
    assert loss.item() == pytest.approx(sum(want) / 4, rel=1e-5)
    assert int(metrics["tokens"]) == tokens
    full = torch.autograd.grad(loss, logp)[0]

    parts = []
    for rows in (slice(0, 2), slice(2, 8)):  # micro-batches of 1 and 3 pairs, the step's counts
        micro = TrainBatch(batch.ids[rows], batch.mask[rows], pair_index=batch.pair_index[rows],
                           rewards=batch.rewards[rows], ref_logp=batch.ref_logp[rows])  # fmt: skip
        parts.append(fn(logp[rows], micro, tokens, seqs))
    assert sum(p[0].item() for p in parts) == pytest.approx(loss.item(), rel=1e-6)
    assert sum(p[1]["loss"].item() for p in parts) == pytest.approx(loss.item(), rel=1e-6)
    summed = torch.autograd.grad(sum(p[0] for p in parts), logp)[0]
    torch.testing.assert_close(summed, full, rtol=1e-6, atol=1e-7)
    assert (full[~m] == 0).all() and full[m].abs().sum() > 0


def test_policy_loss_ignores_masked_positions_and_checks_the_layout():
    batch, logp = pair_batch(1, 2)
    fn = PreferenceLoss("rpo_sq", BETA, ETA)
    noisy = logp.masked_fill(~batch.mask.bool(), float("nan"))
    a = fn(logp, batch, *batch.normalizers())[0]
    assert torch.equal(fn(noisy, batch, *batch.normalizers())[0], a)
    assert sequence_logp(noisy, batch.mask).isfinite().all()
    batch.pair_index = torch.tensor([0, 1, 0, 1])  # pairs not as consecutive (chosen, rejected) rows
    with pytest.raises(ValueError, match="consecutive rows"):
        fn(logp, batch, *batch.normalizers())
    batch.pair_index, batch.ref_logp = torch.tensor([0, 0, 1, 1]), None
    with pytest.raises(ValueError, match="ref_logp"):
        fn(logp, batch, *batch.normalizers())


def test_sft_loss_weight_adds_the_chosen_rows_token_mean_nll_and_micro_batches_add_up():
    batch, logp = pair_batch(2, 3)
    logp.requires_grad_(True)
    tokens, seqs = batch.normalizers()
    alpha = 0.7
    plain, _ = PreferenceLoss("rpo_bwd_kl", BETA, ETA)(logp, batch, tokens, seqs)
    fn = PreferenceLoss("rpo_bwd_kl", BETA, ETA, sft_loss_weight=alpha)
    loss, metrics = fn(logp, batch, tokens, seqs)
    m = batch.mask.bool()
    nll = [-logp[i][m[i]].mean().item() for i in (0, 2, 4)]  # the chosen rows
    assert loss.item() == pytest.approx(plain.item() + alpha * sum(nll) / 3, rel=1e-6)
    assert metrics["sft_loss"].item() == pytest.approx(sum(nll) / 3, rel=1e-6)
    grad = torch.autograd.grad(loss - plain, logp)[0]  # only the chosen rows' tokens, each -α / (3 n_i)
    for i in range(6):
        want = torch.where(m[i], -alpha / (3 * m[i].sum()), 0.0) if i % 2 == 0 else torch.zeros(m.shape[1])
        torch.testing.assert_close(grad[i], want.to(grad.dtype))
    parts = [fn(logp[r], TrainBatch(batch.ids[r], batch.mask[r], pair_index=batch.pair_index[r], rewards=batch.rewards[r],
                                    ref_logp=batch.ref_logp[r]), tokens, seqs)[0] for r in (slice(0, 2), slice(2, 6))]  # fmt: skip
    assert sum(p.item() for p in parts) == pytest.approx(loss.item(), rel=1e-6)
