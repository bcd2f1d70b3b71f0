"""Recovery after compression: distill the frozen teacher (the parent) into the student (the
Puzzle/FFN-Fusion child), or continue pre-training it on the data (`loss.mode=cpt`).

The loop is `utils.training.LossModule` (shared with SFT) given this file's `step_loss`, on a
Lightning Trainer with manual optimization; one Lightning batch is one optimizer step, i.e. `grad_accum` micro-batches of `batch_size` examples. Each micro-batch is
backpropagated separately (real accumulation: memory of one micro-batch) and weighted by its
share of the step's counted tokens, so accumulating 2×B equals one step of 2B.

Which examples make step k depends only on (seed, k) (`StepSampler`), so a run restarted from
the checkpoint of step k continues with the data of step k+1; together with the restored
weights, optimizer, scheduler and RNG states, a crashed-and-resumed run ends with the same
weights as an uninterrupted one. Files under `out_dir`: `checkpoints/step-*/` (utils/resume.py),
`metrics.csv` and `recovery.png` (validation every `val_every` steps, rewritten from the
checkpointed history, so a resumed run never duplicates rows), `recovery_summary.json`, and
`tensorboard/` when tensorboard is installed.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from ..model.llama import HeteroLlamaForCausalLM
from ..model.losses import next_token_mask
from ..model.metrics import logits_and_hidden, val_metrics
from ..model.train import TokenDataset, micro_batches
from ..utils.training import PRECISIONS, LossModule, RunPaths, StepSampler, fit_steps, resume_or_seed, run_summary
from .losses import RecoveryLossConfig, recovery_loss

log = logging.getLogger("nemo_plugins.distill")

Example = tuple[list[int], list[int]]
# Fields that change which data each step sees or what is optimized: a resume with other values
# would not continue the same run.
_RUN_DEFINING = ("batch_size", "grad_accum", "seed", "loss")


@dataclass
class RecoveryConfig:
    steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1  # effective batch = batch_size × grad_accum
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # 0: no clipping
    precision: str = "auto"  # auto: bf16-mixed on a CUDA GPU with bf16, else 32-bit
    val_every: int = 50
    val_batches: int = 4  # batches of batch_size from the start of the val set; 0 = all of it
    ckpt_every: int = 50
    keep_last: int = 2
    seed: int = 0
    loss: RecoveryLossConfig = field(default_factory=RecoveryLossConfig)

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "val_every", "ckpt_every", "keep_last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"recovery.{name}={value!r}: expected a positive integer")
        for name in ("val_batches", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"recovery.{name}={getattr(self, name)}: expected an integer >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"recovery.lr={self.lr}: expected a finite number > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"recovery.min_lr_ratio={self.min_lr_ratio}: expected a number in [0, 1]")
        for name in ("weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"recovery.{name}={getattr(self, name)}: expected a number >= 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"recovery.precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if isinstance(self.loss, dict):
            self.loss = RecoveryLossConfig(**self.loss)

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum





# ----------------------------------------------------------------------------- loss


def micro_loss(student, teacher, loss_cfg: RecoveryLossConfig, ids, loss_mask):
    """(token-sum loss, {term: token sum}) of one micro-batch; the teacher runs without gradients."""
    logits, hidden = logits_and_hidden(student, ids)
    t_logits = t_hidden = None
    if loss_cfg.needs_teacher:
        with torch.no_grad():
            t_logits, t_hidden = logits_and_hidden(teacher, ids)
    return recovery_loss(loss_cfg, ids, loss_mask, logits, hidden, t_logits, t_hidden, reduction="sum")


def step_loss(student, teacher, loss_cfg: RecoveryLossConfig, batch, backward=None) -> float:
    """The step's loss per counted token; each micro-batch's share is backpropagated on its own
    through `backward` (real accumulation: the memory of one micro-batch)."""
    n_tokens = max(1, sum(int(next_token_mask(m).sum()) for _, m in batch))
    total = 0.0
    for ids, loss_mask in batch:
        loss, _ = micro_loss(student, teacher, loss_cfg, ids, loss_mask)
        if backward is not None:
            backward(loss / n_tokens)
        total += float(loss.detach()) / n_tokens
    return total


# ----------------------------------------------------------------------------- entry point


def run_recovery(
    student: HeteroLlamaForCausalLM,
    teacher: HeteroLlamaForCausalLM | None,
    train_examples: Sequence[Example],
    val_examples: Sequence[Example],
    cfg: RecoveryConfig,
    out_dir: str | Path,
    progress: bool = False,
    *,
    pad_id: int = 0,
    callbacks: Sequence[L.Callback] = (),
) -> dict:
    """Train `student` in place for `cfg.steps` optimizer steps (resuming from the newest
    checkpoint in `out_dir/checkpoints` if there is one) and return a summary: steps done,
    the step resumed from, final train loss, validation history and output paths. The teacher
    is frozen (requires_grad off, eval mode) and may be None only in `cpt` mode."""
    if teacher is None and cfg.loss.needs_teacher:
        raise ValueError(f"recovery.loss.mode={cfg.loss.mode!r} needs a teacher model (or use mode=cpt)")
    if not val_examples:
        raise ValueError("run_recovery: val_examples is empty")
    paths = RunPaths(Path(out_dir), "recovery")
    resume = resume_or_seed(paths, student, cfg, _RUN_DEFINING, {"num_train_examples": len(train_examples)})
    start = resume.step if resume is not None else 0
    n_val = cfg.val_batches * cfg.batch_size or len(val_examples)
    val_batches = micro_batches(list(val_examples)[:n_val], cfg.batch_size, pad_id)
    module = LossModule(
        student, cfg, paths, resume,
        step_loss=functools.partial(step_loss, student, teacher, cfg.loss),
        val_metrics=lambda: val_metrics(student, teacher, val_batches), columns=("val_kl", "val_lm_loss"),
        config=asdict(cfg), recorded={"num_train_examples": len(train_examples)},
        frozen=[teacher] if teacher is not None else [],
    )  # fmt: skip
    if start < cfg.steps:
        _fit(module, train_examples, cfg, start, pad_id, progress, callbacks)
    student.eval()
    return run_summary(module, start)


def _fit(module: LossModule, train_examples, cfg: RecoveryConfig, start: int, pad_id, progress, callbacks):
    sampler = StepSampler(len(train_examples), cfg.examples_per_step, cfg.seed, start, cfg.steps)
    loader = DataLoader(
        TokenDataset(train_examples), batch_sampler=sampler,
        collate_fn=lambda examples: micro_batches(examples, cfg.batch_size, pad_id),
    )  # fmt: skip
    fit_steps(module, loader, start, progress, callbacks)
