"""Puzzle child-block initialization: each init checked against its mathematical definition."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nemo_plugins.arch import (
    ATTENTION_LINEAR, ATTENTION_NO_OP, FFN_LINEAR, BlockConfig, ModelConfig, gqa, parallel, swiglu,
)  # fmt: skip
from nemo_plugins.model import HeteroLlamaForCausalLM
from nemo_plugins.model.llama import GQAttention, LinearAttention, LinearFFN, SwiGLU, rope_cos_sin, rope_inv_freq
from nemo_plugins.puzzle.init import (
    capture_sublayer_io,
    collect_ffn_activation_stats,
    ffn_channel_importance,
    kv_head_importance,
    linear_attention_init,
    linear_attention_init_lstsq,
    linear_ffn_init_from_weights,
    linear_ffn_init_lstsq,
    lstsq_weight,
    prune_ffn,
    reduce_kv_heads_importance,
    reduce_kv_heads_mean,
    top_channels,
)

H, HEADS, KV, INTER, VOCAB = 32, 8, 4, 128, 50


def attn_cfg(hidden=H) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, hidden_size=hidden, num_attention_heads=HEADS,
                       blocks=(BlockConfig(gqa(KV), swiglu(INTER)),), rope_theta=10000.0)  # fmt: skip


def hetero_model(seed=0) -> HeteroLlamaForCausalLM:
    """Tiny model covering every sub-block kind: SwiGLU layers get stats, the others must not."""
    blocks = (
        BlockConfig(gqa(KV), swiglu(INTER)),
        BlockConfig(ATTENTION_LINEAR, swiglu(96)),
        BlockConfig(gqa(2), FFN_LINEAR),
        BlockConfig(ATTENTION_NO_OP, parallel(swiglu(32), FFN_LINEAR)),
        BlockConfig(gqa(1), swiglu(64)),
    )
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=HEADS, blocks=blocks, rope_theta=10000.0)
    model = HeteroLlamaForCausalLM(cfg)
    for p in model.parameters():  # larger than the 0.02 init so the SwiGLU nonlinearity matters
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.2)
    return model


def run_attention(attn, x, start=0):
    """Parent attention on x [B, T, h] at positions start.., causal."""
    T = x.shape[1]
    inv = rope_inv_freq(attn.head_dim, 10000.0, None)
    rope = rope_cos_sin(inv, torch.arange(start, start + T)[None], x.dtype)
    return attn(x, rope, (None, T > 1), None, 0)


def swiglu_acts(mlp, x):
    return F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)


# ----------------------------------------------------------------------------- FFN pruning


def test_channel_importance_definition():
    torch.manual_seed(0)
    act, w = torch.rand(INTER), torch.randn(H, INTER)
    expected = torch.tensor([act[j] * torch.sqrt((w[:, j] ** 2).sum()) for j in range(INTER)])
    torch.testing.assert_close(ffn_channel_importance(act, w), expected)
    with pytest.raises(ValueError):
        ffn_channel_importance(act[:-1], w)


def test_top_channels_are_topk_in_original_order():
    torch.manual_seed(0)
    imp = torch.randn(INTER)
    idx = top_channels(imp, 40)
    assert idx.tolist() == sorted(idx.tolist())
    assert set(idx.tolist()) == set(np.argsort(-imp.numpy())[:40].tolist())
    assert imp[idx].min() > imp[~torch.isin(torch.arange(INTER), idx)].max()
    for bad in (0, INTER + 1):
        with pytest.raises(ValueError):
            top_channels(imp, bad)


def test_prune_ffn_equals_parent_with_dropped_channels_zeroed():
    torch.manual_seed(0)
    mlp = SwiGLU(H, INTER).double()
    imp = torch.rand(INTER)
    child = prune_ffn(mlp, 48, imp)
    assert isinstance(child, SwiGLU) and child.down_proj.weight.shape == (H, 48)
    assert child.gate_proj.weight.dtype == torch.float64
    x = torch.randn(3, 7, H, dtype=torch.float64)
    acts = swiglu_acts(mlp, x)
    dropped = torch.ones(INTER, dtype=torch.bool)
    dropped[imp.topk(48).indices] = False
    reference = mlp.down_proj(acts.masked_fill(dropped, 0.0))
    torch.testing.assert_close(child(x), reference, rtol=0, atol=1e-12)
    assert not torch.allclose(child(x), mlp(x))  # it did drop something


def test_prune_ffn_keep_all_is_exact_and_parent_untouched():
    torch.manual_seed(0)
    mlp = SwiGLU(H, INTER)
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    child = prune_ffn(mlp, INTER, torch.rand(INTER))
    x = torch.randn(2, 5, H)
    assert torch.equal(child(x), mlp(x))
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())
    assert child.gate_proj.weight.data_ptr() != mlp.gate_proj.weight.data_ptr()


# ----------------------------------------------------------------------------- KV heads


def test_reduce_kv_mean_same_heads_is_exact():
    torch.manual_seed(0)
    cfg, attn = attn_cfg(), GQAttention(attn_cfg(), KV)
    child = reduce_kv_heads_mean(attn, cfg, KV)
    x = torch.randn(2, 6, H)
    assert child.n_kv == KV and torch.equal(run_attention(child, x), run_attention(attn, x))


def test_reduce_kv_mean_weights_are_group_means():
    torch.manual_seed(0)
    cfg, attn = attn_cfg(), GQAttention(attn_cfg(), KV)
    d = cfg.kv_channels
    for new_kv in (2, 1):
        child = reduce_kv_heads_mean(attn, cfg, new_kv)
        r = KV // new_kv
        assert child.k_proj.weight.shape == (new_kv * d, H)
        for j in range(new_kv):
            for name in ("k_proj", "v_proj"):
                old = getattr(attn, name).weight
                mean = sum(old[(j * r + i) * d : (j * r + i + 1) * d] for i in range(r)) / r
                torch.testing.assert_close(getattr(child, name).weight[j * d : (j + 1) * d], mean)
        assert torch.equal(child.q_proj.weight, attn.q_proj.weight)
        assert torch.equal(child.o_proj.weight, attn.o_proj.weight)


def test_reduce_kv_mean_exact_when_grouped_heads_identical():
    """If the old heads of a group are equal, merging them changes nothing: the query heads each
    new head serves are exactly the union of those its group served (contiguous grouping)."""
    torch.manual_seed(0)
    cfg, attn = attn_cfg(), GQAttention(attn_cfg(), KV).double()
    d = cfg.kv_channels
    with torch.no_grad():
        for name in ("k_proj", "v_proj"):
            w = getattr(attn, name).weight
            w[d : 2 * d] = w[0:d]  # heads 0,1 identical; heads 2,3 identical
            w[3 * d : 4 * d] = w[2 * d : 3 * d]
    child = reduce_kv_heads_mean(attn, cfg, 2)
    x = torch.randn(2, 9, H, dtype=torch.float64)
    torch.testing.assert_close(run_attention(child, x), run_attention(attn, x), rtol=0, atol=1e-12)
    # Merging heads that differ (pairs 0/1 and 2/3 into one) does change the output:
    merged = reduce_kv_heads_mean(attn, cfg, 1)
    assert not torch.allclose(run_attention(merged, x), run_attention(attn, x), atol=1e-6)


def test_reduce_kv_rejects_non_divisors():
    cfg, attn = attn_cfg(), GQAttention(attn_cfg(), KV)
    for bad in (3, 0, 8):
        with pytest.raises(ValueError, match="divisor"):
            reduce_kv_heads_mean(attn, cfg, bad)
        with pytest.raises(ValueError, match="divisor"):
            reduce_kv_heads_importance(attn, cfg, bad, torch.ones(KV))


def test_reduce_kv_importance_copies_best_head_of_each_group():
    torch.manual_seed(0)
    cfg, attn = attn_cfg(), GQAttention(attn_cfg(), KV)
    d = cfg.kv_channels
    imp = torch.tensor([0.1, 0.9, 0.7, 0.2])  # groups of 2: keeps heads 1 and 2
    child = reduce_kv_heads_importance(attn, cfg, 2, imp)
    for j, old in enumerate([1, 2]):
        assert torch.equal(child.k_proj.weight[j * d : (j + 1) * d], attn.k_proj.weight[old * d : (old + 1) * d])
        assert torch.equal(child.v_proj.weight[j * d : (j + 1) * d], attn.v_proj.weight[old * d : (old + 1) * d])
    assert torch.equal(child.q_proj.weight, attn.q_proj.weight)
    assert torch.equal(child.o_proj.weight, attn.o_proj.weight)
    one = reduce_kv_heads_importance(attn, cfg, 1, imp)
    assert torch.equal(one.v_proj.weight, attn.v_proj.weight[d : 2 * d])
    with pytest.raises(ValueError, match="shape"):
        reduce_kv_heads_importance(attn, cfg, 2, torch.ones(KV + 1))


def test_kv_head_importance_matches_brute_force():
    torch.manual_seed(0)
    attn = GQAttention(attn_cfg(), KV)
    d, g = attn.head_dim, HEADS // KV
    x = torch.randn(500, H) * torch.linspace(0.1, 2.0, H)  # anisotropic inputs
    wv, wo = attn.v_proj.weight.detach().double(), attn.o_proj.weight.detach().double()

    def brute(inputs):
        out = []
        for k in range(KV):
            total = 0.0
            for q in range(k * g, (k + 1) * g):
                m = wo[:, q * d : (q + 1) * d] @ wv[k * d : (k + 1) * d]  # [h, h] path through head k
                total += (m**2).sum() if inputs is None else ((inputs.double() @ m.T) ** 2).sum(1).mean()
            out.append(float(total) ** 0.5)
        return torch.tensor(out)

    torch.testing.assert_close(kv_head_importance(attn), brute(None).float())
    torch.testing.assert_close(kv_head_importance(attn, x.T @ x / len(x)), brute(x).float())
    with torch.no_grad():
        attn.v_proj.weight[2 * d : 3 * d] *= 10
    assert kv_head_importance(attn).argmax() == 2


# ----------------------------------------------------------------------------- linear attention


def test_linear_attention_weight_is_o_times_repeated_v():
    torch.manual_seed(0)
    cfg, attn = attn_cfg(), GQAttention(attn_cfg(), KV)
    d, g = cfg.kv_channels, HEADS // KV
    # Independent reference: query head q reads KV head q // g.
    wo, wv = attn.o_proj.weight, attn.v_proj.weight
    reference = sum(wo[:, q * d : (q + 1) * d] @ wv[(q // g) * d : (q // g + 1) * d] for q in range(HEADS))
    lin = linear_attention_init(attn, cfg)
    assert isinstance(lin, LinearAttention)
    torch.testing.assert_close(lin.linear_attn.weight, reference)
    x = torch.randn(4, 1, H)  # one token: it attends only to itself
    for pos in (0, 17):
        torch.testing.assert_close(lin(x, None, None, None, 0), run_attention(attn, x, start=pos), rtol=1e-5, atol=1e-6)


def test_linear_attention_lstsq_recovers_self_attention_map():
    torch.manual_seed(0)
    cfg, attn = attn_cfg(), GQAttention(attn_cfg(), KV)
    x = torch.randn(300, 1, H)
    with torch.no_grad():
        y = run_attention(attn, x)
    lin = linear_attention_init_lstsq(x[:, 0], y[:, 0], cfg)
    expected = linear_attention_init(attn, cfg).linear_attn.weight
    torch.testing.assert_close(lin.linear_attn.weight, expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- linear FFN


def test_lstsq_recovers_exact_linear_map():
    torch.manual_seed(0)
    a, x = torch.randn(H, H), torch.randn(400, H)
    lin = linear_ffn_init_lstsq(x, x @ a.T)
    assert isinstance(lin, LinearFFN)
    torch.testing.assert_close(lin.linear_mlp.weight, a, rtol=0, atol=1e-5)


def test_lstsq_matches_numpy_with_noise_and_ridge_shrinks():
    torch.manual_seed(0)
    x = torch.randn(200, H, dtype=torch.float64)
    y = x @ torch.randn(H, H, dtype=torch.float64).T + 0.5 * torch.randn(200, H, dtype=torch.float64)
    ref = np.linalg.lstsq(x.numpy(), y.numpy(), rcond=None)[0].T
    w = linear_ffn_init_lstsq(x.float(), y.float()).linear_mlp.weight.detach()
    np.testing.assert_allclose(w.numpy(), ref, atol=1e-4)
    # Ridge: closed form of mean||xW^T - y||^2 + ridge||W||^2, and smaller weights.
    lam = 0.3
    closed = np.linalg.solve(x.numpy().T @ x.numpy() / 200 + lam * np.eye(H), x.numpy().T @ y.numpy() / 200).T
    w_ridge = lstsq_weight(x, y, ridge=lam)
    np.testing.assert_allclose(w_ridge.numpy(), closed, atol=1e-5)
    assert w_ridge.norm() < w.norm()
    with pytest.raises(ValueError):
        lstsq_weight(x, y, ridge=-1.0)
    with pytest.raises(ValueError):
        lstsq_weight(x, y[:-1])


def test_linear_ffn_from_weights_is_gate_dropped_swiglu():
    torch.manual_seed(0)
    mlp = SwiGLU(H, INTER)
    lin = linear_ffn_init_from_weights(mlp)
    x = torch.randn(5, H)
    torch.testing.assert_close(lin(x), mlp.down_proj(mlp.up_proj(x)), rtol=1e-5, atol=1e-5)


def test_lstsq_linear_ffn_beats_zero_and_gate_dropped_on_captured_swiglu():
    model = hetero_model()
    torch.manual_seed(1)
    fit, held = torch.randint(0, VOCAB, (64, 32)), torch.randint(0, VOCAB, (16, 32))
    io_fit = capture_sublayer_io(model, [fit], layers=[0])[0]
    io_held = capture_sublayer_io(model, [held], layers=[0])[0]
    mlp = model.model.layers[0].mlp
    lstsq = linear_ffn_init_lstsq(io_fit["ffn_in"], io_fit["ffn_out"])
    dropped = linear_ffn_init_from_weights(mlp)
    with torch.no_grad():
        for io in (io_fit, io_held):
            x, y = io["ffn_in"], io["ffn_out"]
            mse = {name: F.mse_loss(f(x), y).item() for name, f in (("lstsq", lstsq), ("dropped", dropped))}
            zero = y.pow(2).mean().item()
            assert mse["lstsq"] < 0.9 * zero, (mse, zero)
            assert mse["lstsq"] < mse["dropped"], (mse, zero)


# ----------------------------------------------------------------------------- calibration hooks


def manual_stats(model, rows):
    """Reference: walk the layers by hand over (ids [1, T], counted [T]) rows, no hooks."""
    sums, counts = {}, {}
    with torch.no_grad():
        for ids, counted in rows:
            x, rope, mask = model.prepare(ids)
            for i, layer in enumerate(model.model.layers):
                x = layer.attention(x, rope, mask)
                if isinstance(layer.mlp, SwiGLU):
                    a = swiglu_acts(layer.mlp, layer.post_attention_layernorm(x))[0, counted].abs()
                    sums[i] = sums.get(i, 0) + a.double().sum(0)
                    counts[i] = counts.get(i, 0) + a.shape[0]
                x = layer.ffn(x)
    return {i: (sums[i] / counts[i]).float() for i in sums}


def test_collect_ffn_activation_stats_end_to_end():
    model = hetero_model()
    torch.manual_seed(2)
    plain = torch.randint(0, VOCAB, (2, 10))
    right = torch.randint(0, VOCAB, (2, 12))
    right_mask = torch.ones(2, 12, dtype=torch.long)
    right_mask[1, 7:] = 0  # right padding
    left = torch.randint(0, VOCAB, (2, 9))
    attn_mask = torch.ones(2, 9, dtype=torch.long)
    attn_mask[0, :4] = 0  # left padding: hidden from attention, positions restart at the first real token
    loss_mask = torch.ones(2, 9, dtype=torch.long)
    loss_mask[1, :2] = 0
    batches = [plain, (right, right_mask), {"input_ids": left, "attention_mask": attn_mask, "loss_mask": loss_mask}]
    model.train()
    stats = collect_ffn_activation_stats(model, batches)
    assert model.training  # mode restored

    rows = [(plain[b : b + 1], torch.ones(10, dtype=torch.bool)) for b in range(2)]
    rows += [(right[0:1], torch.ones(12, dtype=torch.bool)), (right[1:2, :7], torch.ones(7, dtype=torch.bool))]
    rows += [(left[0:1, 4:], torch.ones(5, dtype=torch.bool)), (left[1:2], loss_mask[1].bool())]  # unpadded rows
    expected = manual_stats(model, rows)

    swiglu_layers = [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, SwiGLU)]
    assert sorted(stats) == swiglu_layers == [0, 1, 4]
    for i in swiglu_layers:
        assert stats[i].shape == (model.model.layers[i].mlp.down_proj.in_features,)
        torch.testing.assert_close(stats[i], expected[i], rtol=1e-5, atol=1e-6)
    for layer in model.model.layers:
        if isinstance(layer.mlp, SwiGLU):
            assert not layer.mlp.down_proj._forward_pre_hooks


def test_hooks_removed_on_error_and_empty_calibration_rejected():
    model = hetero_model()

    def broken():
        yield torch.randint(0, VOCAB, (1, 5))
        raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="died"):
        collect_ffn_activation_stats(model, broken())
    with pytest.raises(RuntimeError, match="died"):
        capture_sublayer_io(model, broken())
    for layer in model.model.layers:
        for m in (layer.self_attn, layer.mlp):
            if m is not None:
                assert not m._forward_hooks and not m._forward_pre_hooks
        if isinstance(layer.mlp, SwiGLU):
            assert not layer.mlp.down_proj._forward_pre_hooks
    with pytest.raises(ValueError, match="no counted tokens"):
        collect_ffn_activation_stats(model, [(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4))])


def test_capture_sublayer_io_matches_manual_forward():
    model = hetero_model()
    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 11))
    mask = torch.ones(2, 11)
    mask[0, 8:] = 0
    io = capture_sublayer_io(model, [(ids, mask)])
    counted = mask.bool()
    with torch.no_grad():
        x, rope, mask_ = model.prepare(ids)
        for i, layer in enumerate(model.model.layers):
            if layer.self_attn is None:
                assert "attn_in" not in io[i]
            else:
                a_in = layer.input_layernorm(x)
                a_out = layer.self_attn(a_in, rope, mask_, None, i)
                torch.testing.assert_close(io[i]["attn_in"], a_in[counted])
                torch.testing.assert_close(io[i]["attn_out"], a_out[counted])
            x = layer.attention(x, rope, mask_)
            f_in = layer.post_attention_layernorm(x)
            torch.testing.assert_close(io[i]["ffn_in"], f_in[counted])
            torch.testing.assert_close(io[i]["ffn_out"], layer.mlp(f_in)[counted])
            x = layer.ffn(x)
    assert io[0]["ffn_in"].shape == (19, 64)
    capped = capture_sublayer_io(model, [ids, ids], layers=[1, 3], max_tokens=30)
    assert sorted(capped) == [1, 3] and capped[1]["ffn_in"].shape == (30, 64)
    c, full = capped[1]["ffn_in"], io[1]["ffn_in"]  # capped run had no mask: row 0 keeps all 11 tokens
    torch.testing.assert_close(c[:8], full[:8])
    torch.testing.assert_close(c[11:22], full[8:19])
    torch.testing.assert_close(c[22:30], c[:8])  # second batch, cut at 30 tokens
