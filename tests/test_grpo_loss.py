"""GRPO math against hand-computed values: advantages (mean / leave-one-out baselines, sample std,
zero-variance groups), both clip branches and the clip fraction, k3, token vs sequence
aggregation, micro-batch accumulation, autograd gradients, masks, token log-probs, the
overlong penalty."""

import math

import pytest
import torch

from nemo_plugins.rl.grpo_loss import (
    GRPOLossConfig,
    grpo_loss,
    group_advantages,
    keep_sequences,
    kl_k3,
    loss_normalizers,
    overlong_penalty,
    zero_variance_groups,
)
from nemo_plugins.rl.policy_loss import entropy, token_logprobs




def close(actual, expected, tol=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=tol, rtol=0), (actual, expected)


# --------------------------------------------------------------------------- advantages

# Group 0: [1, 0, 0, 0]: mean 0.25, centred [0.75, -0.25, -0.25, -0.25],
#   sample var = (0.5625 + 3 * 0.0625) / 3 = 0.25 -> std 0.5 (population std would be 0.433).
# Group 1: all 2.0 -> zero variance.
# Group 2: [0, 1, 2, 3]: mean 1.5, centred [-1.5, -0.5, 0.5, 1.5], sample var 5/3.
REWARDS = torch.tensor([[1.0, 0, 0, 0], [2.0, 2, 2, 2], [0.0, 1, 2, 3]])
S2 = math.sqrt(5 / 3)


def test_advantages_mean_baseline_sample_std():
    adv = group_advantages(REWARDS, 4, eps=0.0)
    close(adv, [[1.5, -0.5, -0.5, -0.5], [0, 0, 0, 0], [-1.5 / S2, -0.5 / S2, 0.5 / S2, 1.5 / S2]])
    # flat [N*G] input gives the same values, flat
    close(group_advantages(REWARDS.flatten(), 4, eps=0.0), adv.flatten())
    # eps enters the denominator: 0.75 / (0.5 + 0.5) for group 0
    close(group_advantages(REWARDS[:1], 4, eps=0.5), [[0.75, -0.25, -0.25, -0.25]])


def test_advantages_without_std():
    close(group_advantages(REWARDS[:1], 4, normalize_std=False), [[0.75, -0.25, -0.25, -0.25]])


def test_advantages_leave_one_out():
    # r_0 = 1, others [0, 0, 0] -> 1 - 0 = 1; r_1 = 0, others [1, 0, 0] -> 0 - 1/3.
    close(group_advantages(REWARDS[:1], 4, leave_one_out=True, normalize_std=False), [[1.0, -1 / 3, -1 / 3, -1 / 3]])
    # then divided by the group's sample std 0.5
    close(group_advantages(REWARDS[:1], 4, leave_one_out=True, eps=0.0), [[2.0, -2 / 3, -2 / 3, -2 / 3]])


def test_zero_variance_groups_flagged_and_exactly_zero():
    assert zero_variance_groups(REWARDS, 4).tolist() == [False, True, False]
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.0, 0.0, 1.0])
    assert zero_variance_groups(rewards, 3).tolist() == [True, True, False]
    for loo in (False, True):
        adv = group_advantages(rewards, 3, leave_one_out=loo)  # default eps 1e-6 would amplify rounding
        assert torch.equal(adv[:6], torch.zeros(6)), adv


def test_keep_sequences():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    assert keep_sequences(rewards, 2, GRPOLossConfig()).tolist() == [True, True, False, False, False, False]
    assert keep_sequences(rewards, 2, GRPOLossConfig(drop_zero_variance=False)).tolist() == [True] * 6


def test_advantage_shape_errors_name_group_size():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 1)


# --------------------------------------------------------------------------- token quantities


def test_token_logprobs_hand_value_and_alignment():
    # position 0 logits [0, log 3] -> p = [0.25, 0.75]; it scores ids[1] = 1 -> log 0.75
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0]]])
    ids = torch.tensor([[0, 1]])
    close(token_logprobs(logits, ids), [[math.log(0.75), 0.0]])


def test_token_logprobs_matches_log_softmax_gather():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7) * 3
    ids = torch.randint(0, 7, (2, 5))
    lp = token_logprobs(logits, ids)
    ref = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    close(lp[:, :-1], ref, tol=1e-5)
    assert torch.equal(lp[:, -1], torch.zeros(2))
    lp16 = token_logprobs(logits.bfloat16(), ids)
    assert lp16.dtype == torch.float32
    ref16 = torch.log_softmax(logits.bfloat16().float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    close(lp16[:, :-1], ref16)


def test_entropy_values():
    # p = [0.25, 0.75]: -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.562335; uniform over 4: ln 4; a -inf logit counts 0
    logits = torch.tensor([[[0.0, math.log(3.0), -math.inf], [1.0, 1.0, 1.0]]])
    close(entropy(logits), [[0.5623351, math.log(3.0)]])


def test_kl_k3_values():
    close(kl_k3(torch.tensor([-1.3]), torch.tensor([-1.3])), [0.0])
    # logp = ln 0.5, ref = ln 0.25: d = -ln 2 -> 0.5 + 0.693147 - 1 = 0.193147
    close(kl_k3(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])), [0.1931472])
    # swapped: d = ln 2 -> 2 - 0.693147 - 1 = 0.306853
    close(kl_k3(torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.5)])), [0.3068528])
    torch.manual_seed(1)
    assert (kl_k3(torch.randn(100) * 3, torch.randn(100) * 3) >= 0).all()


# --------------------------------------------------------------------------- the clipped loss

# Sequence 0, A = +1, ratios [1.5, 1.1, 0.5]: 1.5 > 1.28 clipped -> -1.28 (clip active);
#   1.1 -> -1.1; 0.5 < 0.8 but A > 0 keeps the unclipped -0.5.
# Sequence 1, A = -1, ratios [0.5, 0.9, 1.5]: 0.5 < 0.8 clipped -> +0.8 (clip active);
#   0.9 -> 0.9; 1.5 > 1.28 but A < 0 keeps the unclipped +1.5.
# Token mean = (-1.28 - 1.1 - 0.5 + 0.8 + 0.9 + 1.5) / 6 = 0.32 / 6; clip fraction 2/6; mean ratio 1.
RATIOS = torch.tensor([[1.5, 1.1, 0.5], [0.5, 0.9, 1.5]], dtype=torch.float64)
ADV = torch.tensor([1.0, -1.0], dtype=torch.float64)
MASK = torch.ones(2, 3, dtype=torch.bool)


def test_clip_branches_loss_and_metrics():
    logp = RATIOS.log()
    cfg = GRPOLossConfig(clip_low=0.2, clip_high=0.28)
    loss, metrics = grpo_loss(logp, torch.zeros_like(logp), None, ADV, MASK, cfg)
    close(loss, 0.32 / 6)
    close(metrics["clip_fraction"], 2 / 6)
    close(metrics["ratio_mean"], 1.0)
    # approx KL(old || new) = mean(ρ - 1 - ln ρ)
    close(metrics["approx_kl"], sum(r - 1 - math.log(r) for r in RATIOS.flatten().tolist()) / 6)
    # symmetric clip 0.2: token (0, 0) becomes -1.2 -> (-1.2 - 1.1 - 0.5 + 0.8 + 0.9 + 1.5) / 6
    loss_sym, _ = grpo_loss(logp, torch.zeros_like(logp), None, ADV, MASK, GRPOLossConfig(clip_high=0.2))
    close(loss_sym, 0.4 / 6)


def test_gradient_unclipped_is_minus_a_rho_and_clipped_is_zero():
    logp = RATIOS.log().requires_grad_(True)
    loss, _ = grpo_loss(logp, torch.zeros_like(logp), None, ADV, MASK, GRPOLossConfig())
    loss.backward()
    # d/dlogp of -A·ρ/6 is -A·ρ/6; clipped tokens (0,0) and (1,0) get 0
    close(logp.grad, [[0.0, -1.1 / 6, -0.5 / 6], [0.0, 0.9 / 6, 1.5 / 6]], tol=1e-12)


def test_on_policy_old_logp_none_gives_minus_a_grad():
    logp = torch.tensor([[-0.7, -2.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([2.0], dtype=torch.float64)
    loss, metrics = grpo_loss(logp, None, None, adv, torch.ones(1, 2), GRPOLossConfig())
    loss.backward()
    close(loss, -2.0)  # ρ = 1 -> -A
    close(logp.grad, [[-1.0, -1.0]], tol=1e-12)  # -A·ρ / 2 tokens
    close(metrics["clip_fraction"], 0.0)


def test_kl_term_added_with_beta():
    # A = 0 so only the KL: k3(ln 0.5 vs ref ln 0.25) = 0.193147, times beta 0.1
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    loss, metrics = grpo_loss(logp, logp, ref, torch.zeros(1), torch.ones(1, 1), GRPOLossConfig(kl_beta=0.1))
    close(loss, 0.01931472)
    close(metrics["kl_ref"], 0.1931472)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, logp, None, torch.zeros(1), torch.ones(1, 1), GRPOLossConfig(kl_beta=0.1))


def test_token_vs_sequence_aggregation_unequal_lengths():
    # ρ = 1 so loss_t = -A. Seq 0: A = 3, 1 token -> [-3]; seq 1: A = -1, 3 tokens -> [1, 1, 1].
    # token: (-3 + 3) / 4 = 0; sequence: (-3 + 1) / 2 = -1.
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([3.0, -1.0])
    tok, _ = grpo_loss(logp, logp, None, adv, mask, GRPOLossConfig(aggregation="token"))
    seq, _ = grpo_loss(logp, logp, None, adv, mask, GRPOLossConfig(aggregation="sequence"))
    close(tok, 0.0)
    close(seq, -1.0)


def test_keep_drops_sequences_from_loss_and_normalizer():
    # A = [2, -1, 0, 0], ρ = 1; lengths [2, 1, 2, 2]. All kept: (-4 + 1) / 7; keep [T, T, F, F]: -3 / 3.
    logp = torch.zeros(4, 2)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]], dtype=torch.bool)
    adv = torch.tensor([2.0, -1.0, 0.0, 0.0])
    keep = torch.tensor([True, True, False, False])
    full, _ = grpo_loss(logp, logp, None, adv, mask, GRPOLossConfig())
    dropped, metrics = grpo_loss(logp, logp, None, adv, mask, GRPOLossConfig(), keep=keep)
    close(full, -3 / 7)
    close(dropped, -1.0)
    assert int(metrics["tokens"]) == 3
    assert loss_normalizers(mask, keep) == (3, 2)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_micro_batches_sum_to_full_batch(aggregation):
    torch.manual_seed(2)
    b, t = 6, 5
    logp = -torch.rand(b, t, dtype=torch.float64) * 2
    old = logp + torch.randn(b, t, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(b, t, dtype=torch.float64) * 0.3
    adv = torch.randn(b, dtype=torch.float64)
    lengths = torch.tensor([1, 5, 2, 4, 3, 5])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    keep = torch.tensor([True, True, True, False, True, True])
    cfg = GRPOLossConfig(kl_beta=0.05, aggregation=aggregation)
    full, _ = grpo_loss(logp, old, ref, adv, mask, cfg, keep=keep)
    tokens, seqs = loss_normalizers(mask, keep)
    assert (tokens, seqs) == (1 + 5 + 2 + 3 + 5, 5)
    parts = [slice(0, 2), slice(2, 3), slice(3, 6)]
    summed = sum(
        grpo_loss(logp[s], old[s], ref[s], adv[s], mask[s], cfg, tokens, keep=keep[s], global_sequences=seqs)[0]
        for s in parts
    )
    close(summed, full, tol=1e-12)
    # without the global normalizer the micro-batch means do not add up to it
    naive = sum(grpo_loss(logp[s], old[s], ref[s], adv[s], mask[s], cfg, keep=keep[s])[0] for s in parts)
    assert not torch.allclose(naive, full)


def test_masked_values_change_nothing():
    torch.manual_seed(3)
    logp = -torch.rand(3, 4, dtype=torch.float64)
    old = logp + 0.2 * torch.randn(3, 4, dtype=torch.float64)
    ref = logp + 0.2 * torch.randn(3, 4, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    cfg = GRPOLossConfig(kl_beta=0.1)

    def run(lp, o, r):
        lp = lp.clone().requires_grad_(True)
        loss, metrics = grpo_loss(lp, o, r, adv, mask, cfg)
        loss.backward()
        return loss, metrics, lp.grad

    loss0, m0, g0 = run(logp, old, ref)
    junk = ~mask
    lp2, old2, ref2 = logp.clone(), old.clone(), ref.clone()
    lp2[junk], old2[junk], ref2[junk] = 50.0, -math.inf, math.nan
    loss1, m1, g1 = run(lp2, old2, ref2)
    assert torch.equal(loss0, loss1)
    assert torch.equal(g0, g1)
    assert torch.equal(g1[junk], torch.zeros(int(junk.sum()), dtype=torch.float64))
    for k in m0:
        assert torch.equal(m0[k], m1[k]), k
    # and a counted position does matter
    lp3 = logp.clone()
    lp3[1, 3] += 0.5
    assert not torch.equal(run(lp3, old, ref)[0], loss0)


def test_config_errors_name_the_field():
    for kwargs, field in [
        ({"clip_low": 1.0}, "clip_low"),
        ({"clip_low": -0.1}, "clip_low"),
        ({"clip_high": -0.1}, "clip_high"),
        ({"kl_beta": -1e-3}, "kl_beta"),
        ({"kl_beta": math.inf}, "kl_beta"),
        ({"aggregation": "seq"}, "aggregation"),
        ({"drop_zero_variance": "yes"}, "drop_zero_variance"),
    ]:
        with pytest.raises(ValueError, match=field):
            GRPOLossConfig(**kwargs)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(torch.zeros(2, 3), None, None, torch.zeros(3), torch.ones(2, 3), GRPOLossConfig())


# --------------------------------------------------------------------------- overlong penalty


def test_overlong_penalty_values():
    # max_len 10, buffer 4: free up to 6, then -(len - 6) / 4, -1 at 10 and beyond
    lengths = torch.tensor([3, 6, 7, 8, 10, 12])
    close(overlong_penalty(lengths, 10, 4), [0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    close(overlong_penalty(lengths, 10, 4, penalty=0.5), [0.0, 0.0, -0.125, -0.25, -0.5, -0.5])
    close(overlong_penalty(lengths, 10, 0), [0.0, 0.0, 0.0, 0.0, 0.0, -1.0])
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, 10, 11)
    with pytest.raises(ValueError, match="penalty"):
        overlong_penalty(lengths, 10, 4, penalty=-1.0)
