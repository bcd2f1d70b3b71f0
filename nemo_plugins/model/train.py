"""Causal-LM training loop on Lightning: loss-masked next-token prediction.

Used to train the tiny parent; recovery and SFT stages reuse `TokenDataset`, `collate` and
`LMTrainingModule` with their own losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ..utils.training import OptimConfig, fit_module, make_optimizer, stop_if_terminated
from .llama import HeteroLlamaForCausalLM, causal_lm_loss

Example = tuple[list[int], list[int]]  # (input_ids, loss_mask)


class TokenDataset(Dataset):
    """(input_ids, loss_mask) pairs, one per example."""

    def __init__(self, examples: Sequence[tuple[list[int], list[int]]]):
        self.examples = list(examples)

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def collate(batch, pad_id: int = 0):
    """Right-pad a batch to its longest example; padding gets loss mask 0. Returns (ids, loss_mask)."""
    ids, loss_mask, _ = collate_with_validity(batch, pad_id)
    return ids, loss_mask


def collate_with_validity(batch, pad_id: int = 0):
    """(ids, loss_mask, real): `real` [B, T] bool marks non-padding tokens."""
    longest = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    real = torch.zeros((len(batch), longest), dtype=torch.bool)
    for i, (x, m) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(m)] = torch.tensor(m)
        real[i, : len(x)] = True
    return ids, mask, real


def micro_batches(examples: Sequence[Example], batch_size: int, pad_id: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Consecutive chunks of `batch_size` examples, each collated to (ids, loss_mask)."""
    chunks = (examples[i : i + batch_size] for i in range(0, len(examples), batch_size))
    return [collate_with_validity(chunk, pad_id)[:2] for chunk in chunks]


def token_batches(examples, batch_size: int, n: int, pad_id: int, *, response_only: bool = False):
    """Up to `n` right-padded batches of (input_ids, counted): counted marks real tokens, or only
    the response tokens with `response_only` (what scoring measures: the parent was never
    trained to predict the prompts)."""
    out = []
    for start in range(0, min(len(examples), batch_size * n), batch_size):
        chunk = examples[start : start + batch_size]
        ids, loss_mask, real = collate_with_validity(chunk, pad_id)
        out.append((ids, loss_mask.bool() if response_only else real))
    return out


class LMTrainingModule(L.LightningModule):
    """Masked next-token loss on a `HeteroLlamaForCausalLM`."""

    def __init__(self, model: HeteroLlamaForCausalLM, optim: OptimConfig, total_steps: int):
        super().__init__()
        self.model = model
        self.optim = optim
        self.total_steps = total_steps

    def training_step(self, batch, batch_idx):
        ids, mask = batch
        loss = causal_lm_loss(self.model(ids), ids, mask)
        self.log("loss", loss, prog_bar=True, on_step=True)
        return loss

    def configure_optimizers(self):
        opt, sched = make_optimizer(self.model, self.optim, self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fit_lm(
    model: HeteroLlamaForCausalLM,
    examples: Sequence[tuple[list[int], list[int]]],
    *,
    steps: int,
    batch_size: int,
    optim: OptimConfig = OptimConfig(),
    pad_id: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train `model` in place for `steps` optimizer steps; returns the per-step losses.
    Raises `TrainingInterrupted` (exit status 143) on SIGTERM, after the current step: this
    loop keeps no checkpoint, so a rerun trains again from the start."""
    L.seed_everything(seed, verbose=False)
    loader = DataLoader(
        TokenDataset(examples),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=lambda b: collate(b, pad_id),
        generator=torch.Generator().manual_seed(seed),
    )
    module = LMTrainingModule(model, optim, steps)
    losses: list[float] = []

    class _Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = fit_module(
        module,
        loader,
        callbacks=[_Record()],
        accelerator="auto",
        devices=1,
        max_steps=steps,
        gradient_clip_val=optim.grad_clip,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        num_sanity_val_steps=0,
    )
    stop_if_terminated(trainer, "parent training")
    model.eval()
    return losses
