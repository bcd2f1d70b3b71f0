"""Load and save Hugging Face style checkpoints (config.json + safetensors).

Reads plain Llama directories and nemotron-nas (DeciLM) directories, single-file or sharded
(`model.safetensors.index.json`, or several `*.safetensors` without an index). Writes
nemotron-nas for heterogeneous models and plain Llama for homogeneous ones, atomically: the
previous checkpoint at the same path survives a crash mid-save. What neither HF format can
hold (a parallel FFN group with a linear member, a width nemotron-nas cannot express) is
written in the project's own schema: `nemo_plugins_config.json` (arch.config.to_dict) next to
the same safetensors. Only safetensors are read; pickled weights are refused.
"""

from __future__ import annotations

import hashlib
import logging
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..arch.config import ArchConfigError, ModelConfig, from_dict, to_dict
from ..arch.hf_json import from_hf_config, is_plain_llama, nas_compatible, to_hf_config
from ..errors import CheckpointError
from ..utils.atomic import atomic_directory, write_text_atomic
from ..utils.hashing import config_hash
from .llama import HeteroLlamaForCausalLM, rope_inv_freq

log = logging.getLogger("nemo_plugins.checkpoint")

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
NATIVE_CONFIG = "nemo_plugins_config.json"  # the project's own schema
ARCHITECTURES = ("auto", "llama", "nemotron-nas", "nemo_plugins")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def config_file(path: str | os.PathLike) -> Path:
    """The config file `read_config` reads for `path`: the path itself, or for a directory its
    `nemo_plugins_config.json` (the own schema wins) else its `config.json`."""
    path = Path(path)
    if path.is_dir():
        return path / NATIVE_CONFIG if (path / NATIVE_CONFIG).is_file() else path / "config.json"
    return path


def write_config(cfg: ModelConfig, directory: str | os.PathLike) -> Path:
    """Write `cfg` as the config file of a checkpoint directory (HF `config.json` where Llama or
    nemotron-nas can hold it, keeping the HF passthrough keys; else `nemo_plugins_config.json`)
    and return its path; `read_config` reads back the same `ModelConfig`."""
    if choose_architecture(cfg) == "nemo_plugins":
        name, data = NATIVE_CONFIG, to_dict(cfg)
    else:
        name, data = "config.json", to_hf_config(cfg, choose_architecture(cfg))
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def read_config(path: str | os.PathLike) -> ModelConfig:
    """`ModelConfig` from a `config.json` (HF) or `nemo_plugins_config.json` (own schema) file,
    or a directory holding one (the own schema wins when both are there)."""
    cfg_path = config_file(path)
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{cfg_path}: no such file (expected a config.json, a {NATIVE_CONFIG} or a checkpoint directory)"
        )
    try:
        data = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    try:
        return from_dict(data) if cfg_path.name == NATIVE_CONFIG else from_hf_config(data)
    except (ArchConfigError, ValueError, TypeError, KeyError) as e:
        raise ArchConfigError(f"{cfg_path}: {e}") from None


def choose_architecture(cfg: ModelConfig, architecture: str = "auto") -> str:
    """The format a save will use: "auto" is plain Llama for homogeneous models, nemotron-nas
    when it can express the model, and the project's own schema otherwise."""
    if architecture not in ARCHITECTURES:
        raise ArchConfigError(f"architecture={architecture!r}: expected one of {list(ARCHITECTURES)}")
    if architecture != "auto":
        return architecture
    if is_plain_llama(cfg):
        return "llama"
    return "nemotron-nas" if not nas_compatible(cfg) else "nemo_plugins"


def _weight_files(ckpt: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file holding it."""
    index = ckpt / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = {name: ckpt / fname for name, fname in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise CheckpointError(f"{index} names shard {f.name}, which does not exist in {ckpt}")
        return files
    shards = sorted(ckpt.glob("*.safetensors"))
    if not shards:
        pickled = [p.name for p in ckpt.glob("*.bin")] + [p.name for p in ckpt.glob("*.pt")]
        hint = f"; found {pickled}, which are pickled and are not loaded (convert them to safetensors)" if pickled else ""
        raise CheckpointError(f"{ckpt}: no *.safetensors weights{hint}")
    files: dict[str, Path] = {}
    for shard in shards:
        for name in _open(shard).keys():
            if name in files:
                raise CheckpointError(f"tensor {name!r} appears in both {files[name].name} and {shard.name}")
            files[name] = shard
    return files


def _open(shard: Path):
    try:
        return safe_open(str(shard), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{shard}: unreadable safetensors file ({e})") from None


def load_state_dict(ckpt: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (safetensors only)."""
    ckpt = Path(ckpt)
    by_file: dict[Path, list[str]] = {}
    for name, f in _weight_files(ckpt).items():
        by_file.setdefault(f, []).append(name)
    out = {}
    for f, names in by_file.items():
        handle = _open(f)
        available = set(handle.keys())
        for name in names:
            if name not in available:
                raise CheckpointError(f"{f}: index lists tensor {name!r} but the file does not contain it")
            try:
                out[name] = handle.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(f"{f}: cannot read tensor {name!r} ({e})") from None
    return {k: v for k, v in out.items() if not k.endswith(_IGNORED_SUFFIXES)}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape that a checkpoint of `cfg` must hold."""
    with torch.device("meta"):
        model = HeteroLlamaForCausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def check_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Raise `CheckpointError` naming the first missing, unexpected or wrong-shaped tensor."""
    expected = expected_shapes(cfg)
    if cfg.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(
            f"{where}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all), not in the config's architecture"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {tuple(state[name].shape)}, expected {shape} from config.json"
            )
        if state[name].dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"{where}: tensor {name!r} has dtype {str(state[name].dtype).removeprefix('torch.')}, "
                                  f"expected floating-point weights ({', '.join(_DTYPE_NAMES.values())})")  # fmt: skip


def uniform_dtype(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """`state` with one dtype: a checkpoint mixing float dtypes (e.g. fp16 weights with fp32
    norms) is upcast to float32, which holds each of them exactly, with a warning naming them."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, t in state.items():
        by_dtype.setdefault(t.dtype, []).append(name)
    if len(by_dtype) <= 1:
        return state
    found = "; ".join(f"{len(n)} {_DTYPE_NAMES[d]} (e.g. {n[0]})" for d, n in by_dtype.items())
    log.warning("%s: tensors of several dtypes (%s); loading them all as float32", where, found)
    return {k: v.float() for k, v in state.items()}


def load_checkpoint(
    ckpt: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> HeteroLlamaForCausalLM:
    """Build the model described by `ckpt/config.json` and load its safetensors weights."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a directory (expected a checkpoint with config.json and *.safetensors)")
    cfg = read_config(ckpt)
    state = load_state_dict(ckpt)
    check_state_dict(cfg, state, where=str(ckpt))
    state = {k: v.to(dtype) for k, v in state.items()} if dtype is not None else uniform_dtype(state, str(ckpt))
    return model_from_state(cfg, {k: v.to(device) for k, v in state.items()})


def model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> HeteroLlamaForCausalLM:
    """The model of `cfg` holding exactly the tensors of `state` (no random init, no copy).

    Built on the meta device and filled by assignment; a missing or unexpected tensor is an
    error (`lm_head.weight` may be absent when embeddings are tied).
    """
    with torch.device("meta"):
        model = HeteroLlamaForCausalLM(cfg)
    if cfg.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    device = model.model.embed_tokens.weight.device
    model.inv_freq = rope_inv_freq(cfg.kv_channels, cfg.rope_theta, cfg.rope_scaling).to(device)
    return model.eval()


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def save_checkpoint(
    model: HeteroLlamaForCausalLM,
    path: str | os.PathLike,
    *,
    architecture: str = "auto",
    max_shard_bytes: int | None = None,
    extra_files: dict[str, str | bytes] | None = None,
) -> Path:
    """Write `model` as a checkpoint directory (config + safetensors [+ index]) atomically.

    architecture: "llama", "nemotron-nas", "nemo_plugins" (own schema) or "auto" (see
    `choose_architecture`). Shards at `max_shard_bytes` when given. `extra_files` (e.g. the
    tokenizer.json) are written into the same directory.
    """
    if max_shard_bytes is not None and (isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int)
                                        or max_shard_bytes <= 0):  # fmt: skip
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r}: expected a positive number of bytes, or None for one file")
    cfg = model.config
    architecture = choose_architecture(cfg, architecture)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    if architecture == "nemo_plugins":
        config_name, config = NATIVE_CONFIG, to_dict(cfg)
    else:
        config_name, config = "config.json", to_hf_config(cfg, architecture)  # fails before anything is written
        config["torch_dtype"] = _DTYPE_NAMES.get(next(iter(state.values())).dtype, "float32")
        if "dtype" in config:  # carried over from a transformers >= 4.56 config, which reads it first
            config["dtype"] = config["torch_dtype"]
    shards = _shard(state, max_shard_bytes)
    with atomic_directory(path) as tmp:
        (tmp / config_name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_NAME), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(content)
    return Path(path)


def _shard(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [state]
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    return shards


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of named tensors' names, dtypes, shapes and bytes, in name order. Byte-exact, so
    the same on any machine and thread count; a float sum was not: its reduction order, and so
    its last bits, follow the number of threads."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def fingerprint(model: HeteroLlamaForCausalLM) -> str:
    """A short digest of a model's architecture and exact weights (`tensors_digest`): the key that
    runs starting from this model are cached under."""
    return config_hash(to_dict(model.config), tensors_digest(model.state_dict()))
