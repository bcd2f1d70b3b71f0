"""Checkpoint IO for the HF importer and exporter that needs no CUDA and no helper process.

NeMo's `MegatronCheckpointIO` (NeMo 2.7.3, megatron-core 0.16.1) needs CUDA even for a
synchronous save or load on a CPU trainer, and saving starts helper processes:

- saving: megatron's torch_dist strategy runs every save as an async request executed in
  place: its staging step calls `torch.cuda.synchronize()`, its finalize step broadcasts a
  tensor on `torch.cuda.current_device()`, and its writer keeps its results in a
  `multiprocessing.Manager` started with "spawn" (which re-imports the main script: a script
  without a main guard runs its conversion again in that process and hangs);
- loading: `MegatronCheckpointIO.load_checkpoint` asserts `torch.cuda.is_initialized()` after
  every load (`_fix_tensors_device`).

`HostCheckpointIO` saves the same torch_dist checkpoint (megatron's state-dict translation and
save planner, `metadata.json` and `common.pt` as usual) with torch's own synchronous
`FileSystemWriter` in this process, and loads with `dist_checkpointing.load` and nothing after
it. A conversion holds its weights on the host anyway (CPU trainer), on a GPU machine too, so the
connectors always use it; training jobs keep NeMo's own IO.
"""

from __future__ import annotations

from . import require_nemo

require_nemo("megatron.core.dist_checkpointing")

from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy  # noqa: E402
from nemo.lightning.io.pl import MegatronCheckpointIO  # noqa: E402


class HostSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron's torch_dist format, written synchronously in this process by torch's own
    `FileSystemWriter`: no CUDA call, no helper process."""

    def async_save(self, sharded_state_dict, checkpoint_dir):
        raise NotImplementedError("HostSaveStrategy saves synchronously only (use save)")

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        from megatron.core.dist_checkpointing.strategies.torch import (
            MCoreSavePlanner,
            _replace_state_dict_keys_with_sharded_keys,
            mcore_to_pyt_state_dict,
        )
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint import save as dcp_save

        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
        state = mcore_to_pyt_state_dict(by_key, False)
        planner = MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False)
        dcp_save(state, storage_writer=FileSystemWriter(str(checkpoint_dir), thread_count=1), planner=planner)


class HostCheckpointIO(MegatronCheckpointIO):
    """`MegatronCheckpointIO` for conversions: synchronous torch_dist saves and loads in this
    process, without a CUDA call (no async save)."""

    def __init__(self):
        super().__init__(save_ckpt_format="torch_dist", async_save=False, parallel_save=False)

    def _determine_dist_ckpt_save_strategy(self):
        return HostSaveStrategy("torch_dist", 1)

    def load_checkpoint(self, path, sharded_state_dict=None, map_location=None, strict=None):
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.validation import StrictHandling

        if map_location is not None:
            raise ValueError(f"HostCheckpointIO.load_checkpoint: map_location={map_location!r} is not supported")
        path = self._preprocess_checkpoint_load_path(path)
        if strict is False:
            sharded_state_dict = self.adjust_non_strict_load(path, sharded_state_dict)
        if strict is None or strict is True:
            strict = StrictHandling.ASSUME_OK_UNEXPECTED
        elif strict is False:
            strict = StrictHandling.LOG_ALL
        return dist_checkpointing.load(sharded_state_dict=sharded_state_dict, checkpoint_dir=str(path), strict=strict)

