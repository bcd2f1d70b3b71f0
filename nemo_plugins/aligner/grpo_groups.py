"""Prompt groups of an Aligner rollout batch: which rows a data-parallel rank trains on, and the
core's group advantages over them.

Aligner 0.7.0's `ReinforceRolloutBatch.chunk` ignores its `rank` and returns every row, so each
data-parallel rank trains on the whole global batch. `rank_group_rows` gives rank r its share
of whole prompt groups instead (the G completions of a prompt stay together, so each rank forms
GRPO advantages on complete groups, equal to forming them globally). Imports only the core.
"""

from __future__ import annotations

import torch

from ..rl.grpo_loss import group_advantages, keep_sequences, zero_variance_groups
from .grpo_config import GRPOSettings

RANK_STRIDE = 1 << 32  # a row's group id = generating DP rank x RANK_STRIDE + the prompt's index on that rank


def rank_group_rows(group_ids: torch.Tensor, group_size: int, rank: int, world_size: int, seed: int) -> torch.Tensor:
    """Row indices (int64, on the CPU) of rank `rank`'s groups, group after group.

    `group_ids` [B] names each row's prompt group (any int64 values; a group's rows need not be
    adjacent); every group must have exactly `group_size` rows. The groups are shuffled by
    `seed` (the same order on every rank) and split into `world_size` contiguous shares, sizes
    differing by at most one group; within a group the rows keep their batch order.
    """
    if not (0 <= rank < world_size):
        raise ValueError(f"rank={rank}: expected 0 <= rank < world_size ({world_size})")
    ids = group_ids.detach().cpu().long()
    if ids.dim() != 1:
        raise ValueError(f"group_ids shape {tuple(ids.shape)}: expected [B]")
    unique, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    wrong = (counts != group_size).nonzero().flatten()
    if len(wrong):
        g = int(wrong[0])
        raise ValueError(f"group {int(unique[g])} has {int(counts[g])} rows: expected num_rollouts_per_prompt={group_size}")
    rows_by_group = torch.argsort(inverse, stable=True).view(len(unique), group_size)
    first_row = rows_by_group[:, 0]
    in_batch_order = torch.argsort(first_row)  # groups as they first appear in the batch
    generator = torch.Generator().manual_seed(int(seed))
    shuffled = in_batch_order[torch.randperm(len(unique), generator=generator)]
    mine = shuffled.tensor_split(world_size)[rank]
    return rows_by_group[mine].flatten()


def contiguous_group_advantages(
    rewards: torch.Tensor, group_size: int, settings: GRPOSettings
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(advantages [N*G], keep [N*G] bool, groups dropped) from rewards [N*G] in contiguous groups,
    by the core's `group_advantages` and `keep_sequences` (zero-variance groups dropped when
    `settings.loss.drop_zero_variance`)."""
    advantages = group_advantages(rewards, group_size, leave_one_out=settings.leave_one_out,
                                  normalize_std=settings.normalize_std)  # fmt: skip
    keep = keep_sequences(rewards, group_size, settings.loss)
    dropped = int(zero_variance_groups(rewards, group_size).sum()) if settings.loss.drop_zero_variance else 0
    return advantages, keep, dropped
