"""GRPO trainer for NeMo-Aligner 0.7.0: Aligner's `ReinforceTrainer` with the core's group
advantages, and two fixes of its REINFORCE bookkeeping.

Each prompt is sampled `trainer.reinforce.num_rollouts_per_prompt` (G) times. The rewards
(minus `initial_policy_kl_penalty` x KL to the initial policy, as stock; 0 in conf/aligner/grpo.yaml)
become advantages by the core's `group_advantages` within each prompt's group, with the group's
rows kept or dropped by `keep_sequences` (`model.reinforce.grpo`, `grpo_config`). The actor
(`grpo_actor.GRPOActor`) trains on them with the core's GRPO loss; reference log-probs are
computed when `kl_beta` > 0 (or the stock reward penalty is on).

Fixed here (read in nemo_aligner/algorithms/reinforce.py of 0.7.0):
1. `generate_rollouts` advanced `consumed_samples` by the rollout rows, prompts x G, while the
   prompt dataloader it rebuilds from that number counts prompts; every step skipped (G − 1)
   batches of prompts. Here it advances by prompts.
2. `ReinforceRolloutBatch.chunk(rank, ...)` ignores `rank` and returns every row, so every
   data-parallel rank trained on the whole global batch (identical gradients, DP x the
   optimizer steps on 1/DP of the rows each). Here rank r takes its share of whole prompt groups
   (`grpo_groups.rank_group_rows`).
Groups are named by the generating rank and the prompt's index there (the `group_ids` row key),
so a prompt drawn twice in one step makes two groups.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from .deps import require
from .grpo_config import GRPOSettings
from .grpo_groups import RANK_STRIDE, contiguous_group_advantages, rank_group_rows

_reinforce = require("nemo_aligner.algorithms.reinforce", "the GRPO trainer")
_parallel_state = require("nemo_aligner.utils.parallel_state", "the GRPO trainer")
_distributed = require("nemo_aligner.utils.distributed", "the GRPO trainer")
_ppo_utils = require("nemo_aligner.utils.ppo_utils", "the GRPO trainer")
_utils = require("nemo_aligner.utils.utils", "the GRPO trainer")

def take_rows(batch: dict, rows: torch.Tensor) -> "_reinforce.ReinforceRolloutBatch":
    """The rows `rows` of every tensor of a rollout batch (what a rank-aware `chunk` returns)."""
    out = _reinforce.ReinforceRolloutBatch()
    for k, v in batch.items():
        out[k] = v[rows.to(v.device)].clone()
    return out


class GRPOTrainer(_reinforce.ReinforceTrainer):
    """`ReinforceTrainer` with GRPO advantages and the two fixes above (module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grpo = GRPOSettings.from_model_cfg(self.model.cfg)
        self.group_size = int(self.cfg.num_rollouts_per_prompt)
        if self.group_size < 2:
            raise ValueError(f"trainer.reinforce.num_rollouts_per_prompt={self.group_size}: expected >= 2 (GRPO "
                             "compares each completion with the others of its prompt)")  # fmt: skip
        self.compute_init_policy_kl = self.cfg.initial_policy_kl_penalty > 0 or self.grpo.needs_reference

    # ------------------------------------------------------------------ fix 1: consumed_samples

    @torch.no_grad()
    def generate_rollouts(self):
        """Stock `generate_rollouts`, advancing `consumed_samples` by prompts (rows ÷ G)."""
        with self.timer("prepare_for_inference"):
            self.model.prepare_for_inference()
        rollout_batch, rollout_metrics = self._run_inference(
            self.train_dataloader_builder, consumed_samples=self.consumed_samples, is_validation=False
        )
        self.consumed_samples += rollout_metrics["rollout_size"] // self.group_size
        reinforce_rollout_data, reinforce_rollout_metrics = self.generate_reinforce_data(rollout_batch)
        with self.timer("finish_inference"):
            self.model.finish_inference()
        return (
            reinforce_rollout_data,
            rollout_metrics | reinforce_rollout_metrics | {"consumed_samples": self.consumed_samples},
            self.timer.consume_durations(),
        )

    # ------------------------------------------------------------------ fix 2: rank-aware chunk

    def _run_inference(self, dataloader_builder, consumed_samples, is_validation):
        """Stock `_run_inference`, with each training row tagged by its prompt group and rank r
        taking its share of whole groups (validation keeps the stock path: no groups there)."""
        if is_validation:
            return super()._run_inference(dataloader_builder, consumed_samples, is_validation)
        reshard_context = _parallel_state.trt_llm_reshard_region if self.trtllm_reshard else nullcontext
        rollout_batches, futures = [], []
        with reshard_context():
            dataloader = dataloader_builder(consumed_samples=consumed_samples)
            sampler_iter = iter(dataloader.batch_sampler)
            num_microbatches = _reinforce.compute_num_rollout_microbatches(dataloader)
            generating_rank = _parallel_state.get_data_parallel_rank()
            with self.timer("batch_iterator_init"):
                batch_iterator = self.batch_iterator_cls(sampler_iter, num_microbatches, dataloader.dataset, self.collate_fn)
            prompts_seen = 0
            with self.timer("generate"):
                for batch in batch_iterator:
                    n = batch["text"].size(0)
                    group_ids = generating_rank * RANK_STRIDE + prompts_seen + torch.arange(n, dtype=torch.long)
                    prompts_seen += n
                    for _ in range(self.group_size):
                        rollout_batch = self.model.infer(batch)
                        rollout_batch["prompt_tokens"] = batch["text"]
                        rollout_batch["group_ids"] = group_ids.to(rollout_batch["prompt_lengths"].device)
                        rollout_batches.append(rollout_batch)
                        futures.append(self.rm.infer_rm(rollout_batch))
            unbalanced_local_batch = _reinforce.ReinforceRolloutBatch.from_rollout_batches(
                rollout_batches, eos_id=self.model.tokenizer.eos_id, rollout_batch_seq_length=self.cfg.rollout_batch_seq_length
            )
            global_rollout_batch = unbalanced_local_batch.gather_and_balance_globally()

        padded_rollout_sequence_length = global_rollout_batch["response_tokens"].size(-1)
        rows = rank_group_rows(global_rollout_batch["group_ids"], self.group_size, _parallel_state.get_data_parallel_rank(),
                               _parallel_state.get_data_parallel_world_size(), seed=self.step)  # fmt: skip
        balanced_local_batch = take_rows(global_rollout_batch, rows)
        batched_response_tokens = balanced_local_batch["response_tokens"]
        with self.timer("logprobs"):
            balanced_local_batch["logprobs"] = self.model.get_inference_log_probs(batched_response_tokens)
        if self.compute_init_policy_kl:
            with self.timer("init_logprobs"):
                balanced_local_batch["init_logprobs"] = self.model.get_init_policy_logprobs(batched_response_tokens)

        with reshard_context():
            with self.timer("critic_wait"):
                rm_rollout_batches = [{"rewards": future.result().squeeze(1)} for future in futures]
            unbalanced_rm_batch = _reinforce.ReinforceRolloutBatch.from_rollout_batches(
                rm_rollout_batches, eos_id=self.model.tokenizer.eos_id, rollout_batch_seq_length=padded_rollout_sequence_length
            )
            global_rm_batch = unbalanced_rm_batch.gather_and_balance_globally()
        balanced_local_batch.update(take_rows(global_rm_batch, rows))
        global_rollout_batch.update(global_rm_batch)
        return balanced_local_batch, _utils.cpu_dict(self.compute_rollout_metrics(global_rollout_batch))

    # ------------------------------------------------------------------ GRPO advantages

    def generate_reinforce_data(self, rollout_batch):
        """The actor's training data: stock mask and reward (minus the optional KL penalty), then
        the core's group advantages and keep mask over this rank's whole groups."""
        logprobs = rollout_batch["logprobs"]
        mask = _ppo_utils.create_mask(values=logprobs, prompt_lengths=rollout_batch["prompt_lengths"],
                                      response_lengths=rollout_batch["response_lengths"])  # fmt: skip
        penalty = self.cfg.initial_policy_kl_penalty
        if penalty > 0:
            kl = _ppo_utils.calculate_kl_penalty(log_probs_a=logprobs, log_probs_b=rollout_batch["init_logprobs"],
                                                 use_absolute_kl=self.cfg.use_absolute_kl)  # fmt: skip
            init_policy_kl = _utils.masked_mean(kl, mask, dim=-1)
        else:
            init_policy_kl = torch.zeros_like(rollout_batch["rewards"])
        rewards_with_kl = rollout_batch["rewards"] - penalty * init_policy_kl
        advantages, keep, dropped = contiguous_group_advantages(rewards_with_kl, self.group_size, self.grpo)

        data = {
            "response_tokens": rollout_batch["response_tokens"],
            "mask": mask,
            "advantages": advantages.to(logprobs.device),
            "keep": keep.to(logprobs.device),
            "logprobs": logprobs,
            "is_end": rollout_batch["is_end"],
        }
        if self.grpo.needs_reference:
            data["init_logprobs"] = rollout_batch["init_logprobs"]

        metrics = {
            "init_policy_kl": init_policy_kl.sum().item(),
            "rewards_with_kl": rewards_with_kl.sum().item(),
            "groups_dropped": dropped,
            "num_samples": rewards_with_kl.size(0),
        }
        metrics = _distributed.all_reduce_dict(metrics, group=_parallel_state.get_data_parallel_group(),
                                               op=torch.distributed.ReduceOp.SUM)  # fmt: skip
        num_samples = metrics.pop("num_samples")
        groups_dropped = metrics.pop("groups_dropped")
        metrics = {k: v / num_samples for k, v in metrics.items()}
        metrics["groups_dropped_fraction"] = groups_dropped * self.group_size / num_samples
        return data, _utils.cpu_dict(metrics)
