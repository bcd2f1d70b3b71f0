"""The reward model: Bradley-Terry loss and gradient against hand formulas, the last-token score
under both paddings, save/load, and a short tiny-world training run that beats chance."""

import math

import pytest
import torch

from nemo_plugins.arch.config import homogeneous
from nemo_plugins.data.preference_pairs import pair_examples, world_pairs
from nemo_plugins.errors import CheckpointError
from nemo_plugins.model.checkpoint import load_checkpoint
from nemo_plugins.model.llama import HeteroLlamaForCausalLM
from nemo_plugins.rl.reward_model import (
    HEAD_FILE, RewardModel, RewardModelConfig, bradley_terry_loss, evaluate_pairs, last_token_index, load_reward_model,
    pad, pair_wins, save_reward_model, step_loss, train_reward_model,
)  # fmt: skip

PAD = 0


def _small_rm(vocab: int = 40, seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    cfg = homogeneous(vocab_size=vocab, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_position_embeddings=256, rms_norm_eps=1e-5)  # fmt: skip
    rm = RewardModel(HeteroLlamaForCausalLM(cfg))
    torch.nn.init.normal_(rm.head.bias)  # a non-zero bias, so a dropped bias would show
    return rm.eval()


# ----------------------------------------------------------------------------- Bradley-Terry


def test_bt_loss_and_gradient_match_hand_formulas():
    rc_vals, rr_vals = [1.5, -0.3, 0.0, 2.0], [0.5, 0.7, 0.0, -1.0]
    rc = torch.tensor(rc_vals, dtype=torch.float64, requires_grad=True)
    rr = torch.tensor(rr_vals, dtype=torch.float64, requires_grad=True)
    loss = bradley_terry_loss(rc, rr)
    loss.backward()
    P = len(rc_vals)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = sum(-math.log(sig(c - r)) for c, r in zip(rc_vals, rr_vals)) / P
    assert loss.item() == pytest.approx(want, rel=1e-12)
    # d/dr_c −log σ(Δ) = −(1 − σ(Δ)) = −σ(−Δ); d/dr_r = +σ(−Δ); each divided by P (the mean)
    assert rc.grad.tolist() == pytest.approx([-sig(r - c) / P for c, r in zip(rc_vals, rr_vals)], rel=1e-12)
    assert rr.grad.tolist() == pytest.approx([sig(r - c) / P for c, r in zip(rc_vals, rr_vals)], rel=1e-12)
    assert loss.item() != pytest.approx(bradley_terry_loss(rr, rc).item())  # the order matters


def test_bt_loss_is_stable_for_large_margins():
    rc, rr = torch.tensor([-200.0, 200.0]), torch.tensor([0.0, 0.0])
    loss = bradley_terry_loss(rc, rr)
    assert float(loss) == pytest.approx(100.0)  # (200 + ~0) / 2, not inf
    assert float(bradley_terry_loss(rc[1:], rr[1:])) == pytest.approx(0.0, abs=1e-30)


def test_pair_wins_counts_ties_as_half():
    assert pair_wins(torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 3.0])).tolist() == [1.0, 0.5, 0.0]


# ----------------------------------------------------------------------------- the score


def test_last_token_index_left_and_right_padding():
    valid = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert last_token_index(valid).tolist() == [2, 4, 4, 1]


def test_score_is_the_head_on_the_last_real_token_for_either_padding():
    rm = _small_rm()
    seqs = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [3, 30, 31, 32, 33]]
    with torch.no_grad():  # reference: each sequence alone, no padding, head on its final hidden state
        want = torch.stack([rm.head(rm.backbone.hidden_states(torch.tensor([s]))[0, -1]).squeeze() for s in seqs])
        right, left = (rm(*pad(seqs, PAD, side)) for side in ("right", "left"))
        other_pad = rm(*pad(seqs, 17, "right"))  # what fills the padding does not matter
        ids, valid = pad(seqs, PAD, "right")
        hidden = rm.backbone.hidden_states(ids, positions=(valid.cumsum(1) - 1).clamp_min(0), key_valid=valid)
        at_end = rm.head(hidden[:, -1]).squeeze(-1)  # what reading position T-1 (a pad) would give
        before_last = rm.head(hidden[torch.arange(3), valid.sum(1) - 2]).squeeze(-1)
    torch.testing.assert_close(right, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other_pad, want, rtol=1e-5, atol=1e-5)
    assert (at_end[1:] - want[1:]).abs().min() > 1e-3  # rows 1, 2 end in padding: not read
    assert (before_last - want).abs().min() > 1e-3  # nor the token before the last


# ----------------------------------------------------------------------------- save and load


def test_save_load_round_trip_gives_identical_scores(tmp_path):
    rm = _small_rm()
    ids, valid = pad([[5, 6, 7], [8, 9, 10, 11, 12]], PAD, "left")
    path = save_reward_model(rm, tmp_path / "rm", extra_files={"note.txt": "hi"})
    back = load_reward_model(path)
    with torch.no_grad():
        assert torch.equal(rm(ids, valid), back(ids, valid))
    assert (path / "model" / "note.txt").read_text() == "hi"
    assert (path / HEAD_FILE).read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    lm = load_checkpoint(path / "model")  # a plain model directory
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), rm.backbone.state_dict().values()))
    (path / HEAD_FILE).unlink()
    with pytest.raises(CheckpointError, match=HEAD_FILE):
        load_reward_model(path)


# ----------------------------------------------------------------------------- training on the tiny world


def test_training_raises_heldout_pair_accuracy_above_chance(tiny_world, tmp_path):
    chat = tiny_world.chat
    train = pair_examples(chat, world_pairs(tiny_world.train[:600], seed=0))
    held_out_pairs = world_pairs(tiny_world.eval, seed=1)  # the world's eval split: no question in train
    held_out = pair_examples(chat, held_out_pairs)
    rm = _small_rm(vocab=chat.vocab_size)
    cfg = RewardModelConfig(steps=30, batch_size=16, lr=3e-3, val_every=30, ckpt_every=30, precision="32", seed=0)
    summary = train_reward_model(rm, train, held_out, cfg, tmp_path / "run", pad_id=chat.pad_id)
    history = summary["val_history"]
    assert [h["step"] for h in history] == [0, 30]  # the untrained accuracy is recorded at step 0
    assert summary["untrained_accuracy"] == history[0]["val_accuracy"]
    assert summary["accuracy"] == history[-1]["val_accuracy"] > 0.6
    assert summary["accuracy"] > summary["untrained_accuracy"] + 0.1
    assert (tmp_path / "run" / "metrics.csv").is_file()
    by_kind = evaluate_pairs(rm, held_out, chat.pad_id, kinds=[p.kind for p in held_out_pairs])["accuracy_by_kind"]
    assert by_kind["bad_format"] > 0.9  # the format is what 30 steps learn; the arithmetic is not


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="reward_model.steps"):
        RewardModelConfig(steps=0)
    with pytest.raises(ValueError, match="reward_model.precision"):
        RewardModelConfig(precision="fp8")


def test_micro_batches_accumulate_to_the_full_batch_gradient():
    rm = _small_rm()
    g = torch.Generator().manual_seed(1)
    pairs = [([int(t) for t in torch.randint(1, 40, (n,), generator=g)], [int(t) for t in torch.randint(1, 40, (m,), generator=g)])
             for n, m in [(5, 7), (3, 4), (6, 2), (8, 8), (4, 6), (2, 3)]]  # fmt: skip

    def grads(batch):
        rm.zero_grad()
        loss = step_loss(rm, PAD, batch, backward=lambda x: x.backward())
        return loss, [p.grad.clone() for p in rm.parameters() if p.grad is not None]

    whole_loss, whole = grads([pairs])
    split_loss, split = grads([pairs[:2], pairs[2:]])  # unequal micro-batches: weighted by pairs
    assert split_loss == pytest.approx(whole_loss, rel=1e-6)
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
