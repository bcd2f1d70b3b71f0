"""TEST-ONLY shim: run megatron-core / NeMo GPT models on a CPU.

Never imported by the `nemo_plugins` package; tests use it to exercise the megatron-core
model of a Puzzle child without a GPU. `megatron_cpu()` is a context manager that

- starts a gloo process group of world size 1 and megatron's parallel state with TP=1/PP=1
  (unless they are already up), and tears down what it started (`run_cpu_world(fn, n)` does
  the same in n spawned processes with TP=n);
- applies the three CPU patches found for megatron-core 0.16.1 (they also serve 0.12.3, the
  Aligner venv's) and undoes them on exit:
  1. an inference RNG tracker (its `add`/`fork` do not touch CUDA; dropout then uses the CPU
     generator), instead of `tensor_parallel.model_parallel_cuda_manual_seed`;
  2. `torch.cuda.current_device()` returns "cpu" (RotaryEmbedding.get_emb moves `inv_freq` to
     it), only when CUDA is not available;
  3. `fused_softmax.get_default_causal_mask` builds the causal mask on the CPU (megatron hard
     codes device="cuda"; used only when attention_mask is None).

`training_cpu()` adds what a whole NeMo training job (`llm.pretrain` / `finetune` / `distill`
through Lightning and MegatronStrategy) needs on a CPU, all undone on exit: NeMo and
megatron-core create tensors on "cuda" (optimizer scalars, grad-norm buffers, batches via
`.cuda()`, pinned copies), open CUDA streams around DDP setup, check `torch.cuda.is_initialized()`
and `param.type() == 'torch.cuda.FloatTensor'`, and build fine-tuning sample maps with
`torch.cuda.LongTensor`; here "cuda" means the CPU, streams are no-ops and megatron's fused
softmax reports its CUDA kernel unavailable. Use it inside `megatron_cpu()`.

`CPU_OVERRIDES` are the `nemo_config` overrides that keep a model on the CPU in float32
with no fused kernels.
"""

from __future__ import annotations

import contextlib
import os
import socket
from functools import lru_cache

import torch
from torch.overrides import TorchFunctionMode

CPU_OVERRIDES = dict(
    use_cpu_initialization=True,
    params_dtype=torch.float32,
    bf16=False,
    gradient_accumulation_fusion=False,
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    apply_rope_fusion=False,
    persist_layer_norm=False,
    cross_entropy_loss_fusion=False,
)


@lru_cache(maxsize=8)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)  # True = masked out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _process_group(rank: int = 0, world_size: int = 1, port: int | None = None):
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port or _free_port())
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _model_parallel(tensor_model_parallel_size: int = 1):
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        yield
        return
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size, pipeline_model_parallel_size=1
    )
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()


@contextlib.contextmanager
def _cpu_patches():
    import megatron.core.fusions.fused_softmax as fused_softmax
    from megatron.core.tensor_parallel import random as mrandom

    saved_tracker = (mrandom._CUDA_RNG_STATE_TRACKER, mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    saved_device = torch.cuda.current_device
    saved_mask = fused_softmax.get_default_causal_mask
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False  # force_reset=True, which megatron-core 0.12 (Aligner's) lacks
    mrandom.initialize_rng_tracker(inference_rng_tracker=True)
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: "cpu"
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    try:
        yield
    finally:
        fused_softmax.get_default_causal_mask = saved_mask
        torch.cuda.current_device = saved_device
        mrandom._CUDA_RNG_STATE_TRACKER, mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = saved_tracker


@contextlib.contextmanager
def megatron_cpu():
    """Process group + megatron parallel state (TP1/PP1) + CPU patches, all undone on exit."""
    with _process_group(), _model_parallel(), _cpu_patches():
        yield


class _NoStream:
    """torch.cuda.Stream stand-in: every operation is a no-op on a CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass


def _cpu_device(device):
    return "cpu" if device is not None and "cuda" in str(device) else device


class _CudaMeansCpu(TorchFunctionMode):
    """Tensors asked for on "cuda" (device=, .to, .cuda, pin_memory) stay on the CPU, and a CPU
    tensor's .type() reads as its torch.cuda.* name, which megatron's optimizer asserts."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if func is torch.Tensor.to:
            args = tuple(_cpu_device(a) if isinstance(a, (str, torch.device)) else a for a in args)
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and ".cuda." not in out:
            return out.replace("torch.", "torch.cuda.", 1)
        return out


@contextlib.contextmanager
def training_cpu():
    """What a NeMo training job needs on a CPU beyond `megatron_cpu()` (see the module doc)."""
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax

    replace = {
        "Stream": _NoStream, "stream": lambda stream=None: contextlib.nullcontext(),
        "current_stream": lambda *a, **k: _NoStream(), "synchronize": lambda *a, **k: None,
        "is_initialized": lambda: True, "LongTensor": lambda data: torch.tensor(data, dtype=torch.long),
    }  # fmt: skip
    saved = {name: getattr(torch.cuda, name) for name in replace}
    saved_kernel = FusedScaleMaskSoftmax.is_kernel_available
    for name, value in replace.items():
        setattr(torch.cuda, name, value)
    FusedScaleMaskSoftmax.is_kernel_available = lambda self, *args, **kwargs: False
    try:
        with _CudaMeansCpu():
            yield
    finally:
        FusedScaleMaskSoftmax.is_kernel_available = saved_kernel
        for name, value in saved.items():
            setattr(torch.cuda, name, value)


def _world_entry(rank: int, world_size: int, port: int, fn, args: tuple) -> None:
    torch.set_num_threads(1)
    with _process_group(rank, world_size, port), _model_parallel(world_size), _cpu_patches():
        fn(rank, *args)


def run_cpu_world(fn, world_size: int, *args) -> None:
    """Run `fn(rank, *args)` in `world_size` spawned CPU processes that form one gloo world with
    tensor parallelism over all of them (TP=world_size, PP=1) and the CPU patches applied.
    `fn` must be importable (module level); a worker's exception fails the call."""
    import torch.multiprocessing as mp

    mp.spawn(_world_entry, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True)
