"""Training-state checkpoints that a crashed run resumes from, bit for bit.

One checkpoint is a directory `step-00000042/` holding
- `model.safetensors`: the model's weights (shared tensors such as tied embeddings stored once);
- `state.pt`: step, optimizer and scheduler state, the python/numpy/torch(/CUDA) RNG states and
  a JSON-able `extra` dict (a data sampler's position, metric history, ...), made of tensors and
  plain containers only, so it is read with `torch.load(..., weights_only=True)`: loading a
  checkpoint never runs pickled code.
The directory is written under a temporary name and renamed into place, so a crash mid-save
leaves only complete checkpoints; older ones beyond `keep_last` are pruned after a save.
Reused by the recovery, SFT and GRPO loops.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from ..errors import CheckpointError
from .atomic import atomic_directory, recover_directory

MODEL_NAME = "model.safetensors"
STATE_NAME = "state.pt"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_SAVE_DEBRIS = re.compile(r"^\.(step-\d+)\..+\.(tmp|old)$")  # atomic_directory's temporaries


@dataclass
class TrainingState:
    """What `load_training_state` read; `optimizer`/`scheduler` are state dicts for callers
    that build those objects later (e.g. in a Lightning `configure_optimizers`)."""

    path: Path
    step: int
    extra: dict = field(default_factory=dict)
    optimizer: dict | None = None
    scheduler: dict | None = None
    rng: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict:
    """python, numpy, torch CPU (and CUDA) RNG states as tensors and plain containers."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state` (CUDA states only when CUDA is up with as many devices)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- listing


def step_dir(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}"


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under `directory`, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_NAME).is_file() and (p / MODEL_NAME).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `directory`, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def clean_checkpoint_debris(directory: str | os.PathLike) -> list[str]:
    """Remove what saves killed midway left under `directory` (full-size `.step-*.tmp`
    temporaries, `.old` copies, `step-*` directories without their two files), restoring a
    checkpoint a kill left only in `.old`; returns the names removed. Run before a resume."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    before = {p.name for p in directory.iterdir()}
    for name in before:
        m = _SAVE_DEBRIS.match(name)
        if m:
            recover_directory(directory / m.group(1))
    complete = {p.name for p in list_checkpoints(directory)}
    for p in directory.iterdir():
        if _STEP_DIR.match(p.name) and p.is_dir() and p.name not in complete:
            shutil.rmtree(p, ignore_errors=True)
    return sorted(before - {p.name for p in directory.iterdir()})


# ----------------------------------------------------------------------------- save


def _unwrap(optimizer):
    """The torch optimizer behind a Lightning `LightningOptimizer` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer) if optimizer is not None else None


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_training_state(
    directory: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    extra: dict | None = None,
    *,
    keep_last: int = 3,
) -> Path:
    """Write checkpoint `step` under `directory` atomically and prune all but the newest
    `keep_last` (0 keeps all). `extra` must be JSON-serializable. Returns its directory."""
    if keep_last < 0:
        raise ValueError(f"keep_last={keep_last}: expected >= 0 (0 keeps every checkpoint)")
    try:
        extra_json = json.dumps(extra or {}, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra: not JSON-serializable ({e})") from None
    optimizer = _unwrap(optimizer)
    state = {
        "format": FORMAT_VERSION,
        "step": int(step),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng_state(),
        "extra_json": extra_json,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    target = step_dir(directory, step)
    with atomic_directory(target) as tmp:
        save_model(model, str(tmp / MODEL_NAME), metadata={"step": str(step)})
        with open(tmp / MODEL_NAME, "rb+") as f:
            os.fsync(f.fileno())
        _write_synced(tmp / STATE_NAME, buffer.getvalue())
    if keep_last:
        for old in list_checkpoints(directory)[:-keep_last]:
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- load


def _read_state(path: Path) -> dict:
    file = path / STATE_NAME
    if not file.is_file():
        raise CheckpointError(f"{file}: missing training-state file (not a checkpoint written by save_training_state?)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, refused global, ...: all mean "cannot use this file"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{file}: unreadable training state ({type(e).__name__}: {first}); "
            "it is loaded with torch.load(weights_only=True), which refuses arbitrary pickled objects"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "extra_json" not in state:
        raise CheckpointError(f"{file}: not a training state (expected a dict with 'step' and 'extra_json')")
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format {state.get('format')!r}, this version reads {FORMAT_VERSION}")
    return state


def _load_weights(path: Path, model: torch.nn.Module) -> None:
    file = path / MODEL_NAME
    if not file.is_file():
        raise CheckpointError(f"{file}: missing model weights")
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    device = device.index if device.type == "cuda" else str(device)
    try:
        load_model(model, str(file), strict=True, device=device)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot load model weights ({e})") from None


def load_training_state(
    path: str | os.PathLike,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    *,
    restore_rng: bool = True,
) -> TrainingState:
    """Read checkpoint `path` (a `step-*` directory), load it into whichever of model,
    optimizer and scheduler are given, restore the RNG states (unless told not to), and
    return everything read (state dicts included, for objects built later)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    state = _read_state(path)
    if model is not None:
        _load_weights(path, model)
    optimizer = _unwrap(optimizer)
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is None:
            continue
        if state[name] is None:
            raise CheckpointError(f"{path / STATE_NAME}: holds no {name} state to load")
        obj.load_state_dict(state[name])
    if restore_rng:
        restore_rng_state(state["rng"])
    return TrainingState(
        path=path, step=state["step"], extra=json.loads(state["extra_json"]),
        optimizer=state["optimizer"], scheduler=state["scheduler"], rng=state["rng"],
    )  # fmt: skip
