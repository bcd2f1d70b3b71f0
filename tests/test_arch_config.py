"""Architecture schema: HF / megatron-core JSON round trips, validation, export refusals, accounting."""

import copy
import json
import math
from pathlib import Path

import pytest

from nemo_plugins.arch import (
    ATTENTION_LINEAR,
    ATTENTION_NO_OP,
    FFN_LINEAR,
    FFN_NO_OP,
    ArchConfigError,
    AttentionConfig,
    BlockConfig,
    FFNConfig,
    ModelConfig,
    RopeScaling,
    count_params,
    from_dict,
    from_hf_config,
    from_mcore_json,
    gqa,
    homogeneous,
    parallel,
    report,
    swiglu,
    to_dict,
    to_hf_config,
    to_mcore_json,
    validate,
)
from nemo_plugins.arch import accounting
from nemo_plugins.arch.hf_json import ffn_mult_to_intermediate_size, intermediate_size_to_ffn_mult
from nemo_plugins.model import HeteroLlamaForCausalLM

FIXTURES = Path(__file__).parent / "fixtures"
SUPER = FIXTURES / "llama33_nemotron_super_49b_config.json"
ULTRA = FIXTURES / "llama31_nemotron_ultra_253b_config.json"




def load(path: Path) -> dict:
    return json.loads(path.read_text())


def mcore_round_trip(cfg: ModelConfig) -> ModelConfig:
    return from_mcore_json(json.loads(json.dumps(to_mcore_json(cfg))))


def raw_param_count(d: dict) -> int:
    """Parameter count straight from a nemotron-nas config.json, independent of the package."""
    h, heads, vocab = d["hidden_size"], d["num_attention_heads"], d["vocab_size"]
    hd = h // heads
    total = vocab * h * (1 if d.get("tie_word_embeddings") else 2) + h  # embed (+ lm_head) + final norm
    for b in d["block_configs"]:
        a, f = b["attention"], b["ffn"]
        if a["replace_with_linear"]:
            total += h + h * h
        elif not a["no_op"]:
            kv = heads // a["n_heads_in_group"]
            total += h + 2 * h * heads * hd + 2 * h * kv * hd  # norm, q+o, k+v
        if f["replace_with_linear"]:
            total += h + h * h
        elif not f["no_op"]:
            width = int(2 * f["ffn_mult"] * h / 3)
            width = (width + 255) // 256 * 256
            total += h + 3 * h * width  # norm, gate+up+down
    return total


# A small heterogeneous config with every block kind (h=32, 4 heads, head_dim=8, vocab=64).
H, HEADS, HD, V = 32, 4, 8, 64
ALL_KINDS = (
    BlockConfig(gqa(2), swiglu(256)),
    BlockConfig(ATTENTION_LINEAR, FFN_LINEAR),
    BlockConfig(ATTENTION_NO_OP, FFN_NO_OP),
    BlockConfig(gqa(4), FFN_NO_OP),
    BlockConfig(ATTENTION_NO_OP, parallel(swiglu(64), FFN_LINEAR)),
)
# Hand-computed per-layer parameter counts for ALL_KINDS.
ALL_KINDS_LAYER_PARAMS = [
    (H + 2 * H * H + 2 * H * 2 * HD) + (H + 3 * H * 256),  # 3104 + 24608
    (H + H * H) + (H + H * H),  # linear attention + linear FFN
    0,  # nothing at all
    (H + 2 * H * H + 2 * H * 4 * HD) + 0,  # gqa(4), FFN no_op
    0 + (H + 3 * H * 64 + H * H),  # one shared norm + swiglu(64) + linear
]


def tiny(blocks=ALL_KINDS, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=V, hidden_size=H, num_attention_heads=HEADS, blocks=tuple(blocks), **kw)


def tiny_nas_dict() -> dict:
    """A tiny, exportable nemotron-nas config.json dict (3 layers)."""
    cfg = tiny([BlockConfig(gqa(2), swiglu(256)), BlockConfig(ATTENTION_NO_OP, FFN_LINEAR), BlockConfig(ATTENTION_LINEAR, FFN_NO_OP)])
    return to_hf_config(cfg)


# ----------------------------------------------------------------------------- released configs


@pytest.mark.parametrize("path", [SUPER, ULTRA], ids=["super49b", "ultra253b"])
def test_released_config_hf_round_trip_is_exact(path):
    original = load(path)
    cfg = from_hf_config(copy.deepcopy(original))
    exported = to_hf_config(cfg)
    assert exported == original
    assert list(exported["block_configs"]) == original["block_configs"]
    # the float multipliers are written back bit-for-bit, key order aside
    assert [b["ffn"]["ffn_mult"] for b in exported["block_configs"]] == [
        b["ffn"]["ffn_mult"] for b in original["block_configs"]
    ]


@pytest.mark.parametrize("path", [SUPER, ULTRA], ids=["super49b", "ultra253b"])
def test_released_config_mcore_round_trip(path):
    original = load(path)
    cfg = from_hf_config(copy.deepcopy(original))
    back = mcore_round_trip(cfg)
    assert back == cfg
    assert back.passthrough == cfg.passthrough
    assert to_hf_config(back) == original


def test_ultra_keeps_ffn_mult_that_does_not_map_back_from_width():
    original = load(ULTRA)
    cfg = from_hf_config(original)
    assert original["block_configs"][0]["ffn"]["ffn_mult"] == 0.4875
    width = cfg.blocks[0].ffn.intermediate_size
    assert width == 5376
    # The width alone would give a different (simpler) multiplier ...
    assert intermediate_size_to_ffn_mult(width, 16384) != 0.4875
    # ... but the export writes back the released one.
    assert to_hf_config(cfg)["block_configs"][0]["ffn"]["ffn_mult"] == 0.4875
    assert to_mcore_json(cfg)["block_configs"][0]["mlp"]["ffn_mult"] == 0.4875


def test_super_layer_counts():
    cfg = from_hf_config(load(SUPER))
    assert cfg.num_layers == 80
    kinds = [b.attention.kind for b in cfg.blocks]
    assert kinds.count("gqa") == 49
    assert kinds.count("no_op") == 31
    assert {b.attention.num_kv_heads for b in cfg.blocks if b.attention.kind == "gqa"} == {8}
    assert all(b.ffn.kind == "swiglu" for b in cfg.blocks)


def test_ultra_layer_counts():
    cfg = from_hf_config(load(ULTRA))
    assert cfg.num_layers == 162
    assert sum(b.attention.kind == "gqa" for b in cfg.blocks) == 64
    empty = [b for b in cfg.blocks if b.attention.kind == "no_op" and b.ffn.kind == "no_op"]
    assert len(empty) == 81
    assert sum(accounting.block_params(cfg, b) == 0 for b in cfg.blocks) == 81
    assert {b.attention.num_kv_heads for b in cfg.blocks if b.attention.kind == "gqa"} == {8}


@pytest.mark.parametrize(
    "path, expected",
    [(SUPER, 49_867_145_216), (ULTRA, 253_401_268_224)],
    ids=["super49b", "ultra253b"],
)
def test_released_param_counts(path, expected):
    raw = load(path)
    assert raw_param_count(raw) == expected
    cfg = from_hf_config(raw)
    assert count_params(cfg) == expected
    assert report(cfg).params == expected
    # and they are the advertised sizes
    nominal = 49.9e9 if path == SUPER else 253e9
    assert abs(expected - nominal) / nominal < 0.003


def test_super_kv_cache_bytes_per_token():
    cfg = from_hf_config(load(SUPER))
    expected = 49 * 2 * 8 * 128 * 2  # layers * (k, v) * kv heads * head_dim * bf16 bytes
    assert report(cfg, dtype="bf16").kv_cache_bytes_per_token == expected == 200_704
    assert report(cfg, dtype="fp32").kv_cache_bytes_per_token == 2 * expected


# ----------------------------------------------------------------------------- ffn_mult rule


def test_ffn_mult_rule():
    assert ffn_mult_to_intermediate_size(5.25, 8192) == 28672
    assert ffn_mult_to_intermediate_size(4.875, 16384) == 53248
    assert ffn_mult_to_intermediate_size(0.4875, 16384) == 5376  # 5324.8 -> 5324 -> up to 5376
    assert ffn_mult_to_intermediate_size(1.0, 8192) == 5632  # 5461.33 -> 5461 -> up to 5632


@pytest.mark.parametrize("hidden", [32, 4096, 8192, 16384])
def test_intermediate_size_to_ffn_mult_round_trips(hidden):
    for size in range(256, 64 * 256 + 1, 256):
        m = intermediate_size_to_ffn_mult(size, hidden)
        assert m is not None, size
        assert ffn_mult_to_intermediate_size(m, hidden) == size


@pytest.mark.parametrize("size", [1, 100, 255, 257, 300, 28671, 28673])
def test_intermediate_size_not_multiple_of_256_has_no_ffn_mult(size):
    assert intermediate_size_to_ffn_mult(size, 8192) is None


def test_stale_ffn_mult_is_not_exported():
    # ffn_mult says 256 wide at hidden 32 but the block is 512 wide: export follows the width.
    cfg = tiny([BlockConfig(gqa(2), FFNConfig("swiglu", 512, ffn_mult=5.25)), BlockConfig(ATTENTION_NO_OP, swiglu(256))])
    m = to_hf_config(cfg)["block_configs"][0]["ffn"]["ffn_mult"]
    assert m != 5.25
    assert ffn_mult_to_intermediate_size(m, 32) == 512
    assert from_hf_config(to_hf_config(cfg)).blocks[0].ffn.intermediate_size == 512


# ----------------------------------------------------------------------------- megatron-core JSON


def test_mcore_json_block_keys_and_values():
    cfg = tiny([BlockConfig(gqa(2), swiglu(256)), BlockConfig(ATTENTION_LINEAR, FFN_NO_OP), BlockConfig(ATTENTION_NO_OP, FFN_LINEAR)])
    out = to_mcore_json(cfg)
    assert out["num_layers"] == 3 and out["hidden_size"] == H and out["kv_channels"] == HD
    b0, b1, b2 = out["block_configs"]
    for b in out["block_configs"]:
        assert set(b) == {"attention", "mlp"}
        assert set(b["attention"]) == {"no_op", "replace_with_linear", "num_query_groups"}
        assert {"no_op", "replace_with_linear", "ffn_hidden_size"} <= set(b["mlp"])
    assert b0["attention"] == {"no_op": False, "replace_with_linear": False, "num_query_groups": 2}
    assert b0["mlp"]["ffn_hidden_size"] == 256 and b0["mlp"]["no_op"] is False
    assert b1["attention"]["replace_with_linear"] is True and b1["attention"]["no_op"] is False
    assert b1["mlp"]["no_op"] is True
    assert b2["attention"]["no_op"] is True
    assert b2["mlp"]["replace_with_linear"] is True
    assert mcore_round_trip(cfg) == cfg


def test_mcore_json_super_values():
    raw = load(SUPER)
    out = to_mcore_json(from_hf_config(raw))
    assert len(out["block_configs"]) == 80
    for hf_block, block in zip(raw["block_configs"], out["block_configs"]):
        a, m = block["attention"], block["mlp"]
        if hf_block["attention"]["no_op"]:
            assert a["no_op"] is True
        else:
            assert a["num_query_groups"] == 64 // hf_block["attention"]["n_heads_in_group"] == 8
        width = (int(2 * hf_block["ffn"]["ffn_mult"] * 8192 / 3) + 255) // 256 * 256
        assert m["ffn_hidden_size"] == width
        assert m["ffn_hidden_size"] % 256 == 0
    assert out["block_configs"][1]["mlp"]["ffn_hidden_size"] == 28672


def test_mcore_json_rejects_inconsistent_ffn_mult():
    out = json.loads(json.dumps(to_mcore_json(from_hf_config(load(SUPER)))))
    out["block_configs"][3]["mlp"]["ffn_hidden_size"] += 256
    with pytest.raises(ArchConfigError, match=r"block_configs\[3\]\.mlp"):
        from_mcore_json(out)


# ----------------------------------------------------------------------------- export refusals


def test_parallel_ffn_export_refused_for_hf_carried_by_mcore_json():
    cfg = tiny([BlockConfig(gqa(2), swiglu(256)), BlockConfig(gqa(2), parallel(swiglu(256), swiglu(512)))])
    for arch in ("nemotron-nas", "auto"):
        with pytest.raises(ArchConfigError) as e:
            to_hf_config(cfg, arch)
        assert "layers[1]" in str(e.value) and "parallel" in str(e.value)
    # megatron-core JSON carries the group: megatron sees one wide FFN, `members` keeps the group.
    mlp = to_mcore_json(cfg)["block_configs"][1]["mlp"]
    assert mlp["ffn_hidden_size"] == 768 and mlp["no_op"] is False and mlp["replace_with_linear"] is False
    assert [m["ffn_hidden_size"] for m in mlp["members"]] == [256, 512]
    assert mcore_round_trip(cfg) == cfg
    with_linear = tiny([BlockConfig(ATTENTION_NO_OP, parallel(FFN_LINEAR, swiglu(64), swiglu(32)))])
    assert mcore_round_trip(with_linear) == with_linear
    assert mcore_round_trip(tiny()) == tiny()  # ALL_KINDS has a parallel group too
    bad = json.loads(json.dumps(to_mcore_json(cfg)))
    bad["block_configs"][1]["mlp"]["ffn_hidden_size"] = 512
    with pytest.raises(ArchConfigError, match=r"block_configs\[1\]\.mlp\.ffn_hidden_size=512"):
        from_mcore_json(bad)


def test_swiglu_width_not_multiple_of_256_refused_for_nemotron_nas():
    cfg = tiny([BlockConfig(gqa(2), swiglu(256)), BlockConfig(ATTENTION_NO_OP, swiglu(300))])
    with pytest.raises(ArchConfigError) as e:
        to_hf_config(cfg)
    msg = str(e.value)
    assert "layers[1]" in msg and "intermediate_size" in msg and "300" in msg


def test_heterogeneous_refused_as_llama():
    cfg = tiny([BlockConfig(gqa(2), swiglu(256)), BlockConfig(gqa(4), swiglu(256))])
    with pytest.raises(ArchConfigError, match="llama"):
        to_hf_config(cfg, "llama")
    assert to_hf_config(cfg)["architectures"] == ["DeciLMForCausalLM"]


def test_homogeneous_exports_as_llama():
    cfg = homogeneous(vocab_size=V, hidden_size=H, num_layers=2, num_attention_heads=HEADS, num_kv_heads=2, intermediate_size=96)
    out = to_hf_config(cfg)
    assert out["architectures"] == ["LlamaForCausalLM"]
    assert out["num_key_value_heads"] == 2 and out["intermediate_size"] == 96 and out["num_hidden_layers"] == 2
    assert "block_configs" not in out
    assert from_hf_config(out) == cfg


# ----------------------------------------------------------------------------- validation


def _msg(exc_info) -> str:
    return str(exc_info.value)


@pytest.mark.parametrize(
    "blocks, substrings",
    [
        ([BlockConfig(gqa(8), swiglu(64)), BlockConfig(gqa(3), swiglu(64))], ["layers[1].attention.num_kv_heads=3", "8"]),
        ([BlockConfig(gqa(0), swiglu(64))], ["layers[0].attention.num_kv_heads=0"]),
        ([BlockConfig(gqa(8), swiglu(-256))], ["layers[0].ffn.intermediate_size=-256"]),
        ([BlockConfig(gqa(8), swiglu(64)), BlockConfig(gqa(8), swiglu(0))], ["layers[1].ffn.intermediate_size=0"]),
        ([BlockConfig(gqa(8), swiglu(64)), BlockConfig(AttentionConfig("no_op", 2), swiglu(64))],
         ["layers[1].attention.num_kv_heads=2", "no_op"]),
        ([BlockConfig(gqa(8), parallel(swiglu(64)))], ["layers[0].ffn.members", "at least 2", "got 1"]),
        ([BlockConfig(gqa(8), parallel(swiglu(64), FFN_NO_OP))], ["layers[0].ffn.members[1].kind='no_op'"]),
        ([BlockConfig(gqa(8), FFNConfig("linear", 64))], ["layers[0].ffn.intermediate_size=64"]),
    ],
)
def test_validate_rejects_naming_layer_field_value(blocks, substrings):
    cfg = ModelConfig(vocab_size=V, hidden_size=64, num_attention_heads=8, blocks=tuple(blocks))
    with pytest.raises(ArchConfigError) as e:
        validate(cfg)
    for s in substrings:
        assert s in _msg(e), (s, _msg(e))
    # the model refuses the same config
    with pytest.raises(ArchConfigError):
        HeteroLlamaForCausalLM(cfg)


def _tiny_dict() -> dict:
    return to_dict(tiny([BlockConfig(gqa(2), swiglu(64)), BlockConfig(ATTENTION_NO_OP, FFN_LINEAR)]))


@pytest.mark.parametrize(
    "mutate, substrings",
    [
        (lambda d: d.update(num_layers=2), ["model", "num_layers"]),
        (lambda d: d["layers"][1].update(mlp={}), ["layers[1]", "mlp"]),
        (lambda d: d["layers"][0]["attention"].update(heads=4), ["layers[0].attention", "heads"]),
        (lambda d: d["layers"][1]["ffn"].update(width=64), ["layers[1].ffn", "width"]),
        (lambda d: d["layers"][0]["ffn"].update(members=[{"kind": "swiglu", "size": 3}]), ["layers[0].ffn.members[0]", "size"]),
        (lambda d: d["layers"][0]["attention"].update(num_kv_heads=3), ["layers[0].attention.num_kv_heads=3"]),
    ],
)
def test_from_dict_rejects(mutate, substrings):
    d = _tiny_dict()
    from_dict(copy.deepcopy(d))  # the unmodified dict is fine
    mutate(d)
    with pytest.raises(ArchConfigError) as e:
        from_dict(d)
    for s in substrings:
        assert s in _msg(e), (s, _msg(e))


def _set_attn(i, **kw):
    return lambda d: d["block_configs"][i]["attention"].update(**kw)


def _set_ffn(i, **kw):
    return lambda d: d["block_configs"][i]["ffn"].update(**kw)


@pytest.mark.parametrize(
    "mutate, substrings",
    [
        (lambda d: d.update(num_hidden_layers=4), ["block_configs has 3 entries", "num_hidden_layers=4"]),
        (lambda d: d["block_configs"].pop(), ["block_configs has 2 entries", "num_hidden_layers=3"]),
        (_set_attn(0, n_heads_in_group=3), ["block_configs[0].attention.n_heads_in_group=3", "num_attention_heads=4"]),
        (_set_attn(0, n_heads_in_group=0), ["block_configs[0].attention.n_heads_in_group=0"]),
        (_set_attn(1, replace_with_linear=True), ["block_configs[1].attention", "no_op and replace_with_linear"]),
        (_set_ffn(2, replace_with_linear=True), ["block_configs[2].ffn", "no_op and replace_with_linear"]),
        (_set_attn(0, sparsify=["q_proj"]), ["block_configs[0].attention.sparsify=['q_proj']", "not supported"]),
        (_set_attn(0, window_length=4096), ["block_configs[0].attention.window_length=4096", "not supported"]),
        (_set_ffn(0, sparsify=["up_proj"]), ["block_configs[0].ffn.sparsify=['up_proj']"]),
        (_set_ffn(0, ffn_mult=-1.0), ["block_configs[0].ffn.ffn_mult=-1.0"]),
        (_set_attn(0, surprise=1), ["block_configs[0].attention", "surprise"]),
        (lambda d: d.update(hidden_act="gelu"), ["hidden_act='gelu'", "silu"]),
        (lambda d: d.update(attention_bias=True), ["attention_bias=True"]),
    ],
)
def test_from_hf_config_rejects(mutate, substrings):
    d = tiny_nas_dict()
    from_hf_config(copy.deepcopy(d))
    mutate(d)
    with pytest.raises(ArchConfigError) as e:
        from_hf_config(d)
    for s in substrings:
        assert s in _msg(e), (s, _msg(e))


# ----------------------------------------------------------------------------- plain dict schema


def test_from_dict_to_dict_round_trip_heterogeneous():
    cfg = tiny(
        ALL_KINDS + (BlockConfig(ATTENTION_LINEAR, FFNConfig("swiglu", 512, ffn_mult=24.0)),),
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=64),
        tie_word_embeddings=True,
        eos_token_id=[1, 2],
        bos_token_id=0,
        rms_norm_eps=1e-6,
    )
    d = to_dict(cfg)
    assert [layer["attention"]["kind"] for layer in d["layers"]] == ["gqa", "linear", "no_op", "gqa", "no_op", "linear"]
    assert d["layers"][4]["ffn"]["kind"] == "parallel" and len(d["layers"][4]["ffn"]["members"]) == 2
    back = from_dict(json.loads(json.dumps(d)))
    assert back == cfg
    assert back.blocks[5].ffn.ffn_mult == 24.0
    assert to_dict(back) == d


# ----------------------------------------------------------------------------- accounting


def test_accounting_per_layer_params_by_hand():
    cfg = tiny()
    r = report(cfg)
    assert [layer.params for layer in r.layers] == ALL_KINDS_LAYER_PARAMS
    assert ALL_KINDS_LAYER_PARAMS == [27712, 2112, 0, 4128, 7200]
    assert r.block_params == sum(ALL_KINDS_LAYER_PARAMS)
    assert r.non_block_params == 2 * V * H + H
    assert r.params == count_params(cfg) == sum(ALL_KINDS_LAYER_PARAMS) + 2 * V * H + H
    assert [layer.attention for layer in r.layers] == ["gqa(kv=2)", "linear", "no_op", "gqa(kv=4)", "no_op"]

    tied = tiny(tie_word_embeddings=True)
    assert count_params(tied) == count_params(cfg) - V * H
    assert report(tied).non_block_params == V * H + H


def test_accounting_kv_cache_only_for_gqa():
    r = report(tiny(), dtype="bf16")
    assert [layer.kv_cache_bytes_per_token for layer in r.layers] == [2 * 2 * HD * 2, 0, 0, 2 * 4 * HD * 2, 0]
    assert r.kv_cache_bytes_per_token == (2 * 2 * HD + 2 * 4 * HD) * 2
    assert report(tiny(), dtype="fp32").kv_cache_bytes_per_token == 2 * r.kv_cache_bytes_per_token


def test_accounting_decode_flops_grow_only_for_gqa():
    cfg = tiny()
    short, long = report(cfg, seq_len=16), report(cfg, seq_len=48)
    for i, (a, b) in enumerate(zip(short.layers, long.layers)):
        if cfg.blocks[i].attention.kind == "gqa":
            assert b.decode_flops_per_token - a.decode_flops_per_token == 4 * HEADS * HD * (48 - 16)
            assert b.prefill_flops_per_token > a.prefill_flops_per_token
        else:
            assert b.decode_flops_per_token == a.decode_flops_per_token
            assert b.prefill_flops_per_token == a.prefill_flops_per_token
    # layer 0 decode at 16 keys: 2 FLOPs per matrix weight + QK^T/AV
    mat = 2 * H * H + 2 * H * 2 * HD + 3 * H * 256
    assert short.layers[0].decode_flops_per_token == 2 * mat + 4 * HEADS * HD * 16
    assert short.layers[2].decode_flops_per_token == 0
    assert short.decode_flops_per_token == sum(x.decode_flops_per_token for x in short.layers) + 2 * V * H


def test_accounting_memory():
    cfg = tiny()
    r = report(cfg, dtype="bf16", batch_size=3, seq_len=40)
    assert r.weight_bytes == count_params(cfg) * 2
    assert r.kv_cache_bytes == 3 * 40 * r.kv_cache_bytes_per_token
    assert r.memory_bytes == r.weight_bytes + 3 * 40 * r.kv_cache_bytes_per_token
    r32 = report(cfg, dtype="fp32", batch_size=1, seq_len=10)
    assert r32.memory_bytes == count_params(cfg) * 4 + 10 * r32.kv_cache_bytes_per_token
    with pytest.raises(ArchConfigError, match="dtype"):
        report(cfg, dtype="int3")
    with pytest.raises(ArchConfigError, match="seq_len"):
        report(cfg, seq_len=0)


def test_report_to_json():
    cfg = tiny()
    j = json.loads(json.dumps(report(cfg).to_json()))
    assert isinstance(j["totals"]["params"], int) and j["totals"]["params"] == count_params(cfg)
    assert isinstance(j["totals"]["kv_cache_bytes_per_token"], int)
    assert j["totals"]["kv_cache_bytes_per_token"] == report(cfg).kv_cache_bytes_per_token
    assert isinstance(j["layers"], list) and len(j["layers"]) == cfg.num_layers
    assert [layer["params"] for layer in j["layers"]] == ALL_KINDS_LAYER_PARAMS
    assert j["layers"][4]["ffn"] == "parallel[swiglu(64), linear]"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_accounting_matches_real_model(tied):
    cfg = tiny(ALL_KINDS + (BlockConfig(ATTENTION_LINEAR, swiglu(48)),), tie_word_embeddings=tied)
    model = HeteroLlamaForCausalLM(cfg)
    assert model.num_parameters() == count_params(cfg)
    for i, layer in enumerate(model.model.layers):
        assert sum(p.numel() for p in layer.parameters()) == accounting.block_params(cfg, cfg.blocks[i]), i
    assert math.isclose(model.num_parameters(), report(cfg).params)
