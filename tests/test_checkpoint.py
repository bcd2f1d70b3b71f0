"""HF checkpoints: nemotron-nas layout, transformers interop, sharding, errors, atomic saves."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nemo_plugins.model.checkpoint as ckpt_mod
from nemo_plugins.arch import (
    ATTENTION_LINEAR,
    ATTENTION_NO_OP,
    FFN_LINEAR,
    FFN_NO_OP,
    ArchConfigError,
    BlockConfig,
    ModelConfig,
    RopeScaling,
    gqa,
    homogeneous,
    parallel,
    swiglu,
)
from nemo_plugins.model import HeteroLlamaForCausalLM
from nemo_plugins.model.checkpoint import INDEX_NAME, CheckpointError, load_checkpoint, save_checkpoint
from nemo_plugins.utils.atomic import atomic_directory, recover_directory, write_bytes_atomic, write_json_atomic

V, H, HEADS = 64, 32, 4
HETERO_BLOCKS = (
    BlockConfig(gqa(4), swiglu(256)),  # 0: full MHA
    BlockConfig(gqa(1), swiglu(512)),  # 1: one KV head, wider FFN
    BlockConfig(ATTENTION_LINEAR, FFN_LINEAR),  # 2: linear replacements
    BlockConfig(ATTENTION_NO_OP, swiglu(256)),  # 3: attention removed
    BlockConfig(gqa(2), FFN_NO_OP),  # 4: FFN removed
    BlockConfig(ATTENTION_NO_OP, FFN_NO_OP),  # 5: no weights at all
)
GQA_KEYS = {f"self_attn.{p}_proj.weight" for p in "qkvo"} | {"input_layernorm.weight"}
SWIGLU_KEYS = {f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")} | {"post_attention_layernorm.weight"}
EXPECTED_LAYER_KEYS = [
    GQA_KEYS | SWIGLU_KEYS,
    GQA_KEYS | SWIGLU_KEYS,
    {"input_layernorm.weight", "self_attn.linear_attn.weight", "post_attention_layernorm.weight", "mlp.linear_mlp.weight"},
    SWIGLU_KEYS,
    GQA_KEYS,
    set(),
]


def hetero_cfg(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=V, hidden_size=H, num_attention_heads=HEADS, blocks=HETERO_BLOCKS, **kw)


def homo_cfg(**kw) -> ModelConfig:
    return homogeneous(vocab_size=V, hidden_size=H, num_layers=2, num_attention_heads=HEADS, num_kv_heads=2, intermediate_size=48, **kw)


def make_model(cfg: ModelConfig, seed: int = 0) -> HeteroLlamaForCausalLM:
    """A random model whose norms are not all ones (so a mixed-up norm would show)."""
    torch.manual_seed(seed)
    model = HeteroLlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()




IDS = torch.tensor([[1, 5, 9, 2, 33, 63, 0, 17], [4, 4, 8, 15, 16, 23, 42, 7]])


@torch.no_grad()
def logits(model) -> torch.Tensor:
    if hasattr(model, "get_input_embeddings"):  # transformers model
        return model(input_ids=IDS).logits
    return model(IDS)


def tensor_names(d: Path) -> set[str]:
    names = set()
    for f in d.glob("*.safetensors"):
        names |= set(load_file(str(f)))
    return names


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# ----------------------------------------------------------------------------- nemotron-nas round trip


def test_heterogeneous_round_trip(tmp_path):
    model = make_model(hetero_cfg())
    out = save_checkpoint(model, tmp_path / "ck")
    assert out == tmp_path / "ck"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"]
    assert config["model_type"] == "nemotron-nas"
    bcs = config["block_configs"]
    assert len(bcs) == config["num_hidden_layers"] == 6
    assert [b["attention"]["n_heads_in_group"] for b in bcs] == [1, 4, None, None, 2, None]
    assert [b["attention"]["replace_with_linear"] for b in bcs] == [False, False, True, False, False, False]
    assert [b["attention"]["no_op"] for b in bcs] == [False, False, False, True, False, True]
    assert [b["ffn"]["replace_with_linear"] for b in bcs] == [False, False, True, False, False, False]
    assert [b["ffn"]["no_op"] for b in bcs] == [False, False, False, False, True, True]

    names = tensor_names(out)
    for i, expected in enumerate(EXPECTED_LAYER_KEYS):
        prefix = f"model.layers.{i}."
        assert {n[len(prefix):] for n in names if n.startswith(prefix)} == expected, i
    assert "model.layers.2.self_attn.linear_attn.weight" in names
    assert "model.layers.2.mlp.linear_mlp.weight" in names
    assert "model.layers.3.input_layernorm.weight" not in names
    assert not any(n.startswith(("model.layers.4.post_attention_layernorm", "model.layers.4.mlp")) for n in names)
    assert not any(n.startswith("model.layers.5.") for n in names)
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
    # shapes of the per-layer KV heads
    state = load_file(str(out / "model.safetensors"))
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (4 * 8, H)
    assert state["model.layers.1.self_attn.k_proj.weight"].shape == (1 * 8, H)
    assert state["model.layers.4.self_attn.v_proj.weight"].shape == (2 * 8, H)
    assert state["model.layers.1.mlp.up_proj.weight"].shape == (512, H)

    loaded = load_checkpoint(out)
    # same architecture (the loaded config also records the ffn_mult each width was written with)
    assert [(b.attention, b.ffn.kind, b.ffn.intermediate_size) for b in loaded.config.blocks] == [
        (b.attention, b.ffn.kind, b.ffn.intermediate_size) for b in model.config.blocks
    ]
    assert loaded.config.replace_blocks(model.config.blocks) == model.config
    assert torch.equal(logits(loaded), logits(model))
    assert set(loaded.state_dict()) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_bf16_save_records_dtype_and_loads(tmp_path):
    model = make_model(hetero_cfg()).to(torch.bfloat16)
    save_checkpoint(model, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(logits(loaded), logits(model))


# ----------------------------------------------------------------------------- transformers interop

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_homogeneous_saves_as_llama_and_transformers_loads_it(tmp_path, tied):
    cfg = homo_cfg(
        tie_word_embeddings=tied,
        rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=16),
        rope_theta=10000.0,
        max_position_embeddings=128,
    )
    model = make_model(cfg)
    save_checkpoint(model, tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "block_configs" not in config
    assert ("lm_head.weight" in tensor_names(tmp_path / "ck")) is not tied

    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ck", torch_dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings is tied
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(hf), logits(model), atol=1e-5, rtol=0)

    loaded = load_checkpoint(tmp_path / "ck")
    assert torch.equal(logits(loaded), logits(model))
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def _hf_llama(tied: bool):
    torch.manual_seed(1)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=H, intermediate_size=48, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied, rms_norm_eps=1e-5,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_transformers_saved_checkpoint_loads(tmp_path, sharded, tied):
    hf = _hf_llama(tied)
    kw = {"max_shard_size": "10KB"} if sharded else {}
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True, **kw)
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert (INDEX_NAME in files) is sharded
    assert len([f for f in files if f.endswith(".safetensors")]) > (1 if sharded else 0)
    assert not any(f.endswith(".bin") for f in files)

    model = load_checkpoint(tmp_path / "hf")
    assert model.config.num_layers == 2 and model.config.tie_word_embeddings is tied
    assert model.config.blocks[0].attention.num_kv_heads == 2
    torch.testing.assert_close(logits(model), logits(hf), atol=1e-5, rtol=0)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_resaved_transformers_checkpoint_reports_its_new_dtype(tmp_path):
    """transformers >= 4.56 writes `dtype` (and prefers it over `torch_dtype`): a re-save must not leave it stale."""
    _hf_llama(tied=False).save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = load_checkpoint(tmp_path / "hf").to(torch.bfloat16)
    save_checkpoint(model, tmp_path / "bf16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert config.get("dtype", "bfloat16") == "bfloat16"
    assert transformers.LlamaConfig.from_pretrained(tmp_path / "bf16").dtype in (torch.bfloat16, "bfloat16")


# ----------------------------------------------------------------------------- sharding


def test_sharded_save_with_index_and_without(tmp_path):
    model = make_model(hetero_cfg())
    d = save_checkpoint(model, tmp_path / "ck", max_shard_bytes=20_000)
    shards = sorted(p.name for p in d.glob("*.safetensors"))
    assert len(shards) >= 3
    assert "model.safetensors" not in shards
    index = json.loads((d / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for f in shards:  # each shard respects the limit unless it holds a single bigger tensor
        tensors = load_file(str(d / f))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 20_000 or len(tensors) == 1, f
    expected = logits(model)
    assert torch.equal(logits(load_checkpoint(d)), expected)

    (d / INDEX_NAME).unlink()
    assert torch.equal(logits(load_checkpoint(d)), expected)


def test_index_naming_missing_shard(tmp_path):
    d = save_checkpoint(make_model(hetero_cfg()), tmp_path / "ck", max_shard_bytes=20_000)
    victim = sorted(d.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_checkpoint(d)


def test_duplicate_tensor_across_shards_without_index(tmp_path):
    d = save_checkpoint(make_model(hetero_cfg()), tmp_path / "ck")
    t = load_file(str(d / "model.safetensors"))
    save_file({"model.norm.weight": t["model.norm.weight"]}, str(d / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        load_checkpoint(d)


# ----------------------------------------------------------------------------- errors


def _rewrite(d: Path, edit):
    f = d / "model.safetensors"
    state = load_file(str(f))
    edit(state)
    save_file(state, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, substrings",
    [
        (lambda s: s.pop("model.layers.1.self_attn.k_proj.weight"), ["missing", "model.layers.1.self_attn.k_proj.weight"]),
        (lambda s: s.update({"model.layers.5.mlp.up_proj.weight": torch.zeros(256, H)}),
         ["unexpected", "model.layers.5.mlp.up_proj.weight"]),
        (lambda s: s.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(16, H)}),
         ["model.layers.1.self_attn.k_proj.weight", "(16, 32)", "(8, 32)"]),
        (lambda s: s.update({"model.layers.0.mlp.up_proj.weight": s["model.layers.0.mlp.up_proj.weight"].long()}),
         ["model.layers.0.mlp.up_proj.weight", "dtype int64", "expected floating-point weights"]),
    ],
    ids=["missing", "extra", "wrong_shape", "int64"],
)
def test_tensor_mismatch_errors(tmp_path, edit, substrings):
    d = save_checkpoint(make_model(hetero_cfg()), tmp_path / "ck")
    _rewrite(d, edit)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    for s in substrings:
        assert s in str(e.value), (s, str(e.value))


def test_mixed_dtypes_load_as_float32_with_a_warning(tmp_path, caplog):
    """fp16 weights beside fp32 norms are not loaded silently as a model of mixed dtypes: every
    tensor becomes float32 (exact for both) and the warning names the dtypes and a tensor of each."""
    model = make_model(hetero_cfg())
    d = save_checkpoint(model, tmp_path / "ck")
    _rewrite(d, lambda s: s.update({k: v.half() for k, v in s.items() if "mlp" in k}))
    loaded = load_checkpoint(d)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert "several dtypes" in caplog.text and "float16 (e.g. model.layers." in caplog.text
    want = {k: v.half().float() if "mlp" in k else v for k, v in model.state_dict().items()}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in want.items())


def test_max_shard_bytes_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="max_shard_bytes=-1: expected a positive number of bytes"):
        save_checkpoint(make_model(hetero_cfg()), tmp_path / "ck", max_shard_bytes=-1)
    assert not (tmp_path / "ck").exists()


def test_truncated_safetensors(tmp_path):
    d = save_checkpoint(make_model(hetero_cfg()), tmp_path / "ck")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(d)


def test_truncated_shard_with_index(tmp_path):
    d = save_checkpoint(make_model(hetero_cfg()), tmp_path / "ck", max_shard_bytes=20_000)
    f = sorted(d.glob("*.safetensors"))[-1]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f.name):
        load_checkpoint(d)


class _Boom:
    """Unpickling this creates a marker directory (a stand-in for arbitrary code execution)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_weights_are_refused_not_unpickled(tmp_path, monkeypatch):
    d = save_checkpoint(make_model(homo_cfg()), tmp_path / "ck")
    (d / "model.safetensors").unlink()
    marker = tmp_path / "UNPICKLED"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(marker)))

    def forbidden(*a, **k):
        raise AssertionError("pickled weights must not be loaded")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    assert "pytorch_model.bin" in str(e.value)
    assert "safetensors" in str(e.value)
    assert not marker.exists()


def test_missing_config_json(tmp_path):
    d = save_checkpoint(make_model(homo_cfg()), tmp_path / "ck")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(d)


def test_invalid_config_json(tmp_path):
    d = save_checkpoint(make_model(homo_cfg()), tmp_path / "ck")
    (d / "config.json").write_text('{"hidden_size": 32,')
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    assert "config.json" in str(e.value) and "JSON" in str(e.value)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="nothing_here"):
        load_checkpoint(tmp_path / "nothing_here")


# ----------------------------------------------------------------------------- atomic saves


@pytest.mark.parametrize("shard", [None, 20_000], ids=["single", "sharded"])
def test_interrupted_save_keeps_old_checkpoint(tmp_path, monkeypatch, shard):
    model_a = make_model(hetero_cfg(), seed=0)
    model_b = make_model(hetero_cfg(), seed=1)
    d = save_checkpoint(model_a, tmp_path / "ck", max_shard_bytes=shard)
    before = snapshot(d)
    expected = logits(model_a)
    assert not torch.equal(logits(model_b), expected)

    real_save_file = ckpt_mod.save_file
    calls = []

    def failing_save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == (2 if shard else 1):
            # leave a partial file behind, as a crash mid-write would
            Path(filename).write_bytes(b"\x00" * 10)
            raise OSError("disk full (simulated)")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_file", failing_save_file)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(model_b, d, max_shard_bytes=shard)
    assert calls, "save_file was never called"
    assert all(Path(c).parent != d for c in calls), "wrote straight into the live checkpoint"

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary directories left
    assert snapshot(d) == before
    assert torch.equal(logits(load_checkpoint(d)), expected)

    monkeypatch.setattr(ckpt_mod, "save_file", real_save_file)
    save_checkpoint(model_b, d, max_shard_bytes=shard)  # a later save replaces it fully
    assert torch.equal(logits(load_checkpoint(d)), logits(model_b))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_interrupted_first_save_leaves_nothing(tmp_path, monkeypatch):
    def failing(*a, **k):
        raise RuntimeError("crash (simulated)")

    monkeypatch.setattr(ckpt_mod, "save_file", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        save_checkpoint(make_model(hetero_cfg()), tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_export_refusal_writes_nothing(tmp_path):
    blocks = (BlockConfig(gqa(2), swiglu(256)), BlockConfig(gqa(2), parallel(swiglu(256), swiglu(512))))
    fused = make_model(ModelConfig(vocab_size=V, hidden_size=H, num_attention_heads=HEADS, blocks=blocks))

    with pytest.raises(ArchConfigError, match=r"layers\[1\]"):
        save_checkpoint(fused, tmp_path / "new" / "ck", architecture="nemotron-nas")
    assert list(tmp_path.iterdir()) == []

    d = save_checkpoint(make_model(hetero_cfg()), tmp_path / "ck")
    before = snapshot(d)
    with pytest.raises(ArchConfigError, match=r"layers\[1\]"):
        save_checkpoint(fused, d, architecture="nemotron-nas")
    assert snapshot(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]

    with pytest.raises(ArchConfigError):  # heterogeneous as plain Llama
        save_checkpoint(make_model(hetero_cfg()), d, architecture="llama")
    assert snapshot(d) == before


def test_auto_falls_back_to_the_project_schema_and_loads_back(tmp_path):
    blocks = (BlockConfig(gqa(2), swiglu(256)), BlockConfig(gqa(2), parallel(swiglu(256), swiglu(512))))
    cfg = ModelConfig(vocab_size=V, hidden_size=H, num_attention_heads=HEADS, blocks=blocks)
    model = make_model(cfg)
    d = save_checkpoint(model, tmp_path / "ck")
    assert (d / "nemo_plugins_config.json").is_file() and not (d / "config.json").exists()
    back = load_checkpoint(d)
    assert back.config == cfg
    ids = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    (d / "nemo_plugins_config.json").write_text('{"layers": [], "bogus": 1}')
    with pytest.raises(ArchConfigError, match="nemo_plugins_config.json"):
        load_checkpoint(d)


def test_extra_files_are_written(tmp_path):
    d = save_checkpoint(make_model(homo_cfg()), tmp_path / "ck", extra_files={"tokenizer.json": '{"a": 1}', "blob.bin": b"\x00\x01"})
    assert json.loads((d / "tokenizer.json").read_text()) == {"a": 1}
    assert (d / "blob.bin").read_bytes() == b"\x00\x01"


def test_write_json_atomic(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "x.json"
    write_json_atomic(target, {"b": [1, 2], "a": None}, sort_keys=True)
    assert json.loads(target.read_text()) == {"a": None, "b": [1, 2]}
    assert target.read_text().endswith("\n")
    assert target.read_text().index('"a"') < target.read_text().index('"b"')
    write_json_atomic(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 2}
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]

    def crash(fd):
        raise OSError("fsync failed (simulated)")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="simulated"):
        write_json_atomic(target, {"v": 3})
    with pytest.raises(OSError, match="simulated"):
        write_bytes_atomic(target, b"garbage")
    assert json.loads(target.read_text()) == {"v": 2}
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_atomic_directory(tmp_path):
    target = tmp_path / "deep" / "out"
    with atomic_directory(target) as tmp:
        assert tmp.is_dir() and tmp != target and tmp.parent == target.parent
        assert not target.exists()
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"

    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("two")
        assert (target / "a.txt").read_text() == "one"  # old one untouched until the end
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced, not merged

    with pytest.raises(KeyError):
        with atomic_directory(target) as tmp:
            (tmp / "c.txt").write_text("three")
            raise KeyError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]


@pytest.mark.parametrize("failing_rename", [1, 2], ids=["move_old_aside", "move_new_in"])
def test_atomic_directory_failed_swap_keeps_old(tmp_path, monkeypatch, failing_rename):
    """A failure in either rename of the swap restores the old directory and removes the temporary."""
    import nemo_plugins.utils.atomic as atomic_mod

    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "old.txt").write_text("old")

    real_rename = os.rename
    calls = []

    def flaky_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == failing_rename:
            raise OSError("rename failed (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic_mod.os, "rename", flaky_rename)
    monkeypatch.setattr(atomic_mod, "exchange_paths", lambda a, b: False)  # the two-rename fallback
    with pytest.raises(OSError, match="simulated"):
        with atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.setattr(atomic_mod.os, "rename", real_rename)
    assert len(calls) >= failing_rename
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert (target / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_directory_swaps_in_one_exchange_where_linux_can(tmp_path, monkeypatch):
    """With renameat2(RENAME_EXCHANGE) the target never goes missing: no rename runs at all."""
    import nemo_plugins.utils.atomic as atomic_mod

    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "old.txt").write_text("old")
    probe_a, probe_b = tmp_path / "a", tmp_path / "b"
    probe_a.mkdir(), probe_b.mkdir()
    if not atomic_mod.exchange_paths(probe_a, probe_b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this platform or file system")

    def no_rename(src, dst):
        raise AssertionError(f"rename {src} -> {dst}: the exchange should have done it")

    monkeypatch.setattr(atomic_mod.os, "rename", no_rename)
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]


def test_atomic_directory_recovers_from_a_writer_killed_mid_swap(tmp_path):
    """A kill between the fallback's two renames leaves the target missing and its content in
    .old; a kill while saving leaves a .tmp. The next write (or recover_directory) restores the
    previous directory and removes the debris, leaving other names alone."""
    target = tmp_path / "step-00000005"
    (tmp_path / ".step-00000005.k1.old").mkdir()
    (tmp_path / ".step-00000005.k1.old" / "w.txt").write_text("previous")
    (tmp_path / ".step-00000005.k2.tmp").mkdir()
    (tmp_path / ".step-00000005.k2.tmp" / "half.bin").write_bytes(b"x" * 100)
    (tmp_path / ".step-00000006.k3.tmp").mkdir()  # another target's temporary: not ours to remove
    assert recover_directory(target)
    assert (target / "w.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step-00000006.k3.tmp", "step-00000005"]

    (tmp_path / ".step-00000005.k4.tmp").mkdir()
    with atomic_directory(target) as tmp:
        (tmp / "w.txt").write_text("new")
    assert (target / "w.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step-00000006.k3.tmp", "step-00000005"]


def test_atomic_writes_respect_the_umask(tmp_path):
    """Files and directories get 0666 / 0777 less the umask, as open() and mkdir() would, not the
    owner-only modes of mkstemp / mkdtemp (a shared group must read exported models)."""
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "report.json", {"a": 1})
        with atomic_directory(tmp_path / "model") as tmp:
            (tmp / "w.bin").write_bytes(b"1")
        assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755
        os.umask(0o077)
        write_json_atomic(tmp_path / "private.json", {"a": 1})
        assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_fingerprint_is_byte_exact_and_the_same_for_any_thread_count():
    """Runs are cached under the start model's fingerprint, so it must not change with the machine:
    a float64 sum per tensor did (its reduction order follows the thread count; SmolLM2's recovered
    child had two fingerprints, so an SFT run under OMP_NUM_THREADS=1 was not found by one under 2).
    Large embeddings (1M elements), where a sum is split across threads."""
    threads = torch.get_num_threads()
    try:
        for seed in range(5):
            model = make_model(homogeneous(vocab_size=16384, hidden_size=64, num_layers=1, num_attention_heads=4,
                                           num_kv_heads=2, intermediate_size=32), seed=seed)  # fmt: skip
            torch.set_num_threads(1)
            one = ckpt_mod.fingerprint(model)
            torch.set_num_threads(2)
            assert ckpt_mod.fingerprint(model) == one
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():  # one weight one float32 step away is another model
        w = model.lm_head.weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
    assert ckpt_mod.fingerprint(model) != one
    assert ckpt_mod.fingerprint(model.to(torch.bfloat16)) != ckpt_mod.fingerprint(model.float())
