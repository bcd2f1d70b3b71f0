"""GRPO actor for NeMo-Aligner 0.7.0: Aligner's REINFORCE actor with the core's GRPO loss.

`MegatronGPTReinforceActorModel` trains −logπ·(r − b) averaged per micro-batch. This subclass's
loss closure computes the core's `grpo_loss` instead (clipped ratio to the rollout policy with
separate clip_low / clip_high, k3 KL to the reference weighted by kl_beta, zero-variance groups
dropped by the `keep` mask, token- or sequence-level aggregation), with the settings of
`model.reinforce.grpo` (`grpo_config`).

Normalization over the global batch: the core's loss of a micro-batch is its share of the
optimizer step's loss when divided by the step's token (or sequence) count, summed over every
micro-batch of every data-parallel rank. `get_loss_and_metrics` counts this rank's tokens and
all-reduces the count over the data-parallel group before the micro-batches run. Megatron's
schedule then divides each micro-batch loss by the number of micro-batches, and the gradient
all-reduce averages over data-parallel ranks, so the closure multiplies by both to undo them:
the gradient is that of the global-batch loss.

Batch keys (what `grpo_trainer.GRPOTrainer` builds; log-prob shaped [B, T−1] as Aligner's):
response_tokens, mask, advantages, keep, logprobs (the rollout policy's, the ratio's
denominator), init_logprobs (the reference's; needed when kl_beta > 0).
"""

from __future__ import annotations

import torch

from ..rl.grpo_loss import grpo_loss, loss_normalizers
from .deps import require
from .grpo_config import GRPOSettings

_actor = require("nemo_aligner.models.nlp.gpt.megatron_gpt_reinforce_actor", "the GRPO actor")
_distributed = require("nemo_aligner.utils.distributed", "the GRPO actor")
_parallel_state = require("nemo_aligner.utils.parallel_state", "the GRPO actor")
_train_utils = require("nemo_aligner.utils.train_utils", "the GRPO actor")
_megatron_utils = require("nemo.collections.nlp.modules.common.megatron.utils", "the GRPO actor")
_microbatches = require("megatron.core.num_microbatches_calculator", "the GRPO actor")
_schedules = require("megatron.core.pipeline_parallel.schedules", "the GRPO actor")
_nemo_utils = require("nemo.collections.nlp.parts.utils_funcs", "the GRPO actor")

LAST_STAGE_KEYS = ("response_tokens", "mask", "advantages", "keep", "logprobs", "init_logprobs")
METRICS = ("loss", "pg_loss", "kl_loss", "clip_fraction", "approx_kl", "ratio_mean", "kl_ref")


def _on_device(t: torch.Tensor) -> torch.Tensor:
    return t.cuda(non_blocking=True) if torch.cuda.is_available() else t


class GRPOActor(_actor.MegatronGPTReinforceActorModel):
    """Aligner's REINFORCE actor trained by the core's GRPO loss (module doc)."""

    @property
    def grpo_settings(self) -> GRPOSettings:
        """Parsed from `model.reinforce.grpo` each time (cheap; follows config edits)."""
        return GRPOSettings.from_model_cfg(self.cfg)

    def grpo_step_scale(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(global tokens, global sequences, loss multiplier) of the running optimizer step, set by
        `get_loss_and_metrics`."""
        scale = getattr(self, "_grpo_step_scale", None)
        if scale is None:
            raise RuntimeError("the GRPO loss closure runs inside get_loss_and_metrics, which counts the global tokens first")
        return scale

    def count_global_normalizers(self, batch: dict, num_microbatches: int) -> None:
        """Count this rank's kept response tokens and sequences over the whole step's batch, sum
        them over the data-parallel group, and keep them with the loss multiplier that undoes
        Megatron's ÷ micro-batches and the data-parallel gradient average."""
        cp = self.cfg.get("context_parallel_size", 1)
        if cp != 1:  # each CP rank would see part of every sequence; its counts and scale are not derived here
            raise ValueError(f"model.context_parallel_size={cp}: the GRPO actor supports 1 (it counts tokens over whole sequences)")
        tokens, sequences = loss_normalizers(batch["mask"], batch["keep"])
        counts = torch.tensor([tokens, sequences], dtype=torch.float64)
        counts = _on_device(counts)
        group = _parallel_state.get_data_parallel_group()
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM, group=group)
        dp = torch.distributed.get_world_size(group=group)
        # an all-dropped step has no tokens: the loss is then 0 with zero gradients (not 0/0)
        self._grpo_step_scale = (counts[0].clamp_min(1), counts[1].clamp_min(1), float(num_microbatches * dp))

    def get_actor_forward_output_and_loss_func(self):
        settings = self.grpo_settings

        def fwd_output_and_loss_func(data_iterator, model):
            batch = next(data_iterator)
            if _parallel_state.get_pipeline_model_parallel_world_size() == 1:
                required = set(batch)
            else:
                required = {"attention_mask"}
                if _parallel_state.is_pipeline_first_stage():
                    required.update(("response_tokens", "position_ids"))
                if _parallel_state.is_pipeline_last_stage():
                    required.update(LAST_STAGE_KEYS)
            batch = {k: _on_device(v) if k in required and v is not None else None for k, v in batch.items()}

            parallel_logits = model(batch["response_tokens"], batch["position_ids"], batch["attention_mask"], labels=None)

            def loss_func(parallel_logits):
                global_tokens, global_sequences, multiplier = self.grpo_step_scale()
                logp = _distributed.from_parallel_logits_to_logprobs(
                    vocab_parallel_logits=parallel_logits, target=batch["response_tokens"], higher_stability=True
                )
                loss, metrics = grpo_loss(
                    logp, batch["logprobs"], batch.get("init_logprobs"), batch["advantages"], batch["mask"],
                    settings.loss, global_tokens, keep=batch["keep"], global_sequences=global_sequences,
                )  # fmt: skip
                scaled = loss * multiplier
                names = [k for k in METRICS if k in metrics]
                values = [metrics[k] * multiplier if k in ("loss", "pg_loss", "kl_loss") else metrics[k] for k in names]
                reduced = _megatron_utils.average_losses_across_data_parallel_group(values)
                return scaled, dict(zip(names, reduced))

            return parallel_logits, loss_func

        return fwd_output_and_loss_func

    def get_loss_and_metrics(self, batch, forward_only):
        """Aligner's training step with the global token count taken first. Metrics: `loss`,
        `pg_loss`, `kl_loss` are the step's global-batch values (the micro-batch shares summed);
        `clip_fraction`, `approx_kl`, `ratio_mean`, `kl_ref` are means of per-micro-batch means."""
        sequence_length = batch["response_tokens"].size(1)
        attention_mask, _, position_ids = self.get_ltor_masks_and_position_ids(tokens=batch["response_tokens"])
        batch["attention_mask"] = attention_mask
        batch["position_ids"] = position_ids

        num_microbatches = _microbatches.get_num_microbatches()
        self.count_global_normalizers(batch, num_microbatches)
        data_iter = _megatron_utils.get_iterator_k_split(batch, num_microbatches)
        _train_utils.set_sync_funcs(self, forward_only)
        fwd_bwd_function = _schedules.get_forward_backward_func()
        try:
            reduced = fwd_bwd_function(
                forward_step_func=self.get_actor_forward_output_and_loss_func(),
                data_iterator=self._make_data_iterator_list(data_iter),
                model=self.model,
                num_microbatches=num_microbatches,
                forward_only=forward_only,
                seq_length=sequence_length,
                micro_batch_size=self.cfg.micro_batch_size,
            )
        finally:
            self._grpo_step_scale = None

        metrics = {}
        keys = [k for k in METRICS if k != "kl_ref" or batch.get("init_logprobs") is not None]  # same on every rank
        for key in keys:
            values = [r[key] for r in reduced]  # empty off the last pipeline stage
            device = values[0].device if values else ("cuda" if torch.cuda.is_available() else "cpu")
            # micro-batch shares of loss / pg_loss / kl_loss were scaled by the micro-batch count,
            # so their mean is their sum: the global-batch value
            mean = torch.stack(values).mean() if values else torch.zeros((), device=device)
            torch.distributed.broadcast(mean, _nemo_utils.get_last_rank())
            metrics[key] = mean.cpu().item()
        return metrics["loss"], metrics
