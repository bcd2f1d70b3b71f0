"""Pieces shared by the resumable training loops (recovery KD, toggle SFT, GRPO).

Each loop is a Lightning module with manual optimization in which one Lightning batch is one
optimizer step; `StepModule` holds what they share: the step counter, the train-loss and
validation histories restored from a checkpoint, the optimizer and schedule (restored too), and
the RNG state restored when training starts. `StepSampler` makes step k's data depend on
(seed, k) alone, so a resumed run continues exactly where the interrupted one stopped.

Every loop of the project (these, parent training and BLD) runs its Lightning fit through
`fit_module`: no Slurm auto-requeue or `hpc_ckpt` restore, and SIGTERM ends the process with
status 143 after the current step (a StepModule checkpoints that step first).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import Sampler

from .atomic import write_json_atomic, write_text_atomic
from .plots import plot_training_curves
from ..errors import CheckpointError
from .resume import (
    TrainingState, clean_checkpoint_debris, latest, list_checkpoints, load_training_state, restore_rng_state,
    save_training_state, step_dir,
)  # fmt: skip

log = logging.getLogger("nemo_plugins")

PRECISIONS = ("auto", "32", "32-true", "bf16-mixed")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0

    @classmethod
    def of(cls, settings) -> "OptimConfig":
        """The optimizer fields a stage config carries under the same names (lr, min_lr_ratio,
        warmup_steps, weight_decay, grad_clip, ...); absent ones keep their defaults."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls) if hasattr(settings, f.name)})


def cosine_schedule(step: int, total: int, cfg: OptimConfig) -> float:
    """LR multiplier: linear warmup, then cosine down to `min_lr_ratio`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, total_steps: int):
    """AdamW with no weight decay on norms/embeddings-free 1-D params; cosine schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_schedule(s, total_steps, cfg))
    return opt, sched


def resolve_precision(precision: str) -> str:
    """Lightning precision for `precision`; "auto" picks bf16-mixed where the GPU supports it."""
    if precision == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bf16-mixed" if bf16 else "32-true"
    return "32-true" if precision == "32" else precision


class StepSampler(Sampler):
    """Yields, for steps `start`..`stop`-1, the `per_step` example indices of that step.

    Epoch e is a permutation of all examples drawn from SeedSequence([seed, e]); step k takes
    the k-th slice of `per_step` (the remainder of an epoch is dropped). A step's examples thus
    depend on (seed, k) alone, and a resumed run continues the same order.
    """

    def __init__(self, num_examples: int, per_step: int, seed: int, start: int, stop: int):
        if num_examples < per_step:
            raise ValueError(f"{num_examples} training examples < batch_size × grad_accum = {per_step}")
        self.n, self.per_step, self.seed, self.start, self.stop = num_examples, per_step, seed, start, stop
        self.steps_per_epoch = num_examples // per_step
        self._epoch, self._perm = -1, None

    def step_indices(self, step: int) -> list[int]:
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm[j * self.per_step : (j + 1) * self.per_step].tolist()

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.step_indices(step)

    def __len__(self):
        return max(0, self.stop - self.start)


@dataclass
class RunPaths:
    """Where a run keeps its files: checkpoints/, metrics.csv, <name>.png, <name>_summary.json."""

    out_dir: Path
    name: str

    @property
    def checkpoints(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def metrics_csv(self) -> Path:
        return self.out_dir / "metrics.csv"

    @property
    def plot(self) -> Path:
        return self.out_dir / f"{self.name}.png"

    @property
    def summary(self) -> Path:
        return self.out_dir / f"{self.name}_summary.json"


def write_metrics_csv(path: Path, train_losses: list[float], val_history: list[dict], columns: Sequence[str]) -> None:
    """One row per validation: step, the mean train loss since the previous row, then `columns`
    of the validation record (e.g. val_lm_loss, lr); written atomically from the whole history,
    so a resumed run never duplicates rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["step", "train_loss", *columns])
    prev = 0
    for row in val_history:
        window = train_losses[prev : row["step"]]
        train = sum(window) / len(window) if window else None
        prev = row["step"]
        values = (train, *(row.get(c) for c in columns))
        writer.writerow([row["step"], *("" if v is None else f"{v:.6g}" for v in values)])
    write_text_atomic(path, buffer.getvalue())


def tensorboard_logger(out_dir: Path):
    """A TensorBoard logger under out_dir/tensorboard when tensorboard is installed, else False."""
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        return False
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(str(out_dir), name="tensorboard", version=0, default_hp_metric=False)


def check_resumable(state: TrainingState, cfg, run_defining: Sequence[str], recorded: dict | None = None) -> None:
    """Warn when a resumed run's settings (`run_defining` fields of `cfg`) or data sizes
    (`recorded`, compared with what the checkpoint's `extra` holds) differ from the
    checkpointed run's: it will not continue the same run."""
    saved = state.extra.get("config", {})
    now = asdict(cfg)
    changed = [k for k in run_defining if k in saved and saved[k] != now[k]]
    changed += [k for k, v in (recorded or {}).items() if k in state.extra and state.extra[k] != v]
    if changed:
        log.warning("resuming %s with changed %s: the run will not match an uninterrupted one", state.path, changed)


class StepModule(L.LightningModule):
    """Base of the loops: `trained` is the model being optimized; one Lightning batch is one
    optimizer step. Subclasses write `training_step` (ending with `self.end_step(loss)`),
    `validate` and what their checkpoint's `extra` holds."""

    def __init__(self, trained: nn.Module, cfg, paths: RunPaths, resume: TrainingState | None):
        super().__init__()
        self.automatic_optimization = False
        self.cfg = cfg
        self.paths = paths
        self.resume = resume
        self._trained = [trained]  # the subclass registers the module under its own name
        extra = resume.extra if resume is not None else {}
        self.step_count = resume.step if resume is not None else 0
        self.train_losses: list[float] = list(extra.get("train_losses", []))
        self.val_history: list[dict] = list(extra.get("val_history", []))

    def configure_optimizers(self):
        opt, sched = make_optimizer(self._trained[0], OptimConfig.of(self.cfg), self.cfg.steps)
        if self.resume is not None:
            opt.load_state_dict(self.resume.optimizer)
            sched.load_state_dict(self.resume.scheduler)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self):
        if self.resume is not None:
            restore_rng_state(self.resume.rng)

    def optimizer_step_done(self, loss: float) -> tuple[bool, bool]:
        """After the backward passes of a step: clip, step, schedule, count, and say whether this
        step validates and whether it checkpoints."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        if self.cfg.grad_clip > 0:
            self.clip_gradients(opt, gradient_clip_val=self.cfg.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        self.step_count += 1
        self.train_losses.append(loss)
        if self.logger:
            self.logger.log_metrics({"train/loss": loss, "train/lr": sched.get_last_lr()[0]}, step=self.step_count)
        last = self.step_count == self.cfg.steps
        return self.step_count % self.cfg.val_every == 0 or last, self.step_count % self.cfg.ckpt_every == 0 or last

    def save_state(self, config: dict, **recorded) -> None:
        """Checkpoint the step: weights, optimizer, schedule, RNG, the histories, `config` and
        what a resume compares (`recorded`, e.g. data sizes)."""
        extra = {
            "train_losses": self.train_losses,
            "val_history": self.val_history,
            "config": config,
            "sampler": {"next_step": self.step_count},
            **recorded,
        }
        save_training_state(
            self.paths.checkpoints, self.step_count, self._trained[0], self.optimizers(), self.lr_schedulers(),
            extra, keep_last=self.cfg.keep_last,
        )  # fmt: skip

    def save(self) -> None:
        """Checkpoint the current step (each loop passes its own `config` and `recorded` to
        `save_state`); also called when SIGTERM stops the fit."""
        raise NotImplementedError

    def save_on_sigterm(self) -> None:
        """Checkpoint the step reached, unless that step is already saved."""
        if not step_dir(self.paths.checkpoints, self.step_count).is_dir():
            log.warning("%s: SIGTERM, checkpointing step %d", type(self).__name__, self.step_count)
            self.save()

    def current_lr(self) -> float | None:
        return self.lr_schedulers().get_last_lr()[0] if self.step_count else None


class LossModule(StepModule):
    """The loop recovery and SFT share, given a loss: one Lightning batch is one optimizer step (a
    list of micro-batches). `step_loss(batch, backward)` backpropagates each micro-batch's share
    through `backward` and returns the step's loss; `val_metrics()` measures the model (at step 0,
    every `val_every` steps and at the end; `columns` of it go to metrics.csv); each checkpoint
    records `config` and `recorded` (e.g. data sizes) for a resume to compare. `frozen` modules
    (a teacher) move with the model but stay in eval mode."""

    def __init__(
        self, model: nn.Module, cfg, paths: RunPaths, resume: TrainingState | None, *,
        step_loss: Callable[[list, Callable], float], val_metrics: Callable[[], dict], columns: Sequence[str],
        config: dict, recorded: dict, frozen: Sequence[nn.Module] = (),
    ):  # fmt: skip
        super().__init__(model, cfg, paths, resume)
        self.model = model
        self.frozen = nn.ModuleList([m.requires_grad_(False).eval() for m in frozen])
        self.step_loss, self.val_metrics, self.columns = step_loss, val_metrics, tuple(columns)
        self.config, self.recorded = config, recorded

    def train(self, mode: bool = True):
        """Lightning puts the whole module in train mode; the frozen ones stay in eval."""
        super().train(mode)
        self.frozen.eval()
        return self

    def training_step(self, batch, batch_idx):
        if self.step_count == 0 and not self.val_history:
            self.validate()  # step-0 baseline
        validate, save = self.optimizer_step_done(self.step_loss(batch, self.manual_backward))
        if validate:
            self.validate()
        if save:
            self.save()

    def validate(self):
        was_training = self.model.training
        self.model.eval()
        metrics = self.val_metrics()
        self.model.train(was_training)
        self.val_history.append({"step": self.step_count, **metrics, "lr": self.current_lr()})
        if self.logger:
            logged = {f"val/{k.removeprefix('val_')}": v for k, v in metrics.items() if v is not None}
            self.logger.log_metrics(logged, step=self.step_count)
        self.write_reports()

    def write_reports(self):
        write_metrics_csv(self.paths.metrics_csv, self.train_losses, self.val_history, (*self.columns, "lr"))
        plot_training_curves(self.train_losses, self.val_history, self.paths.plot)

    def save(self):
        self.save_state(self.config, **self.recorded)


def resume_latest(checkpoints: Path, model: nn.Module, name: str) -> TrainingState | None:
    """The newest intact checkpoint under `checkpoints` loaded into `model`, or None when there is
    none. Debris of interrupted saves is removed first; an unreadable checkpoint is skipped for
    the one before it (a run that was killed while its disk filled keeps its earlier progress)."""
    removed = clean_checkpoint_debris(checkpoints)
    if removed:
        log.warning("%s: removed what interrupted saves left in %s: %s", name, checkpoints, removed)
    unreadable = []
    for ckpt in reversed(list_checkpoints(checkpoints)):
        try:
            resume = load_training_state(ckpt, model=model, restore_rng=False)
        except CheckpointError as e:
            log.warning("%s: skipping an unreadable checkpoint: %s", name, e)
            unreadable.append(str(e))
            continue
        log.info("%s: resuming from %s (step %d)", name, ckpt, resume.step)
        return resume
    if unreadable:  # the model may hold part of a failed load: never train on from that
        raise CheckpointError(f"every checkpoint in {checkpoints} is unreadable (move them away to start "
                              "afresh): " + "; ".join(unreadable))  # fmt: skip
    return None


def resume_or_seed(paths: RunPaths, model: nn.Module, cfg, run_defining: Sequence[str], recorded: dict) -> TrainingState | None:
    """`resume_latest` (settings checked against the checkpoint), or None after seeding
    everything with cfg.seed for a fresh run."""
    resume = resume_latest(paths.checkpoints, model, paths.name)
    if resume is None:
        L.seed_everything(cfg.seed, verbose=False)
        return None
    check_resumable(resume, cfg, run_defining, recorded)
    return resume


SIGTERM_EXIT_STATUS = 143  # 128 + SIGTERM: what a shell reports for a process ended by SIGTERM


class TrainingInterrupted(SystemExit):
    """SIGTERM stopped training at a step boundary (after a StepModule saved that step; a rerun
    resumes from it). A SystemExit with status 143, so the process exits non-zero (a scheduler
    must not read a preempted run as finished) and `except Exception` handlers let it pass."""

    def __init__(self, what: str):
        super().__init__(SIGTERM_EXIT_STATUS)
        self.what = what


class _CheckpointOnSigterm(L.Callback):
    """Call the module's `save_on_sigterm()` when Lightning stops the fit on SIGTERM: Lightning
    raises only between steps, and this hook runs before the trainer tears down (optimizers still
    attached)."""

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, SIGTERMException):
            pl_module.save_on_sigterm()


def restore_lightning_data_fetchers() -> None:
    """Point Lightning's fit, evaluation and prediction loops at Lightning's own
    `_select_data_fetcher` (undoing a process-wide wrapper another framework left there)."""
    from lightning.pytorch.loops import evaluation_loop, fit_loop, prediction_loop, utilities

    for loop_module in (fit_loop, evaluation_loop, prediction_loop):
        loop_module._select_data_fetcher = utilities._select_data_fetcher


def fit_module(module: L.LightningModule, loader, *, callbacks: Sequence[L.Callback] = (), **trainer_kwargs) -> L.Trainer:
    """`L.Trainer(**trainer_kwargs).fit(module, loader)` made safe for clusters; returns the trainer.

    - No Slurm auto-requeue: `LightningEnvironment` replaces the `SLURMEnvironment` Lightning
      detects from SLURM_* variables, whose SIGUSR1 handler writes `hpc_ckpt_<n>.ckpt` (a pickle
      of the whole module) and requeues the job. The loops checkpoint and resume themselves.
    - No hpc checkpoint restored: under Slurm, Lightning silently resumes from the newest
      `hpc_ckpt_*.ckpt` in its root directory (the working directory by default); the root
      directory here is an empty temporary one, removed afterwards.
    - SIGTERM: Lightning lets the current step finish, then raises `SIGTERMException`, a
      SystemExit without a code (exit status 0). A module with a `save_on_sigterm()` method (the
      StepModule loops, BLD waves, parent training) checkpoints that step first
      (`_CheckpointOnSigterm`); then `TrainingInterrupted` (status 143) is raised instead. A
      SIGTERM during the last step lets the fit end normally: the caller then calls
      `stop_if_terminated` once it has saved what the fit made.
    - Lightning's own data fetchers: a NeMo `MegatronStrategy` set up earlier in the same process
      leaves Lightning's loops selecting their data fetcher through a wrapper that returns None
      for any other strategy (`'NoneType' object has no attribute 'setup'`); the loops get
      Lightning's function back first (NeMo wraps it again at its next setup).
    """
    restore_lightning_data_fetchers()
    callbacks = list(callbacks)
    if hasattr(module, "save_on_sigterm"):
        callbacks.append(_CheckpointOnSigterm())
    with tempfile.TemporaryDirectory(prefix="lightning-root-") as root:
        trainer = L.Trainer(default_root_dir=root, plugins=[LightningEnvironment()], callbacks=callbacks, **trainer_kwargs)
        try:
            trainer.fit(module, loader)
        except SIGTERMException:
            log.warning("%s: stopped by SIGTERM; exiting with status %d", type(module).__name__, SIGTERM_EXIT_STATUS)
            raise TrainingInterrupted(type(module).__name__) from None
    return trainer


def stop_if_terminated(trainer: L.Trainer, what: str) -> None:
    """Raise `TrainingInterrupted` if the fit received SIGTERM (during its last step, which
    Lightning lets the fit finish): the job was asked to end, so it ends here, non-zero."""
    if trainer.received_sigterm:
        log.warning("%s: SIGTERM during the last step; exiting with status %d", what, SIGTERM_EXIT_STATUS)
        raise TrainingInterrupted(what)


def fit_steps(module: StepModule, loader, start: int, progress: bool, callbacks: Sequence[L.Callback] = ()) -> None:
    """Run `module` over `loader` (one batch per optimizer step) from step `start` to cfg.steps;
    on SIGTERM, checkpoint the step reached and raise `TrainingInterrupted` (see `fit_module`)."""
    cfg = module.cfg
    trainer = fit_module(
        module, loader, callbacks=callbacks,
        accelerator="auto", devices=1, precision=resolve_precision(cfg.precision), max_steps=cfg.steps - start,
        max_epochs=1, logger=tensorboard_logger(module.paths.out_dir), log_every_n_steps=1,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
        num_sanity_val_steps=0, use_distributed_sampler=False,
    )  # fmt: skip
    stop_if_terminated(trainer, module.paths.name)


def run_summary(module: StepModule, start: int, **extra) -> dict:
    """What a finished (or resumed-and-finished) run reports; also written to the summary file."""
    paths = module.paths
    if not paths.metrics_csv.is_file() and module.val_history:
        module.write_reports()
    last = latest(paths.checkpoints)
    summary = {
        "steps": module.step_count,
        "start_step": start,
        "final_train_loss": module.train_losses[-1] if module.train_losses else None,
        "val_history": module.val_history,
        **extra,
        "metrics_csv": str(paths.metrics_csv),
        "plot": str(paths.plot),
        "checkpoint_dir": str(paths.checkpoints),
        "last_checkpoint": str(last) if last is not None else None,
    }
    write_json_atomic(paths.summary, summary)
    return summary
