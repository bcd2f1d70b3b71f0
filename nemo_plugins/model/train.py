"""Causal-LM training loop on Lightning (loss-masked next-token prediction, resumable), and the
batching helpers the other loops share (`TokenDataset`, `collate`, `micro_batches`,
`ShuffledBatches`).

`fit_lm` trains the tiny parent.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..utils.resume import TrainingState, save_training_state
from ..utils.training import OptimConfig, fit_module, make_optimizer, resume_latest, stop_if_terminated
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


class ShuffledBatches(Sampler):
    """The batches of steps `start`..`steps`-1: what Lightning drew from `DataLoader(shuffle=True,
    drop_last=True, generator=torch.Generator().manual_seed(seed))` over as many epochs as `steps`
    needs, so a resumed run (a BLD wave, the tiny parent) sees the batches the interrupted one
    would have, and trains as it did before it could resume. Per epoch the loader's iterator
    draws its base seed, then the sampler its `randperm`; Lightning takes `len(loader)` batches
    and never exhausts the iterator, so the sampler's last (empty) `randperm` is never drawn."""

    def __init__(self, num_examples: int, batch_size: int, seed: int, start: int, steps: int):
        if num_examples < batch_size:
            raise ValueError(f"{num_examples} training examples < batch_size={batch_size}")
        self.n, self.batch_size, self.seed, self.start, self.steps = num_examples, batch_size, seed, start, steps

    def __iter__(self):
        g, step = torch.Generator().manual_seed(self.seed), 0
        while step < self.steps:
            torch.empty((), dtype=torch.int64).random_(generator=g)  # the loader iterator's base seed
            perm = torch.randperm(self.n, generator=g).tolist()
            for i in range(0, self.n - self.batch_size + 1, self.batch_size):
                if step >= self.start:
                    yield perm[i : i + self.batch_size]
                step += 1
                if step == self.steps:
                    return

    def __len__(self):
        return self.steps - self.start


class LMTrainingModule(L.LightningModule):
    """Masked next-token loss on a `HeteroLlamaForCausalLM`. With `checkpoints`, the model, the
    optimizer and schedule and the losses so far are saved there every `ckpt_every` steps and
    on SIGTERM; `resume` is such a checkpoint to continue from."""

    def __init__(
        self, model: HeteroLlamaForCausalLM, optim: OptimConfig, total_steps: int, *,
        checkpoints: Path | None = None, ckpt_every: int = 0, resume: TrainingState | None = None,
    ):  # fmt: skip
        super().__init__()
        self.model = model
        self.optim = optim
        self.total_steps = total_steps
        self.checkpoints, self.ckpt_every, self.resume = checkpoints, ckpt_every, resume
        self.step_count = resume.step if resume is not None else 0
        self.losses: list[float] = list(resume.extra["losses"]) if resume is not None else []

    def training_step(self, batch, batch_idx):
        ids, mask = batch
        loss = causal_lm_loss(self.model(ids), ids, mask)
        self.log("loss", loss, prog_bar=True, on_step=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        """After the step's optimizer and schedule steps: count it and checkpoint it when due."""
        self.step_count += 1
        self.losses.append(float(outputs["loss"]))
        if self.checkpoints is not None and self.ckpt_every and self.step_count % self.ckpt_every == 0 \
                and self.step_count < self.total_steps:  # fmt: skip
            self.save()

    def configure_optimizers(self):
        opt, sched = make_optimizer(self.model, self.optim, self.total_steps)
        if self.resume is not None:
            opt.load_state_dict(self.resume.optimizer)
            sched.load_state_dict(self.resume.scheduler)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def save(self) -> None:
        save_training_state(self.checkpoints, self.step_count, self.model, self.optimizers(), self.lr_schedulers(),
                            {"losses": self.losses}, keep_last=1)  # fmt: skip

    def save_on_sigterm(self) -> None:
        """Called by `fit_module` when SIGTERM stops the fit: the rerun continues from this step."""
        if self.checkpoints is not None and self.step_count < self.total_steps:
            self.save()


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
    checkpoints: str | Path | None = None,
    ckpt_every: int = 0,
) -> list[float]:
    """Train `model` in place for `steps` optimizer steps; returns the per-step losses.

    With `checkpoints` (a directory), the run checkpoints itself every `ckpt_every` steps and
    on SIGTERM, and a rerun with the same arguments continues from the newest checkpoint there,
    ending with the weights an uninterrupted run has. Raises `TrainingInterrupted` (exit status
    143) on SIGTERM, after the current step."""
    L.seed_everything(seed, verbose=False)
    checkpoints = Path(checkpoints) if checkpoints is not None else None
    resume = resume_latest(checkpoints, model, "parent training") if checkpoints is not None else None
    module = LMTrainingModule(model, optim, steps, checkpoints=checkpoints, ckpt_every=ckpt_every, resume=resume)
    loader = DataLoader(
        TokenDataset(examples), batch_sampler=ShuffledBatches(len(examples), batch_size, seed, module.step_count, steps),
        collate_fn=lambda b: collate(b, pad_id),
    )  # fmt: skip
    trainer = fit_module(
        module, loader, accelerator="auto", devices=1,
        max_steps=steps - module.step_count, max_epochs=1, gradient_clip_val=optim.grad_clip, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
        num_sanity_val_steps=0, use_distributed_sampler=False,
    )  # fmt: skip
    stop_if_terminated(trainer, "parent training")
    model.eval()
    return module.losses
