"""Import a GGUF Llama (llama.cpp's file format) as a Hugging Face Llama checkpoint directory.

`import_gguf` reads the file with the `gguf` package (memory-mapped; nothing is unpickled),
dequantizes every tensor, renames it to the HF Llama layout, undoes the row permutation that
llama.cpp's converter applies to q_proj/k_proj, and writes config.json, model.safetensors,
tokenizer.json, tokenizer_config.json and generation_config.json atomically. The result loads
with `nemo_plugins.model.checkpoint.load_checkpoint` and with transformers' Auto classes.

Scope: `general.architecture == "llama"` (dense, no biases, no MoE), RoPE without scaling or
with Llama-3 scaling (which llama.cpp stores as a `rope_freqs.weight` tensor), and byte-level
BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) with a known `tokenizer.ggml.pre`.
Anything else raises `CheckpointError` naming the field or tensor.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..utils.atomic import atomic_directory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ARCHITECTURE = "llama"
GGUF_MAGIC = b"GGUF"

# GGUF tensor names: token_embd, output_norm and output (absent when the embeddings are tied)
# map to model.embed_tokens, model.norm and lm_head; "blk.{i}.<key>.weight" maps to
# "model.layers.{i}.<value>.weight":
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_ROPE_FREQS = "rope_freqs.weight"  # Llama-3 RoPE scaling, folded into config.json's rope_scaling

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4


# ----------------------------------------------------------------------------- pre-tokenizers
# Facts from llama.cpp's llama-vocab.cpp: each `tokenizer.ggml.pre` value selects a list of
# regexes, applied in turn; every match and every gap between matches becomes a piece (the
# `tokenizers` Split "isolated" behaviour), and the pieces are then byte-level encoded.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")


@dataclass(frozen=True)
class _PreTokenizer:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is itself a vocabulary entry is not split by merges
    add_bos: bool = False  # llama.cpp's default when tokenizer.ggml.add_bos_token is absent
    clean_spaces: bool = True  # decode-time " ." -> "." clean-up


_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {}
for _names, _spec in (
    (("gpt-2", "phi-2", "mpt", "olmo", "roberta-bpe"), _PreTokenizer((_GPT2,))),
    (("starcoder", "refact", "codeshell", "exaone", "minerva-7b"), _PreTokenizer((r"\p{N}", _GPT2))),
    (("smollm", "command-r"), _PreTokenizer((r"\p{N}", _GPT2), clean_spaces=False)),
    (("llama3", "llama-v3", "llama-bpe", "falcon3"), _PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)),
    (("dbrx", "smaug-bpe"), _PreTokenizer((_LLAMA3,))),
    (("qwen2", "megrez"), _PreTokenizer((_QWEN2,), clean_spaces=False)),
    (("stablelm2",), _PreTokenizer((_QWEN2,))),
):
    _PRE_TOKENIZERS.update(dict.fromkeys(_names, _spec))


# ----------------------------------------------------------------------------- reading
_REQUIRED = object()


class _Gguf:
    """A GGUF file's metadata and tensors, with errors that name the file and the field."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file (expected a .gguf model file)")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
        try:
            from gguf import GGUFReader
        except ImportError:
            raise ImportError(
                "importing GGUF files needs the `gguf` package: pip install -c constraints.txt -e '.[gguf]'"
            ) from None
        try:
            self.reader = GGUFReader(str(path))
        except (ValueError, OSError, IndexError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable GGUF file ({type(e).__name__}: {e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default: Any = _REQUIRED, expected: str = "a value") -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise CheckpointError(f"{self.path}: missing GGUF field {key!r} (expected {expected})")
            return default
        return field.contents()

    def uniform(self, key: str, expected: str) -> int:
        """An integer field that llama.cpp may also store per layer; every layer must agree."""
        value = self.get(key, expected=expected)
        if isinstance(value, list):
            if not value or any(v != value[0] for v in value):
                raise CheckpointError(
                    f"{self.path}: {key}={value} differs between layers; only models whose layers are all "
                    "the same can be imported"
                )
            value = value[0]
        return int(value)


def _f32(x: float) -> float:
    """The shortest decimal that reads back as the same float32 (GGUF stores 1e-5 as 9.99999975e-06)."""
    return float(str(np.float32(x)))


# ----------------------------------------------------------------------------- config
def _hf_config(g: _Gguf, dtype: str) -> dict:
    arch = g.get("general.architecture", expected=f"{ARCHITECTURE!r}")
    if arch != ARCHITECTURE:
        raise CheckpointError(
            f"{g.path}: general.architecture={arch!r} is not supported (expected {ARCHITECTURE!r}, a Llama model)"
        )
    p = f"{ARCHITECTURE}."
    if g.get(p + "expert_count", 0):
        raise CheckpointError(
            f"{g.path}: {p}expert_count={g.get(p + 'expert_count')} (a mixture of experts); only dense Llama models "
            "can be imported (expected 0 or absent)"
        )
    hidden = int(g.get(p + "embedding_length", expected="the hidden size"))
    heads = g.uniform(p + "attention.head_count", "the number of query heads")
    kv_heads = heads
    if p + "attention.head_count_kv" in g.reader.fields:
        kv_heads = g.uniform(p + "attention.head_count_kv", "the number of KV heads")
    head_dim = int(g.get(p + "attention.key_length", hidden // heads))
    value_dim = int(g.get(p + "attention.value_length", head_dim))
    rope_dim = int(g.get(p + "rope.dimension_count", head_dim))
    if value_dim != head_dim or rope_dim != head_dim:
        raise CheckpointError(
            f"{g.path}: key_length={head_dim}, value_length={value_dim}, rope.dimension_count={rope_dim}; "
            "a Llama model needs all three equal (full-width RoPE)"
        )
    embed = g.tensors.get("token_embd.weight")
    if embed is None:
        raise CheckpointError(f"{g.path}: missing tensor 'token_embd.weight' (the token embeddings)")
    vocab = int(embed.shape[1])  # GGUF shapes are [columns, rows]
    if int(g.get(p + "vocab_size", vocab)) != vocab:
        raise CheckpointError(
            f"{g.path}: {p}vocab_size={g.get(p + 'vocab_size')} but token_embd.weight has {vocab} rows (expected equal)"
        )
    context = int(g.get(p + "context_length", expected="the context length"))
    theta = _f32(g.get(p + "rope.freq_base", 10000.0))
    rope_type = g.get(p + "rope.scaling.type", "none")
    if rope_type != "none":
        raise CheckpointError(
            f"{g.path}: {p}rope.scaling.type={rope_type!r} is not supported (expected 'none', or Llama-3 scaling "
            f"stored as a {_ROPE_FREQS!r} tensor)"
        )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": g.uniform(p + "feed_forward_length", "the FFN width"),
        "num_hidden_layers": int(g.get(p + "block_count", expected="the number of layers")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": _f32(g.get(p + "attention.layer_norm_rms_epsilon", expected="the RMSNorm epsilon")),
        "rope_theta": theta,
        "rope_scaling": _llama3_rope_scaling(g, head_dim, theta),
        "max_position_embeddings": context,
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "bos_token_id": g.get("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": g.get("tokenizer.ggml.eos_token_id", None),
        "torch_dtype": dtype,
    }
    pad = g.get("tokenizer.ggml.padding_token_id", None)
    if pad is not None:
        config["pad_token_id"] = pad
    return config


def _llama3_rope_scaling(g: _Gguf, head_dim: int, theta: float) -> dict | None:
    """HF `rope_scaling` for a `rope_freqs.weight` tensor, or None when there is none.

    llama.cpp's converter turns HF Llama-3 scaling into per-frequency divisors of the inverse
    frequencies (1 for short wavelengths, `factor` for long ones, smooth in between), using
    low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192 unless the
    model says otherwise. The divisors are matched against those defaults with factor =
    their maximum; anything else is refused rather than guessed.
    """
    t = g.tensors.get(_ROPE_FREQS)
    if t is None:
        return None
    from ..arch.config import RopeScaling
    from .llama import rope_inv_freq

    freqs = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))
    scaling = RopeScaling(factor=_f32(float(freqs.max())))
    base = rope_inv_freq(head_dim, theta, None)
    expected = base / rope_inv_freq(head_dim, theta, scaling)
    if freqs.shape != expected.shape or not torch.allclose(freqs, expected.float(), rtol=1e-4, atol=1e-6):
        raise CheckpointError(
            f"{g.path}: tensor {_ROPE_FREQS!r} holds RoPE frequency factors that are not Llama-3 scaling with "
            f"factor={scaling.factor}, low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192 "
            f"(got {freqs.tolist()[:8]}...; expected {expected.tolist()[:8]}...)"
        )
    return {
        "factor": scaling.factor,
        "low_freq_factor": scaling.low_freq_factor,
        "high_freq_factor": scaling.high_freq_factor,
        "original_max_position_embeddings": scaling.original_max_position_embeddings,
        "rope_type": "llama3",
    }


# ----------------------------------------------------------------------------- weights
def _expected_tensors(cfg: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF tensor name -> (HF name, HF shape [out, in]) for the Llama of `cfg`."""
    h, v, f, d = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    out = {
        "token_embd.weight": ("model.embed_tokens.weight", (v, h)),
        "output_norm.weight": ("model.norm.weight", (h,)),
    }
    if not cfg["tie_word_embeddings"]:
        out["output.weight"] = ("lm_head.weight", (v, h))
    shapes = {
        "attn_norm": (h,), "attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, q),
        "ffn_norm": (h,), "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f),
    }  # fmt: skip
    for i in range(cfg["num_hidden_layers"]):
        for key, hf in _LAYER_TENSORS.items():
            out[f"blk.{i}.{key}.weight"] = (f"model.layers.{i}.{hf}.weight", shapes[key])
    return out


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order.

    Its converter regroups each head's rows from HF's rotate-half layout (first half, second
    half) to interleaved pairs: rows viewed as [heads, 2, head_dim/2] become [heads, head_dim/2, 2].
    Viewing them as [heads, head_dim/2, 2] and swapping the last two axes restores HF's order.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load_weights(g: _Gguf, cfg: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    expected = _expected_tensors(cfg)
    unexpected = sorted(set(g.tensors) - set(expected) - {_ROPE_FREQS})
    if unexpected:
        raise CheckpointError(
            f"{g.path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all); a plain Llama has only "
            "token_embd, output_norm, output and blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,"
            "ffn_gate,ffn_up,ffn_down} weights"
        )
    state = {}
    for name, (hf_name, shape) in expected.items():
        t = g.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{g.path}: missing tensor {name!r} (expected shape {list(shape)} for {hf_name})")
        got = tuple(int(n) for n in reversed(t.shape.tolist()))
        if got != shape:
            raise CheckpointError(
                f"{g.path}: tensor {name!r} has shape {list(got)}, expected {list(shape)} from the metadata"
            )
        try:
            w = dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(
                f"{g.path}: tensor {name!r}: cannot dequantize type {t.tensor_type.name} ({e})"
            ) from None
        w = np.asarray(w, dtype=np.float32).reshape(shape)
        if ".attn_q." in name:
            w = _unpermute_rows(w, cfg["num_attention_heads"])
        elif ".attn_k." in name:
            w = _unpermute_rows(w, cfg["num_key_value_heads"])
        state[hf_name] = torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype).contiguous()
    return state


# ----------------------------------------------------------------------------- tokenizer
def _build_tokenizer(g: _Gguf, cfg: dict):
    """`tokenizers.Tokenizer` and tokenizer_config.json data from the `tokenizer.*` fields."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    model = g.get("tokenizer.ggml.model", expected="'gpt2' (a byte-level BPE vocabulary)")
    if model != "gpt2":
        raise CheckpointError(
            f"{g.path}: tokenizer.ggml.model={model!r} is not supported (expected 'gpt2', a byte-level BPE "
            "vocabulary; SentencePiece 'llama' vocabularies are not implemented)"
        )
    pre_name = g.get("tokenizer.ggml.pre", expected=f"one of {sorted(_PRE_TOKENIZERS)}")
    pre = _PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise CheckpointError(
            f"{g.path}: tokenizer.ggml.pre={pre_name!r} is not a supported pre-tokenizer (expected one of "
            f"{sorted(_PRE_TOKENIZERS)})"
        )
    tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(g.get("tokenizer.ggml.tokens", expected="the token list"))]
    if len(tokens) > cfg["vocab_size"]:
        raise CheckpointError(
            f"{g.path}: tokenizer.ggml.tokens has {len(tokens)} entries but token_embd.weight has only "
            f"{cfg['vocab_size']} rows (expected at most that many tokens)"
        )
    types = g.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in g.get("tokenizer.ggml.merges", expected="the BPE merges")]

    tok = Tokenizer(BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=pre.ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()

    def token(key: str) -> str | None:
        i = g.get(key, None)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    pad, unk = token("tokenizer.ggml.padding_token_id"), token("tokenizer.ggml.unknown_token_id")
    # Control tokens (and the designated bos/eos/pad/unk) are special: matched whole in raw text,
    # never split. User-defined tokens are matched whole too, but are ordinary text.
    special = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
    special += [t for t in (bos, eos, pad, unk) if t is not None and t not in special]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    add_bos = bool(g.get("tokenizer.ggml.add_bos_token", pre.add_bos)) and bos is not None
    add_eos = bool(g.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        head, tail = ([bos] if add_bos else []), ([eos] if add_eos else [])
        tok.post_processor = processors.TemplateProcessing(
            single=[*head, "$A", *tail],
            pair=[*head, "$A", *tail, *head, "$B:1", *tail],
            special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys(head + tail)],
        )

    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": unk,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": pre.clean_spaces,
        "model_max_length": cfg["max_position_embeddings"],
        "chat_template": _chat_template(g),
    }
    return tok, tok_config


def _chat_template(g: _Gguf) -> str | list | None:
    """The default template, or HF's list-of-named-templates form when the file has named ones."""
    default = g.get("tokenizer.chat_template", None)
    names = g.get("tokenizer.chat_templates", [])
    named = [{"name": n, "template": g.get(f"tokenizer.chat_template.{n}")} for n in names
             if f"tokenizer.chat_template.{n}" in g.reader.fields]  # fmt: skip
    if not named:
        return default
    return ([{"name": "default", "template": default}] if default is not None else []) + named


# ----------------------------------------------------------------------------- entry point
def import_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Convert a GGUF Llama file into a Hugging Face Llama checkpoint directory.

    Reads `gguf_path` (llama.cpp's format; F32/F16/BF16 and every quantization that
    `gguf.quants.dequantize` handles, e.g. Q8_0, Q4_0/1, Q5_0/1, K-quants), dequantizes all
    tensors, renames them to the HF Llama layout, undoes llama.cpp's q/k row permutation and
    writes into `out_dir`: config.json (LlamaForCausalLM), model.safetensors in `dtype`
    ("float32", "bfloat16" or "float16"), tokenizer.json, tokenizer_config.json (with the
    chat template) and generation_config.json. Tied embeddings (no `output.weight`) become
    `tie_word_embeddings: true`; Llama-3 RoPE scaling (`rope_freqs.weight`) becomes
    `rope_scaling`.

    The directory is written atomically: on any error the previous contents of `out_dir` are
    left untouched. An existing non-empty `out_dir` is replaced only with `overwrite=True`.
    The whole model is held in memory once, in `dtype`.

    Raises `CheckpointError` for a missing or non-GGUF file, an unsupported architecture,
    tokenizer or RoPE scaling, a missing or mis-shaped tensor, or an output directory that
    exists; the message names the file and the field or tensor. Returns `Path(out_dir)`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {list(DTYPES)}")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise CheckpointError(f"{out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()) and not overwrite:
            raise CheckpointError(
                f"{out_dir}: exists and is not empty (pass overwrite=True / --overwrite to replace it)"
            )
        if gguf_path.resolve().is_relative_to(out_dir.resolve()):
            raise CheckpointError(f"{out_dir}: holds the input {gguf_path.name}, which replacing it would delete")

    g = _Gguf(gguf_path)
    config = _hf_config(g, dtype)
    tokenizer, tok_config = _build_tokenizer(g, config)
    state = _load_weights(g, config, DTYPES[dtype])
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    if "pad_token_id" in config:
        generation["pad_token_id"] = config["pad_token_id"]

    from safetensors.torch import save_file

    def dump(path: Path, data: dict) -> None:
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    with atomic_directory(out_dir) as tmp:
        dump(tmp / "config.json", config)
        dump(tmp / "generation_config.json", generation)
        dump(tmp / "tokenizer_config.json", tok_config)
        tokenizer.save(str(tmp / "tokenizer.json"))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return out_dir

