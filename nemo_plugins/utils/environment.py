"""What a run ran on, and a digest of what it wrote: recorded in the run's report.json so that two
runs' figures can be told apart (another machine, thread count, library version or commit)."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from pathlib import Path

import torch


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit(where: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# Environment variables that change which kernels or how many threads torch's CPU ops use, and so
# the low bits of their results (recorded when set).
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "ONEDNN_MAX_CPU_ISA",
                    "MKL_ENABLE_INSTRUCTIONS", "CUBLAS_WORKSPACE_CONFIG")  # fmt: skip


def environment() -> dict:
    """Python, torch (version, threads, the vector ISA its CPU kernels dispatch to, CUDA
    device), the CPU, kernel-selecting environment variables, the package's version and commit."""
    from .. import __version__

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "kernel_env": {k: os.environ[k] for k in KERNEL_VARIABLES if k in os.environ},
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "nemo_plugins": __version__,
        "git_commit": _git_commit(Path(__file__).resolve().parent),
    }


def weights_digest(model_dir: Path) -> str:
    """SHA-256 over a model directory's safetensors files (name and bytes, in name order): equal
    digests mean bit-identical weights."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
