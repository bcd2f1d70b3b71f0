"""One BLD process per local GPU: each trains its share of the library (`bld.shard`).

The parent's weights go to the workers through shared memory (torch.multiprocessing), the
workers write finished variants into the shared library directory, and the caller then finds
every variant on disk. Each worker sees one GPU (CUDA_VISIBLE_DEVICES is narrowed to its own
before CUDA starts), so Lightning's `devices=1` is that GPU. Without GPUs the workers run on
the CPU (used by the tests to check the split).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.multiprocessing as mp

from ..arch.config import ModelConfig
from .library import Variant

log = logging.getLogger("nemo_plugins.puzzle")


def bld_processes(requested: int) -> int:
    """`bld.processes`, with 0 meaning one per visible GPU (1 without a GPU)."""
    return requested or max(1, torch.cuda.device_count())


def _visible_gpu(rank: int) -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return ids[rank]


def _worker(rank: int, world_size: int, use_gpu: bool, parent_cfg: ModelConfig, parent_state: dict, variants: list[Variant],
            examples: list, library_dir: str, cfg, threads: int) -> None:  # fmt: skip
    if use_gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = _visible_gpu(rank)
    else:
        torch.set_num_threads(threads)
    from ..model.checkpoint import model_from_state
    from .shards import train_shard

    device = "cuda" if use_gpu else "cpu"
    parent = model_from_state(parent_cfg, {k: t.to(device) for k, t in parent_state.items()})
    train_shard(parent, variants, examples, library_dir, cfg, rank=rank, world_size=world_size)


def run_bld_processes(parent, variants: list[Variant], examples: list, library_dir, cfg, processes: int) -> None:
    """Train the library with `processes` local workers (blocks until all are done)."""
    use_gpu = torch.cuda.is_available()
    if use_gpu and processes > torch.cuda.device_count():
        raise ValueError(f"puzzle.bld.processes={processes}: only {torch.cuda.device_count()} GPU(s) visible")
    state = {k: t.detach().cpu() for k, t in parent.state_dict().items()}
    threads = max(1, torch.get_num_threads() // processes)
    log.info("BLD: %d processes (%s)", processes, "one GPU each" if use_gpu else "CPU")
    mp.spawn(
        _worker, nprocs=processes, join=True,
        args=(processes, use_gpu, parent.config, state, variants, examples, str(library_dir), cfg, threads),
    )  # fmt: skip
