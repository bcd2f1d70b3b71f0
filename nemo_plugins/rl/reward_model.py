"""A reward model: the policy's architecture with a scalar head, trained on preference pairs.

The score of a sequence is a linear head (hidden → 1, with bias) on the final-norm hidden state of
its last non-pad token, so left- and right-padded batches score alike (positions are counted over
the real tokens). Training minimizes the Bradley-Terry loss −log σ(r_chosen − r_rejected) over
pairs, on the loop recovery and SFT share (`utils.training.LossModule`: resumable, with
metrics.csv and a plot); it validates on held-out pairs at step 0 (the untrained accuracy), every
`val_every` steps and at the end. Pair accuracy counts r_chosen > r_rejected as 1 and a tie as ½
(an untrained constant scorer sits at chance, 0.5).

Saved into a directory as the model directory `model/` (`model.checkpoint.save_checkpoint`:
config + safetensors, loadable as a plain causal LM) and beside it the head,
`reward_head.safetensors`, and `reward_model.json` (`score_sequences` scores token sequences
with it, e.g. an RL rollout's prompt + completion).

`RewardModelScorer` puts it behind the reward protocol (`scoring.Scorer`): completions scored
as text, encoded as the reward model was trained, or as the token ids that were sampled.
"""

from __future__ import annotations

import functools
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save as save_bytes
from torch import nn
from torch.utils.data import DataLoader

from ..data.chat_tokenizer import ChatTokenizer, as_chat
from ..errors import CheckpointError
from ..model.checkpoint import load_checkpoint, save_checkpoint
from ..model.llama import HeteroLlamaForCausalLM
from ..utils import checks
from ..utils.atomic import write_bytes_atomic, write_json_atomic
from ..utils.training import PRECISIONS, LossModule, RunPaths, StepSampler, fit_steps, resume_or_seed, run_summary
from .scoring import Reference, Scores

MODEL_DIR = "model"
HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"
PairIds = tuple[list[int], list[int]]  # (chosen ids, rejected ids), prompt included
_RUN_DEFINING = ("batch_size", "grad_accum", "seed")


@dataclass
class RewardModelConfig:
    """Training settings of the reward model (the optimizer fields are `utils.training.OptimConfig`'s)."""

    steps: int = 40
    batch_size: int = 16  # pairs per micro-batch
    grad_accum: int = 1  # pairs per step = batch_size × grad_accum
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0: no clipping
    precision: str = "auto"
    val_every: int = 10
    ckpt_every: int = 20
    keep_last: int = 1
    seed: int = 0

    def __post_init__(self):
        checks.positive_ints(self, "reward_model", "steps", "batch_size", "grad_accum", "val_every", "ckpt_every",
                             "keep_last")  # fmt: skip
        checks.non_negative_ints(self, "reward_model", "warmup_steps", "seed")
        checks.positive_numbers(self, "reward_model", "lr")
        checks.fractions(self, "reward_model", "min_lr_ratio")
        checks.non_negative_numbers(self, "reward_model", "weight_decay", "grad_clip")
        if self.precision not in PRECISIONS:
            raise ValueError(f"reward_model.precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")

    @property
    def pairs_per_step(self) -> int:
        return self.batch_size * self.grad_accum


# ----------------------------------------------------------------------------- the model


def last_token_index(valid: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's last real (valid) token, whatever side the padding is on."""
    T = valid.shape[1]
    return T - 1 - valid.bool().flip(1).int().argmax(1)


class RewardModel(nn.Module):
    """`backbone` (a HeteroLlamaForCausalLM; its lm_head is kept but unused) and a scalar `head`."""

    def __init__(self, backbone: HeteroLlamaForCausalLM, head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        if head is None:
            head = nn.Linear(backbone.config.hidden_size, 1)
            nn.init.normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        self.head = head

    def forward(self, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B] scores of padded sequences; `valid` [B, T] marks real tokens (either padding side)."""
        positions = (valid.long().cumsum(1) - 1).clamp_min(0)
        hidden = self.backbone.hidden_states(input_ids, positions=positions, key_valid=valid)
        last = hidden[torch.arange(len(hidden), device=hidden.device), last_token_index(valid)]
        return self.head(last.to(self.head.weight.dtype)).squeeze(-1)


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, valid) [B, T] of `seqs` padded with `pad_id` on `side` ("left" or "right")."""
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    valid = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, cols], valid[i, cols] = torch.tensor(list(s), dtype=torch.long), 1
    return ids, valid


def score_pairs(rm: RewardModel, pairs: Sequence[PairIds], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected) [P] of pairs, scored in one batch of 2P sequences."""
    ids, valid = pad([c for c, _ in pairs] + [r for _, r in pairs], pad_id)
    scores = rm(ids.to(rm.head.weight.device), valid.to(rm.head.weight.device))
    return scores[: len(pairs)], scores[len(pairs) :]


@torch.no_grad()
def score_sequences(rm: RewardModel, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """[N] float32 CPU scores of token sequences (prompt + response), `batch_size` per forward, in
    eval mode (restored after)."""
    was_training = rm.training
    rm.eval()
    device = rm.head.weight.device
    out = []
    try:
        for i in range(0, len(seqs), batch_size):
            ids, valid = pad(seqs[i : i + batch_size], pad_id)
            out.append(rm(ids.to(device), valid.to(device)).float().cpu())
    finally:
        rm.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


class RewardModelScorer:
    """The reward protocol over a frozen reward model: `total` (and part "reward_model") is its
    score of the question, under the reference's thinking mode, followed by the completion.

    `score` encodes that text as the reward model's training pairs are encoded
    (`ChatTokenizer.example_ids`: the chat template's prompt, then the response and its end of
    turn), so any loop or evaluation that holds texts can use it. `score_ids` scores token
    sequences as they were sampled (prompt ids + generated ids): RPO uses it, since a rollout's
    tokens need not be the tokenizer's own encoding of their text, and a truncated response has
    no end of turn. No failures: a model forward cannot time out."""

    def __init__(self, reward_model: RewardModel, chat: ChatTokenizer, batch_size: int = 64):
        self.reward_model, self.chat, self.batch_size = reward_model.requires_grad_(False).eval(), as_chat(chat), batch_size

    def score(self, completions: Sequence[str], references: Sequence[Reference]) -> Scores:
        if len(completions) != len(references):
            raise ValueError(f"{len(completions)} completions, {len(references)} references: expected equal")
        blank = [i for i, r in enumerate(references) if not r.question]
        if blank:
            raise ValueError(f"reference {blank[0]} has no question: a reward model scores the question with the response")
        seqs = [self.chat.example_ids(r.question, text, r.thinking)[0] for text, r in zip(completions, references)]
        scores = self.score_ids(seqs)
        return Scores(scores, {"reward_model": scores}, Counter())

    def score_ids(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """[N] float32 scores of token sequences (`score_sequences`, `batch_size` per forward)."""
        return score_sequences(self.reward_model, seqs, self.chat.pad_id, self.batch_size)

    def close(self) -> None:
        pass

    def __enter__(self) -> RewardModelScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- loss and accuracy


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of −log σ(r_chosen − r_rejected) (computed as softplus(−Δ), stable for any Δ)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pair_wins(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """[P] 1 where chosen outscores rejected, ½ on a tie, 0 otherwise."""
    return (r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()


@torch.no_grad()
def evaluate_pairs(
    rm: RewardModel, pairs: Sequence[PairIds], pad_id: int, batch_size: int = 32, kinds: Sequence[str] | None = None
) -> dict:
    """Held-out pair accuracy, BT loss, mean margin, and (with `kinds`, one per pair) accuracy by kind."""
    was_training = rm.training
    rm.eval()
    wins, losses, margins = [], [], []
    for i in range(0, len(pairs), batch_size):
        rc, rr = score_pairs(rm, pairs[i : i + batch_size], pad_id)
        wins.append(pair_wins(rc, rr))
        losses.append(-F.logsigmoid(rc - rr))
        margins.append(rc - rr)
    rm.train(was_training)
    w = torch.cat(wins)
    out = {"val_accuracy": float(w.mean()), "val_bt_loss": float(torch.cat(losses).mean()),
           "val_margin": float(torch.cat(margins).mean())}  # fmt: skip
    if kinds is not None:
        by = defaultdict(list)
        for k, v in zip(kinds, w.tolist(), strict=True):
            by[k].append(v)
        out["accuracy_by_kind"] = {k: sum(v) / len(v) for k, v in sorted(by.items())}
    return out


def step_loss(rm: RewardModel, pad_id: int, batch: list[list[PairIds]], backward=None) -> float:
    """The step's mean BT loss over its pairs; each micro-batch's share is backpropagated on its own."""
    n_pairs = sum(len(m) for m in batch)
    total = 0.0
    for micro in batch:
        rc, rr = score_pairs(rm, micro, pad_id)
        loss = bradley_terry_loss(rc, rr) * (len(micro) / n_pairs)
        if backward is not None:
            backward(loss)
        total += float(loss.detach())
    return total


# ----------------------------------------------------------------------------- training


def train_reward_model(
    rm: RewardModel, train_pairs: Sequence[PairIds], val_pairs: Sequence[PairIds], cfg: RewardModelConfig,
    out_dir: str | Path, *, pad_id: int, progress: bool = False,
) -> dict:  # fmt: skip
    """Train `rm` in place for `cfg.steps` steps (resuming from `out_dir/checkpoints` if a run was
    interrupted) and return the run summary with `untrained_accuracy` (step 0) and `accuracy`
    (last validation) on `val_pairs`."""
    if not val_pairs:
        raise ValueError("train_reward_model: val_pairs is empty")
    paths = RunPaths(Path(out_dir), "reward_model")
    recorded = {"num_train_pairs": len(train_pairs)}
    resume = resume_or_seed(paths, rm, cfg, _RUN_DEFINING, recorded)
    start = resume.step if resume is not None else 0
    val = list(val_pairs)
    module = LossModule(
        rm, cfg, paths, resume, step_loss=functools.partial(step_loss, rm, pad_id),
        val_metrics=lambda: evaluate_pairs(rm, val, pad_id, cfg.batch_size), columns=("val_accuracy", "val_bt_loss"),
        config=asdict(cfg), recorded=recorded,
    )  # fmt: skip
    if start < cfg.steps:
        train = list(train_pairs)
        sampler = StepSampler(len(train), cfg.pairs_per_step, cfg.seed, start, cfg.steps)
        chunk = cfg.batch_size
        loader = DataLoader(train, batch_sampler=sampler,
                            collate_fn=lambda ps: [ps[i : i + chunk] for i in range(0, len(ps), chunk)])  # fmt: skip
        fit_steps(module, loader, start, progress)
    rm.eval()
    history = module.val_history
    return run_summary(module, start, untrained_accuracy=history[0]["val_accuracy"], accuracy=history[-1]["val_accuracy"])


# ----------------------------------------------------------------------------- save and load


def save_reward_model(rm: RewardModel, path: str | Path, extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write `path/model/` (the backbone as a model directory, with `extra_files` such as the
    tokenizer), `path/reward_head.safetensors` and `path/reward_model.json`, each atomically, and
    nothing else in `path` (a stage keeps its report beside them). The head sits outside the
    model directory, whose loader reads every *.safetensors in it as weights."""
    path = Path(path)
    head = {k: v.detach().contiguous().cpu() for k, v in rm.head.state_dict().items()}
    meta = {"model": MODEL_DIR, "head": HEAD_FILE, "hidden_size": rm.backbone.config.hidden_size,
            "score": "linear head on the final-norm hidden state of the last non-pad token"}  # fmt: skip
    save_checkpoint(rm.backbone, path / MODEL_DIR, extra_files=extra_files)
    write_bytes_atomic(path / HEAD_FILE, save_bytes(head, metadata={"format": "pt"}))
    write_json_atomic(path / META_FILE, meta)
    return path


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> RewardModel:
    """A reward model written by `save_reward_model`."""
    path = Path(path)
    if not (path / HEAD_FILE).is_file():
        raise CheckpointError(f"{path}: no {HEAD_FILE} (not a reward model directory)")
    backbone = load_checkpoint(path / MODEL_DIR, device=device)
    state = load_file(str(path / HEAD_FILE), device=str(device))
    hidden = backbone.config.hidden_size
    if set(state) != {"weight", "bias"} or tuple(state["weight"].shape) != (1, hidden) or tuple(state["bias"].shape) != (1,):
        raise CheckpointError(f"{path / HEAD_FILE}: expected weight [1, {hidden}] and bias [1]")
    head = nn.Linear(hidden, 1, device=device, dtype=state["weight"].dtype)
    head.load_state_dict(state)
    return RewardModel(backbone, head).eval()
