"""Reference model: parity with transformers, block semantics, KV cache and sampling."""

import pytest
import torch
import transformers

from nemo_plugins.arch import (
    ATTENTION_LINEAR,
    ATTENTION_NO_OP,
    FFN_LINEAR,
    FFN_NO_OP,
    BlockConfig,
    ModelConfig,
    RopeScaling,
    gqa,
    homogeneous,
    parallel,
    swiglu,
    to_hf_config,
)
from nemo_plugins.model import HeteroLlamaForCausalLM
from nemo_plugins.model import generate as generate_mod
from nemo_plugins.model.generate import SamplingConfig, generate, penalize_repeats, sample_next
from nemo_plugins.model.llama import rope_inv_freq

VOCAB = 97


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB, hidden_size=64, num_layers=3, num_attention_heads=8, num_kv_heads=2,
        intermediate_size=160, rope_theta=10000.0, max_position_embeddings=512,
    )  # fmt: skip
    base.update(kw)
    return homogeneous(**base)


def hetero_cfg(tie=False) -> ModelConfig:
    blocks = (
        BlockConfig(gqa(8), swiglu(96)),
        BlockConfig(gqa(2), FFN_LINEAR),
        BlockConfig(ATTENTION_LINEAR, swiglu(32)),
        BlockConfig(ATTENTION_NO_OP, parallel(swiglu(48), swiglu(16), FFN_LINEAR)),
        BlockConfig(gqa(1), FFN_NO_OP),
        BlockConfig(ATTENTION_NO_OP, FFN_NO_OP),
    )
    return ModelConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=8, blocks=blocks,
                       rope_theta=10000.0, tie_word_embeddings=tie)  # fmt: skip


def hf_twin(model: HeteroLlamaForCausalLM) -> transformers.LlamaForCausalLM:
    """transformers' Llama with the same config and weights (the independent reference)."""
    d = {k: v for k, v in to_hf_config(model.config, "llama").items() if k not in ("architectures", "model_type")}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**d, attn_implementation="sdpa")).eval()
    hf.load_state_dict(model.state_dict(), strict=not model.config.tie_word_embeddings)
    return hf


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"tie_word_embeddings": True},
        {"num_kv_heads": 8},
        {"rope_scaling": RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=32)},  # fmt: skip
    ],
    ids=["untied", "tied", "mha", "llama3-rope"],
)
def test_logits_match_transformers(kw):
    torch.manual_seed(0)
    ours = HeteroLlamaForCausalLM(tiny_cfg(**kw)).eval()
    hf = hf_twin(ours)
    x = torch.randint(0, VOCAB, (2, 300))  # long enough for the scaled RoPE band to matter
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff < 1e-5


def test_left_padded_batch_matches_transformers():
    torch.manual_seed(1)
    ours = HeteroLlamaForCausalLM(tiny_cfg()).eval()
    hf = hf_twin(ours)
    x = torch.randint(1, VOCAB, (2, 12))
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, :5] = False  # first sequence is left-padded
    positions = (valid.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        a = ours(x, positions=positions, key_valid=valid)
        b = hf(x, attention_mask=valid.long(), position_ids=positions).logits
    assert (a - b)[valid].abs().max().item() < 1e-5


def test_rope_llama3_scaling_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    hf_cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})  # fmt: skip
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = rope_inv_freq(128, 500000.0, scaling)
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(ours, rope_inv_freq(128, 500000.0, None))


def test_ffn_no_op_is_identity_and_parallel_group_sums_members():
    torch.manual_seed(2)
    model = HeteroLlamaForCausalLM(hetero_cfg()).eval()
    x = torch.randn(2, 5, 64)
    noop_layer = model.model.layers[4]
    assert noop_layer.mlp is None and noop_layer.post_attention_layernorm is None
    assert torch.equal(noop_layer.ffn(x), x)
    empty = model.model.layers[5]
    assert list(empty.parameters()) == []
    assert torch.equal(empty(x, None, (None, True)), x)

    group = model.model.layers[3]
    normed = group.post_attention_layernorm(x)
    expected = x + sum(branch(normed) for branch in group.mlp.branches)
    torch.testing.assert_close(group.ffn(x), expected)
    # each branch is a real, distinct FFN: dropping one changes the output
    partial = x + sum(b(normed) for b in list(group.mlp.branches)[:-1])
    assert not torch.allclose(group.ffn(x), partial)


def test_linear_attention_is_residual_plus_matrix_of_normed_input():
    torch.manual_seed(3)
    model = HeteroLlamaForCausalLM(hetero_cfg()).eval()
    layer = model.model.layers[2]
    x = torch.randn(1, 4, 64)
    W = layer.self_attn.linear_attn.weight
    expected = x + layer.input_layernorm(x) @ W.T
    torch.testing.assert_close(layer.attention(x, None, (None, True)), expected)


def test_attention_no_op_layer_has_no_attention_weights():
    model = HeteroLlamaForCausalLM(hetero_cfg())
    names = [n for n, _ in model.named_parameters() if n.startswith("model.layers.3.")]
    assert names and not any("self_attn" in n or "input_layernorm" in n for n in names)


@pytest.mark.parametrize("tie", [False, True])
def test_kv_cache_decode_matches_full_recompute(tie):
    torch.manual_seed(4)
    model = HeteroLlamaForCausalLM(hetero_cfg(tie)).eval()
    x = torch.randint(0, VOCAB, (3, 20))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(3, 20)
        steps = [model(x[:, :8], cache=cache)]
        for t in range(8, 20):
            steps.append(model(x[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 20
    assert set(cache.k) == {0, 1, 4}  # only GQA layers hold a cache


def test_tied_embeddings_share_storage():
    model = HeteroLlamaForCausalLM(tiny_cfg(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = HeteroLlamaForCausalLM(tiny_cfg())
    assert model.num_parameters() == untied.num_parameters() - VOCAB * 64


def test_greedy_generation_with_and_without_cache_and_padding_agree():
    torch.manual_seed(5)
    model = HeteroLlamaForCausalLM(hetero_cfg()).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    cfg = SamplingConfig(max_new_tokens=10)
    cached = generate(model, prompts, cfg)
    uncached = generate(model, prompts, cfg, use_cache=False)
    alone = [generate(model, [p], cfg)[0] for p in prompts]
    assert cached == uncached == alone
    assert all(len(o) == 10 for o in cached)


def test_rows_to_keep_takes_live_rows_in_whole_blocks_and_only_when_worth_it():
    keep = generate_mod._rows_to_keep
    alive = torch.zeros(64, dtype=torch.bool)
    alive[[3, 20, 41, 63]] = True  # 4 live rows: topped up with the first stopped ones to MIN_ROWS
    rows = keep(alive).tolist()
    assert len(rows) == generate_mod.MIN_ROWS == 16 and {3, 20, 41, 63} <= set(rows) and rows == sorted(rows)
    alive = torch.arange(64) < 54  # 54 live -> 56 rows (a whole number of blocks of 4)
    assert keep(alive).tolist() == list(range(56))
    assert keep(torch.arange(64) < 57) is None  # 60 rows would save less than an eighth
    assert keep(torch.arange(30) < 2) is None  # 30 rows: not whole blocks, keep the batch as it is
    assert keep(torch.arange(16) < 1) is None  # already at the floor
    assert keep(torch.zeros(128, dtype=torch.bool)).tolist() == list(range(16))


@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_p=0.9, repetition_penalty=1.3)],
)
def test_stopped_rows_leave_the_batch_without_changing_any_completion(monkeypatch, sampling):
    """Rows that stopped are no longer computed (the model sees smaller batches), and every row's
    completion is what it is when the whole batch runs to the end."""
    torch.manual_seed(7)
    model = HeteroLlamaForCausalLM(hetero_cfg()).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(2, 9, (48,), generator=g)]
    # With greedy decoding on random weights every row would loop; stop ids common enough to end rows at varied steps.
    free = generate(model, prompts, SamplingConfig(max_new_tokens=40, **sampling), generator=torch.Generator().manual_seed(0))
    stops = tuple(sorted({t for row in free for t in row[2:6]}))[:12]
    cfg = SamplingConfig(max_new_tokens=40, stop_token_ids=stops, **sampling)

    def run():
        seen = []
        hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
        try:
            out = generate(model, prompts, cfg, pad_id=0, generator=torch.Generator().manual_seed(3))
        finally:
            hook.remove()
        return out, seen

    shrunk, sizes = run()
    monkeypatch.setattr(generate_mod, "MIN_ROWS", 10**6)  # never shrink: the reference
    full, full_sizes = run()
    assert set(full_sizes) == {48}
    assert min(sizes) < 48 and all(n % generate_mod.ROW_GRANULE == 0 and n >= 16 for n in sizes)
    lengths = sorted(len(r) for r in full)
    assert lengths[0] < 20 and lengths[-1] > lengths[0] + 10  # rows stop at varied steps
    assert shrunk == full


def test_cache_keep_selects_sequences():
    torch.manual_seed(8)
    model = HeteroLlamaForCausalLM(hetero_cfg()).eval()
    x = torch.randint(0, VOCAB, (6, 9))
    rows = torch.tensor([4, 1, 5])
    with torch.no_grad():
        cache = model.new_cache(6, 9)
        model(x[:, :8], cache=cache)
        cache.keep(rows)
        step = model(x[rows, 8:], cache=cache)
        alone = model(x[rows])
    assert all(t.shape[0] == 3 for t in [*cache.k.values(), *cache.v.values()])
    torch.testing.assert_close(step[:, -1], alone[:, -1], rtol=1e-5, atol=1e-5)


def test_generation_stops_at_stop_token_per_sequence():
    torch.manual_seed(6)
    model = HeteroLlamaForCausalLM(hetero_cfg()).eval()
    prompts = [[1, 2, 3], [4, 5, 6]]
    free = generate(model, prompts, SamplingConfig(max_new_tokens=8))
    stop = free[0][2]  # the third token of sequence 0 becomes a stop token
    out = generate(model, prompts, SamplingConfig(max_new_tokens=8, stop_token_ids=(stop,)))
    first = free[0].index(stop)
    assert out[0] == free[0][: first + 1]
    if stop in free[1]:
        assert out[1] == free[1][: free[1].index(stop) + 1]
    else:
        assert out[1] == free[1]


def test_sampling_temperature_top_p_and_seed():
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    # top_p=0.5: the top token alone holds ~0.67 of the mass -> always chosen
    assert torch.all(sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.5), g) == 0)
    draws = sample_next(logits, SamplingConfig(temperature=1.0, top_p=1.0), g)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.03, rtol=0)
    # top_p=0.9 keeps tokens 0 and 1 only (0.665 + 0.245 >= 0.9), renormalized
    kept = sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.9), g)
    assert set(kept.tolist()) == {0, 1}
    hot = sample_next(logits, SamplingConfig(temperature=5.0), g)
    assert (hot == 0).float().mean() < freq[0] - 0.1  # higher temperature flattens
    a = sample_next(logits[:10], SamplingConfig(temperature=1.0), torch.Generator().manual_seed(7))
    b = sample_next(logits[:10], SamplingConfig(temperature=1.0), torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(sample_next(logits[:3], SamplingConfig()), torch.zeros(3, dtype=torch.long))


def test_bad_sampling_config_rejected():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingConfig(repetition_penalty=0.9)
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingConfig(repetition_penalty=float("inf"))


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0], [2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False], [False, False, False, True]])
    out = penalize_repeats(logits, seen, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5, -3.0], [2.0, -1.0, 0.5, -6.0]]))


def test_repetition_penalty_matches_a_full_recompute_loop_with_transformers_processor():
    """Greedy decoding with a penalty (batched, left-padded, KV cache) equals an independent loop:
    transformers' model on the whole sequence each step and its `RepetitionPenaltyLogitsProcessor`
    over the completion so far (the prompt is not counted, see `SamplingConfig`)."""
    torch.manual_seed(9)
    ours = HeteroLlamaForCausalLM(tiny_cfg(tie_word_embeddings=True)).eval()
    hf = hf_twin(ours)
    penalty = transformers.RepetitionPenaltyLogitsProcessor(1.5)
    prompts = [[5, 6, 7, 5, 6, 7, 8], [11, 12], [13, 14, 13, 14, 15]]
    n = 16
    got = generate(ours, prompts, SamplingConfig(max_new_tokens=n, repetition_penalty=1.5), pad_id=3)
    assert got != generate(ours, prompts, SamplingConfig(max_new_tokens=n), pad_id=3)  # it changes these loops
    for p, row in zip(prompts, got):
        ids, new = list(p), []
        with torch.no_grad():
            for _ in range(n):
                logits = hf(torch.tensor([ids])).logits[:, -1]
                if new:
                    logits = penalty(torch.tensor([new]), logits)
                new.append(int(logits.argmax(-1)))
                ids.append(new[-1])
        assert row == new
