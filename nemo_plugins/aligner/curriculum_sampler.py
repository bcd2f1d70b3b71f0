"""Curriculum sampling inside NeMo-Aligner's RL dataloader.

Aligner's REINFORCE/PPO trainers rebuild the prompt dataloader every step from `consumed_samples`
(`train_dataloader_builder(consumed_samples=...)`) and draw `num_rollout_samples / mbs / DP`
micro-batches from its batch sampler. `build_curriculum_dataloader` has `build_dataloader`'s
signature plus a `CurriculumPlan`, so a training script swaps one `partial` for the other:

    plan = CurriculumPlan(load_prompt_set(prompts, tok, modes), load_pass_rates(path), gbs, settings)
    train_dataloader_builder = partial(build_curriculum_dataloader, cfg=cfg, dataset=train_ds,
        mbs=cfg.model.reinforce.rollout_micro_batch_size, gbs=cfg.model.reinforce.num_rollout_samples,
        collate_fn=collate_fn, plan=plan)

The sampler subclasses NeMo's `MegatronPretrainingRandomSampler` (what Aligner's builder uses
for RL prompts) and keeps its bookkeeping (`consumed_samples` grows by mbs x DP per micro-batch),
so Aligner's batch iterator and collate see what they expect.

Aligner 0.7.0's `ReinforceTrainer` advances `consumed_samples` by the rollout rows, prompts x
`num_rollouts_per_prompt` (read in `algorithms/reinforce.py`: `rollout_size` is counted on the
gathered rollout batch); pass that number as `rollouts_per_prompt` so step k still draws
curriculum batch k. With 1 (a trainer that counts prompts) batch = consumed_samples // gbs.
"""

from __future__ import annotations

import torch

from .curriculum_batches import CurriculumPlan, rank_micro_batches
from .deps import require

_samplers = require("nemo.collections.nlp.data.language_modeling.megatron.data_samplers", "the curriculum batch sampler")


class CurriculumBatchSampler(_samplers.MegatronPretrainingRandomSampler):
    """Yields this data-parallel rank's micro-batches of the curriculum's global batches, starting
    at batch `consumed_samples // global_batch_size`; it never runs out (the trainer takes the
    micro-batches of one step and rebuilds it). The base class's `seed` is unused: the plan's
    settings carry the seed."""

    def __init__(self, plan: CurriculumPlan, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, global_batch_size: int, seed: int = 0,
                 rollouts_per_prompt: int = 1, **_):  # fmt: skip
        super().__init__(total_samples=total_samples, consumed_samples=consumed_samples, micro_batch_size=micro_batch_size,
                         data_parallel_rank=data_parallel_rank, data_parallel_size=data_parallel_size,
                         drop_last=True, global_batch_size=global_batch_size, seed=seed)  # fmt: skip
        if total_samples != len(plan.prompt_set.rows):
            raise ValueError(f"dataset of {total_samples} rows, prompt file of {len(plan.prompt_set.rows)}: expected "
                             "the trainer's prompt file to be written from the same prompts and modes (prompt_set)")  # fmt: skip
        if global_batch_size != plan.global_batch_size:
            raise ValueError(f"global_batch_size={global_batch_size}: expected the plan's {plan.global_batch_size}")
        if rollouts_per_prompt < 1:
            raise ValueError(f"rollouts_per_prompt={rollouts_per_prompt}: expected >= 1")
        self.per_batch = global_batch_size * rollouts_per_prompt  # consumed_samples per curriculum batch
        if consumed_samples % self.per_batch:
            raise ValueError(f"consumed_samples={consumed_samples}: expected a multiple of global_batch_size x "
                             f"rollouts_per_prompt ({self.per_batch}); the curriculum resumes at whole batches")  # fmt: skip
        self.plan = plan
        self.first_batch = consumed_samples // self.per_batch

    def __len__(self) -> int:
        """Micro-batches this rank yields over the batches left in the schedule (at least one batch)."""
        left = max(self.plan.settings.total_batches - self.first_batch, 1)
        return left * self.global_batch_size // self.micro_batch_times_data_parallel_size

    def __iter__(self):
        b = self.first_batch
        while True:
            batch = self.plan.global_batch(b)
            for micro in rank_micro_batches(batch, self.data_parallel_rank, self.data_parallel_size, self.micro_batch_size):
                self.consumed_samples += self.micro_batch_times_data_parallel_size
                yield micro
            b += 1


def build_curriculum_dataloader(cfg, dataset, consumed_samples, mbs, gbs, plan: CurriculumPlan, collate_fn=None,
                                rollouts_per_prompt: int = 1, **_):  # fmt: skip
    """Aligner's `build_dataloader` with the curriculum sampler (the data-parallel rank and size
    from Aligner's `parallel_state`, workers from `cfg.model.data.num_workers`; for the stock
    ReinforceTrainer, `rollouts_per_prompt` = `trainer.reinforce.num_rollouts_per_prompt`)."""
    ps = require("nemo_aligner.utils.parallel_state", "the curriculum dataloader")
    sampler = CurriculumBatchSampler(plan, total_samples=len(dataset), consumed_samples=consumed_samples,
                                     micro_batch_size=mbs, data_parallel_rank=ps.get_data_parallel_rank(),
                                     data_parallel_size=ps.get_data_parallel_world_size(), global_batch_size=gbs,
                                     rollouts_per_prompt=rollouts_per_prompt)  # fmt: skip
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.model.data.num_workers,
                                       pin_memory=True, collate_fn=collate_fn)  # fmt: skip
