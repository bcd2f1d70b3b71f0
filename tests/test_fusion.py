"""FFN Fusion: runs, dependency metric, exact fusion, selection, report, saving, plots."""

import dataclasses
import json
import logging

import pytest
import torch
import torch.nn.functional as F

from nemo_plugins.arch import (
    ATTENTION_LINEAR,
    ATTENTION_NO_OP,
    FFN_LINEAR,
    FFN_NO_OP,
    BlockConfig,
    ModelConfig,
    gqa,
    homogeneous,
    parallel,
    swiglu,
)
from nemo_plugins.arch.hf_json import nas_compatible
from nemo_plugins.fusion import (
    analyze,
    dependency_matrix,
    find_ffn_runs,
    fuse_model,
    fuse_run,
    fusion_report,
    run_fusion,
    save_fused,
    select_runs,
)
from nemo_plugins.fusion.analysis import run_scores
from nemo_plugins.fusion.plots import plot_dependency
from nemo_plugins.model import HeteroLlamaForCausalLM
from nemo_plugins.model.checkpoint import load_checkpoint

V, H, HEADS = 64, 64, 4
G, L, N = gqa(2), ATTENTION_LINEAR, ATTENTION_NO_OP


def cfg_of(*blocks, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=V, hidden_size=H, num_attention_heads=HEADS, blocks=tuple(BlockConfig(a, f) for a, f in blocks), **kw)


# [gqa+ffn, noop+ffn, noop+ffn, gqa+ffn]: one run, layers 0-2
RUN3 = cfg_of((G, swiglu(256)), (N, swiglu(256)), (N, swiglu(256)), (G, swiglu(256)))


def make_model(cfg: ModelConfig, seed: int = 0) -> HeteroLlamaForCausalLM:
    """Random weights large enough for FFNs to matter, and non-trivial norm gains (to test folding)."""
    torch.manual_seed(seed)
    model = HeteroLlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif ".mlp." in name:
                p.normal_(0, 0.15)
    return model.eval()


def batches(seed: int = 1, n: int = 2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, V, (2, 7), generator=g)
        valid = torch.ones(2, 7, dtype=torch.bool)
        valid[1, 5:] = False
        ids[1, 5:] = 0  # right padding
        out.append((ids, valid))
    return out


def parallel_sum(model, run, x):
    """x + Σ_j FFN_j(RMSNorm_j(x)) with the original modules (the reference for fusion)."""
    layers = model.model.layers
    return x + sum(layers[l].mlp(layers[l].post_attention_layernorm(x)) for l in run)


# ----------------------------------------------------------------------------- runs


@pytest.mark.parametrize(
    "blocks, runs",
    [
        ([(G, swiglu(64))] * 3, []),  # plain Llama: attention between every FFN
        ([(G, swiglu(64)), (N, swiglu(64)), (N, swiglu(64)), (G, swiglu(64))], [[0, 1, 2]]),  # the brief's example
        ([(G, swiglu(64)), (N, FFN_NO_OP), (N, swiglu(64))], [[0, 2]]),  # an empty layer does not break a run
        ([(G, swiglu(64)), (L, swiglu(64))], []),  # linear attention breaks it
        ([(G, swiglu(64)), (N, swiglu(64)), (G, swiglu(64)), (N, FFN_LINEAR), (N, swiglu(64))], [[0, 1], [2, 3, 4]]),
        ([(G, FFN_NO_OP), (N, swiglu(64)), (N, swiglu(64))], [[1, 2]]),
        ([(N, swiglu(64)), (N, parallel(swiglu(64), FFN_LINEAR))], [[0, 1]]),  # parallel groups count as one FFN
        ([(G, swiglu(64)), (N, FFN_NO_OP), (G, swiglu(64))], []),
    ],
)
def test_find_ffn_runs(blocks, runs):
    assert find_ffn_runs(cfg_of(*blocks)) == runs


# ----------------------------------------------------------------------------- dependency


def reference_matrix(model, run, data):
    """Brute force: X_0 from the model's own sub-blocks, then the definition, with F.cosine_similarity."""
    layers = model.model.layers
    h = [lambda x, b=layers[l]: b.mlp(b.post_attention_layernorm(x)) for l in run]
    k, sums, count = len(run), torch.zeros(len(run), len(run), dtype=torch.float64), 0
    with torch.no_grad():
        for ids, valid in data:
            x, rope, mask = model.prepare(ids)
            for layer in layers[: run[0]]:
                x = layer(x, rope, mask)
            x = layers[run[0]].attention(x, rope, mask)
            for i in range(k):
                for j in range(i + 1, k):
                    full, skip = x, x
                    for m in range(j):
                        full = full + h[m](full)
                        if m != i:
                            skip = skip + h[m](skip)
                    d = 1 - F.cosine_similarity(h[j](full).double(), h[j](skip).double(), dim=-1)
                    sums[i, j] += d[valid].sum()
            count += int(valid.sum())
    return (sums / count).float()


def test_dependency_matrix_matches_brute_force_and_is_upper_triangular():
    model, data = make_model(RUN3), batches()
    m = dependency_matrix(model, [0, 1, 2], data)
    torch.testing.assert_close(m, reference_matrix(model, [0, 1, 2], data), atol=1e-6, rtol=1e-4)
    assert torch.all(m.tril() == 0)
    assert torch.all(m.triu(1)[torch.triu(torch.ones(3, 3, dtype=torch.bool), 1)] > 1e-6)


def test_dependency_is_zero_for_a_block_without_contribution():
    model = make_model(RUN3)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()  # h_0 == 0: nobody depends on it
    m = dependency_matrix(model, [0, 1, 2], batches())
    assert m[0, 1] < 1e-7 and m[0, 2] < 1e-7
    assert m[1, 2] > 1e-5  # 2 still depends on 1


def test_dependency_counts_only_real_tokens():
    model = make_model(RUN3)
    ids = torch.randint(1, V, (1, 6), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([ids, torch.randint(1, V, (1, 4))], 1)  # garbage after the real tokens
    valid = torch.tensor([[True] * 6 + [False] * 4])
    a = dependency_matrix(model, [0, 1, 2], [(ids, torch.ones(1, 6, dtype=torch.bool))])
    b = dependency_matrix(model, [0, 1, 2], [(padded, valid)])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_dependency_rejects_a_window_crossing_attention():
    with pytest.raises(ValueError, match="layer 3 has gqa attention"):
        dependency_matrix(make_model(RUN3), [2, 3], batches())


# ----------------------------------------------------------------------------- fusion


def test_fused_block_equals_parallel_sum_of_original_ffns():
    model = make_model(RUN3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_run(model, [0, 1, 2])
    b = fused.config.blocks
    assert b[0] == BlockConfig(G, swiglu(768))
    assert b[1] == b[2] == BlockConfig(N, FFN_NO_OP) and b[3] == RUN3.blocks[3]
    assert fused.config.num_layers == 4
    assert torch.equal(fused.model.layers[0].post_attention_layernorm.weight, torch.ones(H))
    x = torch.randn(2, 5, H)
    with torch.no_grad():
        torch.testing.assert_close(fused.model.layers[0].ffn(x), parallel_sum(model, [0, 1, 2], x), atol=1e-5, rtol=1e-5)
        for l in (1, 2):
            assert torch.equal(fused.model.layers[l](x, None, None), x)  # empty layers
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the original is untouched
    assert fused.model.layers[0].mlp.gate_proj.weight.data_ptr() != model.model.layers[0].mlp.gate_proj.weight.data_ptr()


def test_fused_model_equals_original_with_the_run_computed_in_parallel():
    model = make_model(RUN3)
    fused = fuse_run(model, [0, 1, 2])
    ids = batches()[0][0]
    with torch.no_grad():
        x, rope, mask = model.prepare(ids)
        layers = model.model.layers
        x = layers[0].attention(x, rope, mask)
        x = layers[3](parallel_sum(model, [0, 1, 2], x), rope, mask)
        ref = model.lm_head(model.model.norm(x))
        torch.testing.assert_close(fused(ids), ref, atol=1e-5, rtol=1e-5)


def test_run_of_one_is_identity():
    model = make_model(RUN3)
    same = fuse_run(model, [1])
    assert same.config == model.config
    s0, s1 = model.state_dict(), same.state_dict()
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    ids = batches()[0][0]
    with torch.no_grad():
        assert torch.equal(same(ids), model(ids))
    assert fuse_model(model, [[1], [2]]).windows == []


def test_model_without_runs_is_returned_unchanged_with_a_message(caplog):
    cfg = homogeneous(vocab_size=V, hidden_size=H, num_layers=3, num_attention_heads=HEADS, num_kv_heads=2, intermediate_size=64)
    model = make_model(cfg)
    with caplog.at_level(logging.INFO, logger="nemo_plugins.fusion"):
        result = fuse_model(model)
    assert result.model is model and result.windows == [] and result.layers_saved == 0
    assert "no run" in result.message and "unchanged" in result.message
    assert "no run" in caplog.text


@pytest.mark.parametrize(
    "blocks, fused_ffn",
    [
        ([(G, swiglu(64)), (N, FFN_LINEAR), (N, swiglu(32))], parallel(swiglu(96), FFN_LINEAR)),
        ([(G, FFN_LINEAR), (N, FFN_LINEAR)], FFN_LINEAR),
        ([(G, parallel(swiglu(32), FFN_LINEAR)), (N, swiglu(64)), (N, FFN_LINEAR)], parallel(swiglu(96), FFN_LINEAR)),
    ],
    ids=["swiglu+linear", "linear-only", "parallel-member"],
)
def test_fusion_with_linear_members_is_exact(blocks, fused_ffn):
    cfg = cfg_of(*blocks, (G, swiglu(64)))
    run = list(range(len(blocks)))
    model = make_model(cfg)
    fused = fuse_run(model, run)
    assert fused.config.blocks[0].ffn == fused_ffn
    assert all(b.ffn == FFN_NO_OP for b in fused.config.blocks[1 : len(blocks)])
    x = torch.randn(2, 5, H)
    with torch.no_grad():
        torch.testing.assert_close(fused.model.layers[0].ffn(x), parallel_sum(model, run, x), atol=1e-5, rtol=1e-5)


def test_fuse_rejects_bad_windows():
    model = make_model(RUN3)
    with pytest.raises(ValueError, match="layer 3 has gqa attention"):
        fuse_run(model, [2, 3])
    with pytest.raises(ValueError, match="both contain layer 1"):
        fuse_model(model, [[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="strictly increasing"):
        fuse_run(model, [1, 0])


# ----------------------------------------------------------------------------- selection

# a run of 4 at layers 5..8: pairs (0,1) and (2,3) nearly independent, the middle coupled
M4 = [[0, 0.01, 0.3, 0.4], [0, 0, 0.5, 0.2], [0, 0, 0, 0.02], [0, 0, 0, 0]]
ANALYSIS = {"runs": [run_scores([5, 6, 7, 8], torch.tensor(M4)), run_scores([10, 11], torch.tensor([[0, 0.1], [0, 0]]))]}


@pytest.mark.parametrize(
    "threshold, windows",
    [(0.0, []), (0.05, [[5, 6], [7, 8]]), (0.15, [[5, 6], [7, 8], [10, 11]]), (0.5, [[5, 6, 7, 8], [10, 11]])],
)
def test_select_runs_by_threshold(threshold, windows):
    assert select_runs(ANALYSIS, threshold=threshold) == windows


@pytest.mark.parametrize(
    "target, windows",
    [
        (0, []),
        (1, [[5, 6]]),  # lowest dependency: 0.01
        (2, [[5, 6], [7, 8]]),  # then 0.02
        (3, [[5, 6], [7, 8], [10, 11]]),  # 0.1 beats joining the pairs (0.5)
        (4, [[5, 6, 7, 8], [10, 11]]),  # the only move left: join
    ],
)
def test_select_runs_by_target(target, windows):
    got = select_runs(ANALYSIS, target_layers_saved=target)
    assert got == windows
    assert sum(len(w) - 1 for w in got) == target


def test_select_runs_by_target_grows_a_window_when_cheaper_than_a_new_one():
    analysis = {
        "runs": [
            run_scores([0, 1, 2], torch.tensor([[0, 0.01, 0.02], [0, 0, 0.03], [0, 0, 0]])),
            run_scores([5, 6], torch.tensor([[0, 0.5], [0, 0]])),
        ]
    }
    assert select_runs(analysis, target_layers_saved=2) == [[0, 1, 2]]
    assert select_runs(analysis, threshold=0.025) == [[0, 1]]


def test_select_runs_target_beyond_reach_fuses_every_run(caplog):
    with caplog.at_level(logging.WARNING, logger="nemo_plugins.fusion"):
        assert select_runs(ANALYSIS, target_layers_saved=9) == [[5, 6, 7, 8], [10, 11]]
    assert "target_layers_saved=9" in caplog.text


def test_select_runs_errors_and_default():
    assert select_runs(ANALYSIS) == [[5, 6, 7, 8], [10, 11]]
    with pytest.raises(ValueError, match="not both"):
        select_runs(ANALYSIS, threshold=0.1, target_layers_saved=1)
    with pytest.raises(ValueError, match="threshold=-1"):
        select_runs(ANALYSIS, threshold=-1)
    with pytest.raises(ValueError, match="target_layers_saved=1.5"):
        select_runs(ANALYSIS, target_layers_saved=1.5)
    with pytest.raises(ValueError, match="analysis\\['runs'\\]"):
        select_runs({}, threshold=0.1)
# ----------------------------------------------------------------------------- report


REPORT_KEYS = {
    "num_tokens", "max_abs_diff_hidden", "mean_abs_diff_hidden", "max_abs_diff_logits", "mean_abs_diff_logits",
    "kl_div", "layers_saved", "sequential_ffns_before", "sequential_ffns_after", "depth_before", "depth_after",
    "num_layers", "params_before", "params_after",
}  # fmt: skip


def test_fusion_report_measures_the_gap_to_the_sequential_model():
    model, data = make_model(RUN3), batches()
    fused = fuse_run(model, [0, 1, 2])
    rep = fusion_report(model, fused, data)
    assert set(rep) == REPORT_KEYS
    json.dumps(rep)
    assert rep["num_tokens"] == sum(int(v.sum()) for _, v in data) == 24
    assert rep["layers_saved"] == 2 and rep["sequential_ffns_before"] == 4 and rep["sequential_ffns_after"] == 2
    assert rep["depth_before"] - rep["depth_after"] == 2 and rep["num_layers"] == 4
    assert rep["params_before"] - rep["params_after"] == 2 * H  # only the two dropped norm gains
    assert rep["kl_div"] > 0 and rep["max_abs_diff_logits"] > 0 and rep["mean_abs_diff_hidden"] > 0
    assert rep["max_abs_diff_hidden"] >= rep["mean_abs_diff_hidden"]

    with torch.no_grad():  # h_0 = h_1 = 0: sequential == parallel, so fusion is exact for the model too
        for l in (0, 1):
            model.model.layers[l].mlp.down_proj.weight.zero_()
    exact = fusion_report(model, fuse_run(model, [0, 1, 2]), data)
    assert exact["max_abs_diff_logits"] < 1e-5 and exact["kl_div"] < 1e-9


# ----------------------------------------------------------------------------- saving


@pytest.mark.parametrize("tie", [False, True])
def test_nemotron_nas_save_reload_reproduces_logits(tmp_path, tie):
    cfg = dataclasses.replace(RUN3, tie_word_embeddings=tie)
    fused = fuse_run(make_model(cfg), [0, 1, 2])
    assert nas_compatible(fused.config) == []
    info = save_fused(fused, tmp_path / "ckpt", extra_files={"tokenizer.json": "{}"})
    assert info["format"] == "nemotron-nas" and (tmp_path / "ckpt" / "tokenizer.json").is_file()
    hf = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert hf["architectures"] == ["DeciLMForCausalLM"]
    assert hf["block_configs"][1]["ffn"]["no_op"] and hf["block_configs"][1]["attention"]["no_op"]
    back = load_checkpoint(tmp_path / "ckpt")
    assert back.config.blocks[0].ffn.intermediate_size == 768  # the fused width survives ffn_mult
    assert back.config == fused.config
    ids = batches()[0][0]
    with torch.no_grad():
        assert torch.equal(back(ids), fused(ids))


def test_width_nemotron_nas_cannot_express_is_saved_in_the_project_schema(tmp_path):
    cfg = cfg_of((G, swiglu(96)), (N, swiglu(96)), (G, swiglu(96)))
    fused = fuse_run(make_model(cfg), [0, 1])
    assert fused.config.blocks[0].ffn == swiglu(192)
    info = save_fused(fused, tmp_path / "ckpt")
    assert info["format"] == "nemo_plugins" and "192" in info["reasons"][0]
    back = load_checkpoint(tmp_path / "ckpt")
    assert back.config == fused.config
    ids = batches()[0][0]
    with torch.no_grad():
        assert torch.equal(back(ids), fused(ids))


def test_parallel_fusion_result_is_saved_in_the_project_schema(tmp_path):
    cfg = cfg_of((G, swiglu(256)), (N, FFN_LINEAR), (G, swiglu(256)))
    fused = fuse_run(make_model(cfg), [0, 1])
    info = save_fused(fused, tmp_path / "ckpt")
    assert info["format"] == "nemo_plugins" and "parallel" in info["reasons"][0]
    back = load_checkpoint(tmp_path / "ckpt")
    ids = batches()[0][0]
    with torch.no_grad():
        assert torch.equal(back(ids), fused(ids))


# ----------------------------------------------------------------------------- analysis file, plot, end to end


def test_analyze_writes_runs_matrices_and_window_scores(tmp_path):
    cfg = cfg_of((G, swiglu(64)), (N, swiglu(64)), (N, swiglu(64)), (G, swiglu(64)), (N, swiglu(64)))
    model, data = make_model(cfg), batches()
    out = analyze(model, data, tmp_path / "a.json")
    assert json.loads((tmp_path / "a.json").read_text()) == out
    assert [r["layers"] for r in out["runs"]] == [[0, 1, 2], [3, 4]] and out["num_tokens"] == 24
    r0 = out["runs"][0]
    m = torch.tensor(r0["matrix"])
    torch.testing.assert_close(m, dependency_matrix(model, [0, 1, 2], data))
    assert r0["max"] == pytest.approx(float(m.max())) and r0["sum"] == pytest.approx(float(m.sum()))
    assert [w["layers"] for w in r0["windows"]] == [[0, 1], [0, 1, 2], [1, 2]]
    assert r0["windows"][2]["max"] == pytest.approx(float(m[1, 2]))
    png = plot_dependency(out, tmp_path / "dep.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert plot_dependency({"runs": []}, tmp_path / "none.png").read_bytes()[:4] == b"\x89PNG"


def test_run_fusion_end_to_end(tmp_path):
    model = make_model(RUN3)
    rep = run_fusion(model, batches(), tmp_path, target_layers_saved=1)
    assert len(rep["windows"]) == 1 and len(rep["windows"][0]) == 2 and rep["layers_saved"] == 1
    assert rep["checkpoint"]["format"] == "nemotron-nas"
    for name in ("fusion_analysis.json", "report.json", "dependency.png", "model/config.json"):
        assert (tmp_path / name).is_file()
    assert load_checkpoint(tmp_path / "model").config.blocks[rep["windows"][0][0]].ffn == swiglu(512)


def test_fusion_kl_in_row_chunks_equals_the_whole():
    from torch.distributions import Categorical, kl_divergence

    from nemo_plugins.fusion.fuse import _kl_sum

    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(37, 11, generator=g) * 3, torch.randn(37, 11, generator=g)
    want = float(kl_divergence(Categorical(logits=p.double()), Categorical(logits=q.double())).sum())
    assert _kl_sum(p, q, rows=5) == pytest.approx(want, rel=1e-12) and _kl_sum(p, q) == pytest.approx(want, rel=1e-12)
