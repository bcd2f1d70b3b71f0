"""The `sft` stage: teach the reasoning toggle ("detailed thinking on/off") by SFT on paired data.

Training examples: the tiny world's training problems in both modes (`world_paired_examples`:
`<think>steps</think>The answer is N.` under "on", `The answer is N.` under "off"), plus any
`train_jsonl` files (plain messages or Llama-Nemotron-Post-Training records), all tokenized with
`max_len`. Validation: the same pairs for the world's held-out problems. The toggle is measured
on held-out problems before and after (`evaluate_toggle`); the SFT model is saved with its
tokenizer to `out_dir/model`, the report to `out_dir/report.json`.

Resumable: the run lives in `out_dir/run-<key>`, the key hashing the training settings, the
tokenized training data and the starting weights, so a rerun continues (or, when finished,
reuses) its own run and a changed setting, data set or starting model starts afresh. The toggle
evaluations are cached with the settings they were made with: after training in the run, before
it beside the runs, keyed by the starting weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..data.sft_data import (
    ChatExample,
    read_messages_jsonl,
    read_nemotron_jsonl,
    tokenize_examples,
)
from ..data.chat import THINK_END, THINK_START
from ..data.problems import ProblemSet
from ..data.reasoning_world import is_correct
from ..data.tiny_world import World
from ..utils.hashing import config_hash
from ..data.chat_tokenizer import ChatTokenizer
from ..model.checkpoint import fingerprint, save_checkpoint
from ..model.llama import HeteroLlamaForCausalLM
from ..utils.atomic import write_json_atomic
from .toggle_eval import evaluate_toggle
from .train import SFTConfig, run_sft

log = logging.getLogger("nemo_plugins.sft")

JSONL_FORMATS = {"messages": read_messages_jsonl, "nemotron": read_nemotron_jsonl}


@dataclass
class SFTStageConfig(SFTConfig):
    decision_tokens: int = 0  # 0: the token count of the tokenizer's `<think>` (see SFTConfig)
    # close_tokens (SFTConfig) empty with close_weight > 0: the tokenizer's spelling of `</think>`
    world_problems: int = 2000  # world.train problems used, each in both modes (0: none)
    val_problems: int = 64  # world.eval problems for the validation loss, each in both modes
    train_jsonl: list[str] = field(default_factory=list)  # extra SFT data files (real data)
    jsonl_format: str = "messages"  # messages | nemotron (Llama-Nemotron-Post-Training-Dataset)
    on_error: str = "skip"  # skip | raise: a malformed JSONL record
    overflow: str = "drop"  # drop | truncate: an example longer than max_len
    eval_problems: int = 250  # world.eval problems for the toggle evaluation
    eval_batch_size: int = 64
    max_new_tokens: int = 64
    # > 1: the toggle evaluation decodes with this repetition penalty (`SamplingConfig`), and the
    # report adds the SFT model's plain greedy scores as `after_without_penalty`
    repetition_penalty: float = 1.0
    # thinking-off answers' penalty (null: repetition_penalty): short answers need no loop breaker
    repetition_penalty_off: float | None = None
    # with a penalty, also score plain greedy (`after_without_penalty`); false skips that third
    # evaluation (on a small model's looping traces the slowest one)
    eval_without_penalty: bool = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("repetition_penalty", "repetition_penalty_off"):
            rp = getattr(self, name)
            if name.endswith("_off") and rp is None:
                continue
            if isinstance(rp, bool) or not isinstance(rp, (int, float)) or not 1.0 <= rp < math.inf:
                raise ValueError(f"sft.{name}={rp!r}: expected a finite number >= 1 (1 is off)")
        for name in ("world_problems",):
            if isinstance(getattr(self, name), bool) or getattr(self, name) < 0:
                raise ValueError(f"sft.{name}={getattr(self, name)!r}: expected an integer >= 0")
        for name in ("val_problems", "eval_problems", "eval_batch_size", "max_new_tokens"):
            if isinstance(getattr(self, name), bool) or getattr(self, name) <= 0:
                raise ValueError(f"sft.{name}={getattr(self, name)!r}: expected a positive integer")
        choices = {
            "jsonl_format": tuple(JSONL_FORMATS), "on_error": ("skip", "raise"), "overflow": ("drop", "truncate"),
        }  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"sft.{name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if not isinstance(self.eval_without_penalty, bool):
            raise ValueError(f"sft.eval_without_penalty={self.eval_without_penalty!r}: expected true or false")
        self.train_jsonl = [str(p) for p in self.train_jsonl]
        if self.world_problems == 0 and not self.train_jsonl:
            raise ValueError("sft.world_problems=0 and no sft.train_jsonl: no training data")

    def data_fields(self) -> dict:
        """The settings that choose the training examples (part of the run key)."""
        keys = ("world_problems", "train_jsonl", "jsonl_format", "on_error", "overflow")
        return {k: getattr(self, k) for k in keys}

    @property
    def penalty_off(self) -> float:
        """The thinking-off answers' repetition penalty in effect."""
        return self.repetition_penalty if self.repetition_penalty_off is None else self.repetition_penalty_off

    @property
    def penalized(self) -> bool:
        """Whether either mode decodes with a repetition penalty."""
        return self.repetition_penalty != 1.0 or self.penalty_off != 1.0

    def eval_fields(self) -> dict:
        # keys only where they differ from plain greedy / from the on penalty: older cached evaluations stay valid
        penalty = {"repetition_penalty": self.repetition_penalty} if self.repetition_penalty != 1.0 else {}
        if self.penalty_off != self.repetition_penalty:
            penalty["repetition_penalty_off"] = self.penalty_off
        return {"eval_problems": self.eval_problems, "batch_size": self.eval_batch_size,
                "max_new_tokens": self.max_new_tokens, **penalty}  # fmt: skip


# ----------------------------------------------------------------------------- data


def _mode_counts(examples: list[ChatExample]) -> dict:
    c = Counter("on" if ex.thinking else "off" for ex in examples)
    return {"on": c["on"], "off": c["off"]}


def _read_jsonl(cfg: SFTStageConfig) -> tuple[list[ChatExample], dict | None]:
    if not cfg.train_jsonl:
        return [], None
    reader = JSONL_FORMATS[cfg.jsonl_format](cfg.train_jsonl, on_error=cfg.on_error)
    examples = list(reader)
    r = reader.report
    counts = {"files": cfg.train_jsonl, "format": cfg.jsonl_format, "read": r.read, "kept": r.kept,
              "skipped": r.skipped, "reasons": dict(r.reasons), "problems": r.problems[:10]}  # fmt: skip
    return examples, counts


def build_sft_data(
    world: World, cfg: SFTStageConfig, chat: ChatTokenizer | None = None, problems: ProblemSet | None = None
) -> tuple[list, list, dict]:
    """(train, val) tokenized examples in `chat`'s template (default: the world's) and the counts
    for the report: paired examples of the first `world_problems` training problems of `problems`
    (default: the tiny world's) that have solutions, plus `train_jsonl`; validation pairs from its
    held-out problems (else the last 5% of the training examples, held back)."""
    chat, problems = chat or world.chat, problems or ProblemSet(world)
    n_world = min(cfg.world_problems, len(problems.train))
    chats = problems.sft_examples(problems.train[:n_world])
    n_paired = len(chats)
    extra, jsonl = _read_jsonl(cfg)
    chats += extra
    if not chats:
        raise ValueError("sft: no training examples (sft.world_problems=0 and every JSONL record was skipped)")
    val_chats = problems.sft_examples(problems.eval[: cfg.val_problems])
    if not val_chats:  # problems without solutions (JSONL prompts): hold back part of the training data
        n_val = max(1, len(chats) // 20)
        chats, val_chats = chats[:-n_val], chats[-n_val:]
    train, rep = tokenize_examples(chat, chats, cfg.max_len, cfg.overflow)
    val, _ = tokenize_examples(chat, val_chats, cfg.max_len, "truncate")
    counts = {
        "world_problems": n_world, "world_examples": n_paired, "jsonl": jsonl, "by_mode": _mode_counts(chats),
        "tokenized": {"examples": rep.examples, "kept": rep.kept, "dropped": rep.dropped,
                      "truncated": rep.truncated, "tokens": rep.tokens, "reasons": dict(rep.reasons)},
        "val_examples": len(val),
    }  # fmt: skip
    if not train:
        raise ValueError(f"sft: every training example is longer than sft.max_len={cfg.max_len} (overflow=drop)")
    return train, val, counts


def data_digest(examples) -> str:
    """A short digest of tokenized examples: a different data set gives a different run."""
    h = hashlib.sha256()
    for ids, mask in examples:
        h.update(json.dumps([ids, mask]).encode())
    return h.hexdigest()[:12]


# ----------------------------------------------------------------------------- evaluation


def _cached_toggle(path: Path, model, problems: ProblemSet, cfg: SFTStageConfig, chat: ChatTokenizer, verify) -> dict:
    """evaluate_toggle on the held-out problems, reusing `path` when it was made with the same settings."""
    settings = {**cfg.eval_fields(), **({"data": problems.key} if problems.key else {})}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            return saved["result"]
    result = evaluate_toggle(
        model, chat, problems.eval[: cfg.eval_problems], batch_size=cfg.eval_batch_size,
        max_new_tokens=cfg.max_new_tokens, verify=verify, repetition_penalty=cfg.repetition_penalty,
        repetition_penalty_off=cfg.penalty_off,
    )  # fmt: skip
    write_json_atomic(path, {"settings": settings, "result": result})
    return result


def _decoding_suffix(cfg: SFTStageConfig) -> str:
    """The toggle files' name suffix of a decoding: none for plain greedy, so evaluations with and
    without a penalty sit side by side instead of replacing each other; "-off<P>" where the
    thinking-off answers have another penalty than the thinking-on ones."""
    if not cfg.penalized:
        return ""
    off = "" if cfg.penalty_off == cfg.repetition_penalty else f"-off{cfg.penalty_off:g}"
    return f"-penalty{cfg.repetition_penalty:g}{off}"


def _log_toggle(before: dict, after: dict) -> None:
    for mode in ("on", "off"):
        b, a = before[mode], after[mode]
        log.info("sft: thinking %s: adherence %.3f -> %.3f, accuracy %.3f -> %.3f",
                 mode, b["adherence"], a["adherence"], b["accuracy"], a["accuracy"])  # fmt: skip


# ----------------------------------------------------------------------------- stage


def run_sft_stage(
    model: HeteroLlamaForCausalLM, world: World, cfg: SFTStageConfig, out_dir: str | Path, *, progress: bool = False,
    chat: ChatTokenizer | None = None, problems: ProblemSet | None = None, verify=is_correct,
) -> tuple[dict, HeteroLlamaForCausalLM]:
    """(report, SFT model): trains `model` in place (resuming its run if there is one), saves it
    to out_dir/model with its tokenizer and template (`chat`, default: the world's) and writes
    out_dir/report.json. `problems` (default: the tiny world's) give the paired examples and the
    held-out problems of the toggle evaluation, whose answers `verify(text, problem)` checks."""
    chat, problems = chat or world.chat, problems or ProblemSet(world)
    out_dir = Path(out_dir)
    if cfg.decision_tokens == 0:  # the mode is picked by the tokens that spell `<think>`
        cfg = replace(cfg, decision_tokens=len(chat.encode(THINK_START)))
    if cfg.close_weight and not cfg.close_tokens:  # the trace ends with the tokens that spell `</think>`
        cfg = replace(cfg, close_tokens=chat.encode(THINK_END))
    train, val, counts = build_sft_data(world, cfg, chat, problems)
    start = fingerprint(model)
    key = config_hash(cfg.train_fields(), cfg.data_fields(), data_digest(train), start)
    run_dir = out_dir / f"run-{key}"
    # the starting model's toggle depends on its weights alone: runs with other settings share it
    decoding = _decoding_suffix(cfg)
    before = _cached_toggle(out_dir / f"toggle-before-{config_hash(start)}{decoding}.json", model, problems, cfg, chat, verify)
    summary = run_sft(model, train, val, cfg, run_dir, progress=progress, pad_id=0)
    after = _cached_toggle(run_dir / f"toggle_after{decoding}.json", model, problems, cfg, chat, verify)
    _log_toggle(before, after)
    plain = None
    if cfg.penalized and cfg.eval_without_penalty:  # what the penalty changes: the plain run's file, shared with it
        plain_cfg = replace(cfg, repetition_penalty=1.0, repetition_penalty_off=None)
        plain = _cached_toggle(run_dir / "toggle_after.json", model, problems, plain_cfg, chat, verify)
    target = out_dir / "model"
    save_checkpoint(model, target, extra_files=chat.files())
    history = summary["val_history"]
    report = {
        "before": before,
        "after": after,
        **({"after_without_penalty": plain} if plain is not None else {}),
        "repetition_penalty": cfg.repetition_penalty,
        "repetition_penalty_off": cfg.penalty_off,
        "data": counts,
        "train": {
            "steps": summary["steps"], "start_step": summary["start_step"],
            "final_train_loss": summary["final_train_loss"],
            "val_lm_loss_before": history[0]["val_lm_loss"] if history else None,
            "val_lm_loss_after": history[-1]["val_lm_loss"] if history else None,
            "packing": summary["data"], "val_history": history,
        },
        "run_dir": str(run_dir), "metrics_csv": summary["metrics_csv"], "plot": summary["plot"],
        "model": str(target),
    }  # fmt: skip
    write_json_atomic(out_dir / "report.json", report)
    return report, model


__all__ = ["SFTStageConfig", "build_sft_data", "run_sft_stage"]
