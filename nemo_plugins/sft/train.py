"""Reasoning-toggle SFT: masked next-token loss on response tokens, on a resumable Lightning loop.

The loop is `utils.training.LossModule`, the one recovery runs, given this file's `step_loss`:
manual optimization, one Lightning batch = one optimizer step = `grad_accum` micro-batches of `batch_size` rows, each micro-batch backpropagated on its
own (real accumulation) and weighted by its share of the step's counted tokens, so accumulating
2×B rows equals one step of 2B rows.

A *row* is what one micro-batch line holds. With `pack=True` the training examples are packed
once, whole, into rows of `max_len` tokens (a seeded shuffle, then first-fit: fixed for the run,
like an offline packed dataset); the forward gets per-example `positions` and the block-diagonal
`attn_mask`, so an example never attends to another, and the packing zeroes the loss at each
example's first token. With `pack=False` a row is one example, right-padded to the longest of its
micro-batch. Either way the loss counts response tokens only (the examples' loss masks).

The rows of step k depend on (seed, k) alone (`StepSampler` over rows), so a run resumed from the
checkpoint of step k, with its weights, optimizer, scheduler and RNG states, ends with the same
weights as an uninterrupted run. Files under `out_dir`: `checkpoints/step-*/`, `metrics.csv` and
`sft.png` (validation LM loss on response tokens every `val_every` steps, rewritten from the
checkpointed history so a resume never duplicates rows) and `sft_summary.json`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..data.sft_data import first_fit, pack_examples, packed_attention_mask
from ..model.llama import HeteroLlamaForCausalLM
from ..model.metrics import val_metrics
from ..model.train import TokenDataset, collate_with_validity, micro_batches
from ..utils.training import PRECISIONS, LossModule, RunPaths, StepSampler, fit_steps, resume_or_seed, run_summary

log = logging.getLogger("nemo_plugins.sft")

Example = tuple[list[int], list[int]]  # (ids, loss_mask)
# (ids, loss_mask, positions or None, segment_ids or None): one micro-batch
MicroBatch = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"]
# Fields that decide which rows each step sees: a resume with other values is another run.
_RUN_DEFINING = (
    "batch_size", "grad_accum", "seed", "max_len", "pack", "loss_average", "decision_weight", "decision_tokens",
    "close_weight", "close_tokens",
)  # fmt: skip
_PACK_SEED = 0x5F7  # second SeedSequence word of the packing shuffle (epochs use small ints)


LOSS_AVERAGES = ("token", "example")


@dataclass
class SFTConfig:
    steps: int = 100
    batch_size: int = 4  # rows per micro-batch (packed rows of max_len, or single examples)
    max_len: int = 128  # packing length; also the longest example accepted
    grad_accum: int = 1  # rows per optimizer step = batch_size × grad_accum
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # 0: no clipping
    precision: str = "auto"  # auto: bf16-mixed on a CUDA GPU with bf16, else 32-bit
    val_every: int = 25
    val_batches: int = 4  # batches of batch_size examples from the start of the val set; 0 = all
    ckpt_every: int = 50
    keep_last: int = 2
    seed: int = 0
    pack: bool = True
    # token: every response token weighs the same, so long thinking traces outweigh short direct
    # answers; example: each example's mean token loss weighs the same, whatever its length
    loss_average: str = "token"
    # extra weight on each of a response's first `decision_tokens` targets, the ones that pick the
    # mode (`<think>`, which a real tokenizer may spell in several tokens, or the answer): in units
    # of one token ("token") or of one whole example ("example"). 0: none
    decision_weight: float = 0.0
    decision_tokens: int = 1  # the sft stage sets 0 to the token count of the tokenizer's `<think>`
    # extra weight on each counted target that is part of a `close_tokens` sequence (the tokens of
    # `</think>`, which the sft stage fills in): the step out of the thinking trace, which a small
    # model may skip by ending its turn inside the block. Units as decision_weight. 0: none
    close_weight: float = 0.0
    close_tokens: list[int] = field(default_factory=list)

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_len", "grad_accum", "val_every", "ckpt_every", "keep_last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"sft.{name}={value!r}: expected a positive integer")
        if self.max_len < 2:
            raise ValueError(f"sft.max_len={self.max_len}: expected >= 2 (a prompt and a response token)")
        for name in ("val_batches", "warmup_steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"sft.{name}={value!r}: expected an integer >= 0")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"sft.lr={self.lr}: expected a finite number > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"sft.min_lr_ratio={self.min_lr_ratio}: expected a number in [0, 1]")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"sft.{name}={value}: expected a finite number >= 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"sft.precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if not isinstance(self.pack, bool):
            raise ValueError(f"sft.pack={self.pack!r}: expected true or false")
        if isinstance(self.decision_tokens, bool) or not isinstance(self.decision_tokens, int) or self.decision_tokens < 0:
            raise ValueError(f"sft.decision_tokens={self.decision_tokens!r}: expected an integer >= 0")
        for name in ("decision_weight", "close_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                raise ValueError(f"sft.{name}={value!r}: expected a finite number >= 0")
        if isinstance(self.close_tokens, (str, bytes)) or not isinstance(self.close_tokens, Sequence):
            raise ValueError(f"sft.close_tokens={self.close_tokens!r}: expected a list of token ids")
        self.close_tokens = list(self.close_tokens)
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.close_tokens):
            raise ValueError(f"sft.close_tokens={self.close_tokens!r}: expected token ids (integers >= 0)")
        if self.loss_average not in LOSS_AVERAGES:
            raise ValueError(f"sft.loss_average={self.loss_average!r}: expected one of {', '.join(LOSS_AVERAGES)}")

    def weighting(self) -> dict:
        """`target_weights`' keywords for this config."""
        return {"loss_average": self.loss_average, "decision_weight": self.decision_weight,
                "decision_tokens": self.decision_tokens, "close_weight": self.close_weight,
                "close_tokens": self.close_tokens}  # fmt: skip

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def train_fields(self) -> dict:
        """The SFTConfig fields only (a subclass's extra settings left out): what defines the run.
        The close weighting, added later, is left out while off, so earlier runs keep their keys."""
        off = ("close_weight", "close_tokens") if not self.close_weight else ()
        return {f.name: getattr(self, f.name) for f in fields(SFTConfig) if f.name not in off}


# ----------------------------------------------------------------------------- rows and micro-batches


def build_rows(examples: Sequence[Example], max_len: int, pack: bool, seed: int) -> list[list[int]]:
    """Example indices of each row: first-fit packing of a seeded shuffle, or one example a row.

    Every example must have 1..max_len tokens (tokenize with max_len to drop or cut longer ones).
    """
    for i, (ids, _) in enumerate(examples):
        if not 0 < len(ids) <= max_len:
            raise ValueError(
                f"training example {i} has {len(ids)} tokens; sft.max_len={max_len} (tokenize with max_len)"
            )
    if not pack:
        return [[i] for i in range(len(examples))]
    order = np.random.default_rng([seed, _PACK_SEED]).permutation(len(examples)).tolist()
    bins = first_fit([len(examples[i][0]) for i in order], max_len)
    return [[order[j] for j in b] for b in bins]


def packed_micro_batch(examples: Sequence[Example], rows: Sequence[Sequence[int]], max_len: int, pad_id: int = 0):
    """One micro-batch of packed rows, trailing all-padding columns trimmed (they change nothing)."""
    parts = [pack_examples([examples[i] for i in row], max_len, pad_id) for row in rows]
    keys = ("input_ids", "loss_mask", "position_ids", "segment_ids")
    ids, mask, pos, seg = (torch.cat([getattr(p, k) for p in parts]) for k in keys)
    width = int((seg > 0).sum(-1).max())
    return ids[:, :width], mask[:, :width], pos[:, :width], seg[:, :width]


def padded_micro_batch(examples: Sequence[Example], rows: Sequence[Sequence[int]], pad_id: int = 0):
    """One micro-batch of one example a row, right-padded (the causal mask keeps padding out)."""
    ids, mask, _ = collate_with_validity([examples[row[0]] for row in rows], pad_id)
    return ids, mask, None, None


def step_micro_batches(examples, rows, row_ids: Sequence[int], cfg: SFTConfig, pad_id: int = 0) -> list[MicroBatch]:
    """The micro-batches of one step: its rows `row_ids` in chunks of batch_size."""
    chunks = [[rows[r] for r in row_ids[i : i + cfg.batch_size]] for i in range(0, len(row_ids), cfg.batch_size)]
    if cfg.pack:
        return [packed_micro_batch(examples, c, cfg.max_len, pad_id) for c in chunks]
    return [padded_micro_batch(examples, c, pad_id) for c in chunks]


# ----------------------------------------------------------------------------- loss


def counted_tokens(loss_mask: torch.Tensor) -> int:
    """Targets `causal_lm_loss` averages over: mask 1 on a token that has a predecessor in the row."""
    return int(loss_mask[:, 1:].sum())


def response_starts(counted: torch.Tensor, n: int = 1) -> torch.Tensor:
    """[rows, T-1] 1 on each response's first `n` counted targets (a response is a run of counted
    targets; packing leaves every example's first token uncounted, so no run spans two examples)."""
    step = counted * (1 - F.pad(counted[:, :-1], (1, 0)))  # the first target of each run
    marks = torch.zeros_like(counted)
    for _ in range(max(1, n)):
        marks = marks + step
        step = F.pad(step[:, :-1], (1, 0)) * counted  # the next target, while the run lasts
    return marks


def sequence_marks(targets: torch.Tensor, counted: torch.Tensor, sequence: Sequence[int]) -> torch.Tensor:
    """[rows, T-1] 1 on every counted target that belongs to an occurrence of `sequence` (token ids)
    in `targets`, else 0."""
    k = len(sequence)
    marks = torch.zeros_like(counted)
    if k == 0 or targets.shape[1] < k:
        return marks
    seq = torch.tensor(list(sequence), device=targets.device)
    starts = (targets.unfold(1, k, 1) == seq).all(-1).to(counted.dtype)  # [rows, T-k]: an occurrence starts here
    for j in range(k):  # mark the occurrence's j-th token
        marks[:, j : j + starts.shape[1]] += starts
    return marks.clamp_max(1.0) * counted


def target_weights(
    mb: MicroBatch, loss_average: str = "token", decision_weight: float = 0.0, decision_tokens: int = 1,
    close_weight: float = 0.0, close_tokens: Sequence[int] = (),
) -> torch.Tensor:  # fmt: skip
    """[rows, T-1] weight of each next-token target: 1 on the counted ones ("token"), or
    1 / (its example's counted targets) ("example": every example sums to 1), plus
    `decision_weight` on each response's first `decision_tokens` targets (`response_starts`) and
    `close_weight` on each counted target inside a `close_tokens` sequence (`sequence_marks`).
    Examples are the packed segments, or the rows when not packed."""
    ids, loss_mask, _, segments = mb
    counted = loss_mask[:, 1:].float()
    if loss_average == "token":
        weights = counted
    else:
        seg = segments[:, 1:] if segments is not None else torch.ones_like(loss_mask[:, 1:])
        rows = torch.arange(seg.shape[0], device=seg.device)[:, None].expand_as(seg)
        example = rows * (int(seg.max()) + 1) + seg  # one id per (row, segment)
        per_example = torch.zeros(int(example.max()) + 1, device=seg.device).index_add_(
            0, example.reshape(-1), counted.reshape(-1)
        )
        weights = counted / per_example[example].clamp_min(1.0)
    if decision_weight:
        weights = weights + decision_weight * response_starts(counted, decision_tokens)
    if close_weight:
        weights = weights + close_weight * sequence_marks(ids[:, 1:], counted, close_tokens)
    return weights


def micro_loss_sum(model: HeteroLlamaForCausalLM, mb: MicroBatch, weighting: dict | None = None) -> torch.Tensor:
    """Weighted sum of the next-token losses of one micro-batch (`target_weights`; packed rows
    get positions + block mask)."""
    ids, loss_mask, positions, segments = mb
    attn = packed_attention_mask(segments) if segments is not None else None
    logits = model(ids, positions=positions, attn_mask=attn)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return (nll.view_as(ids[:, 1:]) * target_weights(mb, **(weighting or {}))).sum()


def step_loss(model: HeteroLlamaForCausalLM, batch: Sequence[MicroBatch], backward=None, **weighting) -> float:
    """The step's weighted mean loss (`target_weights(mb, **weighting)`: over its counted tokens
    or its examples, decision targets weighted up); each micro-batch's share is backpropagated
    separately through `backward` (e.g. Lightning's manual_backward) if given."""
    total_weight = max(1.0, sum(float(target_weights(mb, **weighting).sum()) for mb in batch))
    total = 0.0
    for mb in batch:
        loss = micro_loss_sum(model, mb, weighting) / total_weight
        if backward is not None:
            backward(loss)
        total += float(loss.detach())
    return total


# ----------------------------------------------------------------------------- entry point


def run_sft(
    model: HeteroLlamaForCausalLM,
    train_examples: Sequence[Example],
    val_examples: Sequence[Example],
    cfg: SFTConfig,
    out_dir: str | Path,
    progress: bool = False,
    callbacks: Sequence[L.Callback] = (),
    *,
    pad_id: int = 0,
) -> dict:
    """Train `model` in place for `cfg.steps` optimizer steps on (ids, loss_mask) examples,
    resuming from the newest checkpoint in `out_dir/checkpoints` if there is one; returns a
    summary (steps, start step, final train loss, validation history, packing, paths)."""
    if not train_examples:
        raise ValueError("run_sft: train_examples is empty")
    if not val_examples:
        raise ValueError("run_sft: val_examples is empty")
    if cfg.close_weight and not cfg.close_tokens:
        raise ValueError(f"sft.close_weight={cfg.close_weight}: needs sft.close_tokens (the token ids of `</think>`)")
    paths = RunPaths(Path(out_dir), "sft")
    rows = build_rows(train_examples, cfg.max_len, cfg.pack, cfg.seed)
    data = _data_stats(train_examples, rows, cfg)
    if len(rows) < cfg.rows_per_step:
        raise ValueError(f"{len(rows)} training rows < sft.batch_size × sft.grad_accum = {cfg.rows_per_step}")
    resume = resume_or_seed(paths, model, cfg, _RUN_DEFINING, {"data": data})
    start = resume.step if resume is not None else 0
    n_val = cfg.val_batches * cfg.batch_size or len(val_examples)
    val_batches = micro_batches(list(val_examples)[:n_val], cfg.batch_size, pad_id)
    module = LossModule(
        model, cfg, paths, resume,
        step_loss=lambda batch, backward: step_loss(model, batch, backward, **cfg.weighting()),
        val_metrics=lambda: {"val_lm_loss": val_metrics(model, None, val_batches)["val_lm_loss"]},
        columns=("val_lm_loss",), config=cfg.train_fields(), recorded={"data": data},
    )  # fmt: skip
    if start < cfg.steps:
        _fit(module, train_examples, rows, cfg, start, pad_id, progress, callbacks)
    model.eval()
    return run_summary(module, start, data=data)


def _data_stats(examples: Sequence[Example], rows: list[list[int]], cfg: SFTConfig) -> dict:
    tokens = sum(len(ids) for ids, _ in examples)
    fill = tokens / (len(rows) * cfg.max_len) if cfg.pack else None
    return {"examples": len(examples), "tokens": tokens, "rows": len(rows), "pack_fill": fill}


def _fit(module: LossModule, examples, rows, cfg: SFTConfig, start: int, pad_id, progress, callbacks):
    sampler = StepSampler(len(rows), cfg.rows_per_step, cfg.seed, start, cfg.steps)
    loader = DataLoader(
        TokenDataset(range(len(rows))), batch_sampler=sampler,
        collate_fn=lambda row_ids: step_micro_batches(examples, rows, row_ids, cfg, pad_id),
    )  # fmt: skip
    fit_steps(module, loader, start, progress, callbacks)


__all__ = ["SFTConfig", "build_rows", "run_sft", "step_loss", "step_micro_batches"]
