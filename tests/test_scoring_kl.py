"""Puzzle's scoring KL has the paper's direction, KL(parent || child), checked against
torch.distributions on logits where the two directions differ clearly."""

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from nemo_plugins.arch import ATTENTION_NO_OP, BlockConfig, homogeneous
from nemo_plugins.model import HeteroLlamaForCausalLM
from nemo_plugins.model.metrics import model_metrics, token_metrics

VOCAB = 23


def asymmetric_logits(B=3, T=6, seed=0):
    """A peaked parent and a flatter child: KL(parent || child) and KL(child || parent) differ a lot."""
    g = torch.Generator().manual_seed(seed)
    parent = 4.0 * torch.randn(B, T, VOCAB, generator=g)
    child = 0.5 * torch.randn(B, T, VOCAB, generator=g)
    return parent, child


def expected_kl(parent_logits, child_logits, valid):
    """Mean KL(parent || child) over the positions predicting a counted token."""
    kl = kl_divergence(Categorical(logits=parent_logits[:, :-1]), Categorical(logits=child_logits[:, :-1]))
    pred = valid[:, 1:]
    return float(kl[pred].mean())


def reverse_kl(parent_logits, child_logits, valid):
    kl = kl_divergence(Categorical(logits=child_logits[:, :-1]), Categorical(logits=parent_logits[:, :-1]))
    return float(kl[valid[:, 1:]].mean())


def test_token_metrics_kl_is_parent_to_child():
    parent, child = asymmetric_logits()
    B, T, _ = parent.shape
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, 4:] = False  # padding is not counted
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    hidden = torch.randn(B, T, 8)
    s, n = token_metrics(child, hidden, parent, hidden, ids, valid)["kl_div"]
    want, other = expected_kl(parent, child, valid), reverse_kl(parent, child, valid)
    assert abs(want - other) > 0.5 * max(want, other)  # the directions are far apart here
    assert int(n) == int(valid[:, 1:].sum())
    assert float(s) / int(n) == pytest.approx(want, rel=1e-5)


def test_model_metrics_kl_is_parent_to_child():
    torch.manual_seed(0)
    cfg = homogeneous(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                      intermediate_size=64, rope_theta=10000.0)  # fmt: skip
    parent = HeteroLlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        parent.lm_head.weight.mul_(60.0)  # peaked next-token distributions
    child_cfg = cfg.replace_blocks([cfg.blocks[0], BlockConfig(ATTENTION_NO_OP, cfg.blocks[1].ffn)])
    child = HeteroLlamaForCausalLM(child_cfg).eval()
    child.load_state_dict(parent.state_dict(), strict=False)
    with torch.no_grad():
        child.lm_head.weight.mul_(0.2)  # and a flatter child
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    valid = torch.ones(2, 9, dtype=torch.bool)
    with torch.no_grad():
        p_logits, c_logits = parent(ids), child(ids)
    want, other = expected_kl(p_logits, c_logits, valid), reverse_kl(p_logits, c_logits, valid)
    assert abs(want - other) > 0.5 * max(want, other)
    assert model_metrics(parent, child, [(ids, valid)])["kl_div"] == pytest.approx(want, rel=1e-5)


def test_token_metrics_in_row_chunks_equal_the_whole_batch():
    parent, child = asymmetric_logits()
    B, T, V = parent.shape
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 3:] = False
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(2))
    hidden = torch.randn(B, T, 8)
    whole = token_metrics(child, hidden, parent, hidden, ids, valid)
    by_row = token_metrics(child, hidden, parent, hidden, ids, valid, chunk_elements=1)  # one row at a time
    for m in whole:
        assert float(by_row[m][0]) == pytest.approx(float(whole[m][0]), rel=1e-6) and int(by_row[m][1]) == int(whole[m][1])
    pred = valid[:, 1:]  # independent reference: torch's cross-entropy and argmax on the whole batch
    nll = torch.nn.functional.cross_entropy(child[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none")
    assert float(whole["lm_loss"][0]) == pytest.approx(float(nll[pred.reshape(-1)].sum()), rel=1e-5)
    agree = (parent[:, :-1].argmax(-1) == child[:, :-1].argmax(-1))[pred]
    assert float(whole["greedy_agreement"][0]) == float(agree.sum())
