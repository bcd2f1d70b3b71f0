"""Blockwise local distillation (BLD) of the whole block library in one loop.

Each batch runs the frozen parent once; every variant then learns, from the parent's own input
activations, to reproduce the parent sub-block's output (normalized MSE
`mse(y, t) / mse(t, 0)` over real tokens). Variants share no parameters, so one summed loss
trains them all independently (gradients are clipped per variant). Variants are trained in
waves; each finished variant is saved at once, and a restarted run skips the saved ones. Within a
wave, the students and their optimizer are checkpointed every `ckpt_every` steps and on SIGTERM
(`wave-rank<r>/` in the library directory), so a killed wave resumes from its last checkpoint and
ends with the weights an uninterrupted one would have.
Several processes split the library: each takes every `world_size`-th variant (`shard`) and
all write into the same directory. `puzzle.launch.run_bld_processes` starts one per local GPU
(`bld.processes`); `rank` / `world_size` let an outside launcher (torchrun, Slurm, NeMo-Run)
give each process its share.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from ..errors import CheckpointError
from ..utils import checks
from ..model.llama import Block, HeteroLlamaForCausalLM
from ..model.train import ShuffledBatches, TokenDataset, collate_with_validity
from ..utils.atomic import write_bytes_atomic, write_json_atomic
from ..utils.resume import TrainingState, latest, list_checkpoints, load_training_state, save_training_state
from ..utils.training import OptimConfig, cosine_schedule, fit_module, resume_latest, stop_if_terminated
from .activations import capture, run_student, student_io
from .library import Variant

log = logging.getLogger("nemo_plugins.puzzle")


@dataclass
class BLDConfig:
    steps: int = 150
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    wave_size: int = 0  # variants trained together; 0 = all at once
    processes: int = 0  # local processes that split the library: 0 = one per visible GPU (1 without)
    rank: int = 0  # this process's share when an outside launcher splits the library
    world_size: int = 1
    seed: int = 0
    ckpt_every: int = 100  # steps between a wave's checkpoints (0: only on SIGTERM)

    def __post_init__(self):
        checks.positive_ints(self, "puzzle.bld", "steps", "batch_size", "world_size")
        checks.non_negative_ints(self, "puzzle.bld", "warmup_steps", "wave_size", "seed", "ckpt_every")
        checks.positive_numbers(self, "puzzle.bld", "lr")
        checks.non_negative_numbers(self, "puzzle.bld", "weight_decay", "grad_clip")
        if self.processes < 0:
            raise ValueError(f"bld.processes={self.processes}: expected 0 (one per GPU) or a positive count")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"bld.rank={self.rank}: expected 0 <= rank < world_size={self.world_size}")


def shard(variants, rank: int, world_size: int) -> list[Variant]:
    """Process `rank`'s share of the variants: every `world_size`-th in key order."""
    return [v for i, v in enumerate(sorted(variants, key=lambda v: v.key)) if i % world_size == rank]


def normalized_mse(y: torch.Tensor, t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """mse(y, t) / mse(t, 0) over the valid tokens [B, T]."""
    m = valid[..., None].to(y.dtype)
    return ((y - t).pow(2) * m).sum() / (t.pow(2) * m).sum().clamp_min(1e-12)


def variant_path(library_dir: Path, v: Variant) -> Path:
    return Path(library_dir) / "variants" / v.group / f"{v.name}.safetensors"


def save_variant(library_dir: Path, v: Variant, block: Block, metadata: dict[str, str]) -> Path:
    """Atomically write the variant's own weights (names relative to its layer)."""
    from safetensors.torch import save as save_bytes

    state = {k: t.detach().contiguous().cpu() for k, t in block.state_dict().items()}
    path = variant_path(library_dir, v)
    write_bytes_atomic(path, save_bytes(state, metadata={k: str(val) for k, val in metadata.items()}))
    return path


SPEED_KEYS = ("variants", "tokens", "variant_tokens", "seconds")


def speed_path(library_dir: Path, rank: int = 0) -> Path:
    """Where BLD records how fast it trained (tokens, variant-tokens, seconds) for `rank`."""
    return Path(library_dir) / f"bld-speed-rank{rank}.json"


def bld_speed(library_dir: Path) -> dict | None:
    """The training throughput of the library, summed over the ranks that trained it: tokens/s
    (parent tokens: each one trains every variant of its wave) and variant-tokens/s; None when
    nothing recorded it (a library trained before this was kept, or only untrained variants)."""
    files = sorted(Path(library_dir).glob("bld-speed-rank*.json"))
    if not files:
        return None
    rows = [json.loads(f.read_text()) for f in files]
    total = {k: sum(r[k] for r in rows) for k in SPEED_KEYS}
    seconds = max(r["seconds"] for r in rows)  # ranks train side by side
    return {**total, "ranks": len(rows), "tokens_per_s": total["tokens"] / seconds,
            "variant_tokens_per_s": total["variant_tokens"] / seconds}  # fmt: skip


def load_variant_state(library_dir: Path, v: Variant) -> dict[str, torch.Tensor]:
    return load_file(str(variant_path(library_dir, v)))


def _module_key(v: Variant) -> str:
    return v.key.replace(".", "_").replace("/", "__")


class BLDModule(L.LightningModule):
    """Frozen parent + the students of one wave.

    Each student's loss depends only on its own weights (its input and target are the frozen
    parent's activations), so each one backpropagates as soon as it is computed: one student's
    graph is alive at a time instead of the whole wave's, with the same gradients as summing the
    losses (manual optimization, one optimizer step per batch). `checkpoints`: where the wave
    saves itself every `cfg.ckpt_every` steps and on SIGTERM; `resume`: what it continues."""

    def __init__(
        self, parent: HeteroLlamaForCausalLM, students: dict[Variant, Block], cfg: BLDConfig, checkpoints: Path,
        resume: TrainingState | None = None,
    ):  # fmt: skip
        super().__init__()
        self.automatic_optimization = False
        self.parent = parent.requires_grad_(False).eval()
        self.variants = {_module_key(v): v for v in students}
        self.students = nn.ModuleDict({_module_key(v): b for v, b in students.items()})
        self.cfg, self.checkpoints, self.resume = cfg, Path(checkpoints), resume
        extra = resume.extra if resume is not None else {}
        self.step_count = resume.step if resume is not None else 0
        self.last_losses: dict[str, float] = dict(extra.get("last_losses", {}))
        self.tokens = 0  # real (non-pad) tokens trained on in this process, for the throughput figure

    def training_step(self, batch, batch_idx):
        ids, valid = batch
        self.tokens += int(valid.sum())
        acts = capture(self.parent, ids, logits=False)
        opt, sched = self.optimizers(), self.lr_schedulers()
        opt.zero_grad(set_to_none=True)
        for key, block in self.students.items():
            v = self.variants[key]
            x, target = student_io(v, acts)
            loss = normalized_mse(run_student(block, v, x, acts), target, valid)
            self.manual_backward(loss)
            # per variant: one variant's spike must not shrink the others' steps
            torch.nn.utils.clip_grad_norm_(block.parameters(), self.cfg.grad_clip)
            self.last_losses[key] = float(loss.detach())
        opt.step()
        sched.step()
        self.step_count += 1
        mean = sum(self.last_losses[k] for k in self.students) / max(1, len(self.students))
        self.log("bld_loss", mean, prog_bar=True, on_step=True)
        if self.cfg.ckpt_every and self.step_count % self.cfg.ckpt_every == 0 and self.step_count < self.cfg.steps:
            self.save()

    def configure_optimizers(self):
        params = [p for b in self.students.values() for p in b.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, betas=(0.9, 0.95), weight_decay=self.cfg.weight_decay)
        sched_cfg = OptimConfig(lr=self.cfg.lr, warmup_steps=self.cfg.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_schedule(s, self.cfg.steps, sched_cfg))
        if self.resume is not None:
            opt.load_state_dict(self.resume.optimizer)
            sched.load_state_dict(self.resume.scheduler)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def save(self) -> None:
        """Checkpoint the wave at the current step (the students, their optimizer and schedule)."""
        extra = {"variants": sorted(self.variants), "last_losses": self.last_losses}
        save_training_state(self.checkpoints, self.step_count, self.students, self.optimizers(), self.lr_schedulers(),
                            extra, keep_last=1)  # fmt: skip

    def save_on_sigterm(self) -> None:
        """Called by `fit_module` when SIGTERM stops the fit: the rerun continues from this step."""
        if self.step_count < self.cfg.steps:
            log.warning("BLD: SIGTERM, checkpointing the wave at step %d", self.step_count)
            self.save()


def _resume_wave(checkpoints: Path, students: nn.ModuleDict, keys: list[str]) -> TrainingState | None:
    """The wave's checkpoint loaded into `students` when it is of these variants; a checkpoint of
    another wave (the library split differently) is removed."""
    if not list_checkpoints(checkpoints):
        return None
    try:  # the state alone (no weights loaded yet): which wave it is
        variants = load_training_state(latest(checkpoints), restore_rng=False).extra.get("variants")
    except CheckpointError as e:
        variants = f"unreadable: {e}"
    if variants != sorted(keys):
        log.warning("BLD: %s holds another wave (%s); starting this one afresh", checkpoints, variants)
        shutil.rmtree(checkpoints, ignore_errors=True)
        return None
    return resume_latest(checkpoints, students, "BLD")


def run_bld(
    parent: HeteroLlamaForCausalLM,
    students: dict[Variant, Block],
    examples: list[tuple[list[int], list[int]]],
    library_dir: Path,
    cfg: BLDConfig,
    *,
    exact: set[Variant] = frozenset(),
    pad_id: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Train every student not yet saved in `library_dir`; returns {variant key: final loss}.

    Students without parameters (no-ops), students whose initialization is already exact
    (`exact`: the parent's own sub-blocks) and students already saved are not trained; the
    caller passes students already initialized from the parent.

    On SIGTERM, raises `TrainingInterrupted` (exit status 143) after the current step: the
    interrupted wave is checkpointed, not saved as variants (a half-trained variant would pass
    for a finished one); the waves before it are saved, and a rerun trains only what is missing,
    continuing the interrupted wave from its checkpoint.
    """
    mine = shard(students, cfg.rank, cfg.world_size)
    todo = [v for v in mine if not variant_path(library_dir, v).is_file()]
    for v in todo:
        if v in exact or not any(True for _ in students[v].parameters()):
            save_variant(library_dir, v, students[v], {"bld_loss": "0.0" if v in exact else "nan", "trained": "false"})
    todo = [v for v in todo if not variant_path(library_dir, v).is_file()]
    skipped = len(mine) - len(todo)
    if skipped:
        log.info("BLD: %d of %d variants already in %s", skipped, len(mine), library_dir)
    wave = cfg.wave_size or len(todo) or 1
    losses: dict[str, float] = {}
    speed_file = speed_path(library_dir, cfg.rank)  # accumulated over resumed runs
    speed = json.loads(speed_file.read_text()) if speed_file.is_file() else dict.fromkeys(SPEED_KEYS, 0)
    checkpoints = Path(library_dir) / f"wave-rank{cfg.rank}"
    for start in range(0, len(todo), wave):
        started = time.perf_counter()
        chunk = {v: students[v] for v in todo[start : start + wave]}
        L.seed_everything(cfg.seed, verbose=False)
        keys = [_module_key(v) for v in chunk]
        resume = _resume_wave(checkpoints, nn.ModuleDict({_module_key(v): b for v, b in chunk.items()}), keys)
        module = BLDModule(parent, chunk, cfg, checkpoints, resume)
        loader = DataLoader(
            TokenDataset(examples), batch_sampler=ShuffledBatches(len(examples), cfg.batch_size, cfg.seed,
                                                               module.step_count, cfg.steps),
            collate_fn=lambda b: collate_with_validity(b, pad_id)[::2],  # (ids, real)
        )  # fmt: skip
        trainer = fit_module(
            module, loader, accelerator="auto", devices=1,
            max_steps=cfg.steps - module.step_count, max_epochs=1, logger=False, enable_checkpointing=False,
            enable_model_summary=False, enable_progress_bar=progress, num_sanity_val_steps=0,
            use_distributed_sampler=False,
        )  # fmt: skip
        for key, v in module.variants.items():
            loss = module.last_losses.get(key, float("nan"))
            save_variant(library_dir, v, module.students[key], {"bld_loss": loss, "trained": "true"})
            losses[v.key] = loss
        shutil.rmtree(checkpoints, ignore_errors=True)  # the wave is saved as variants
        speed["seconds"] += time.perf_counter() - started
        speed["variants"] += len(chunk)
        speed["tokens"] += module.tokens
        speed["variant_tokens"] += module.tokens * len(chunk)
        write_json_atomic(speed_file, speed)
        log.info("BLD: saved %d variants (%d/%d), %.0f tokens/s", len(chunk), start + len(chunk), len(todo),
                 module.tokens / max(speed["seconds"], 1e-9))  # fmt: skip
        stop_if_terminated(trainer, "BLD")  # SIGTERM in the wave's last step, if the fit finished: the wave is saved
    return losses

