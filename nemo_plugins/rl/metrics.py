"""What an RL loop logs: the per-step metrics of a rollout (reward and its parts, pass rates and
lengths by thinking mode, truncation, zero-variance groups, reward failures by reason), the
metrics files rewritten from the whole history, and greedy held-out accuracy."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..data.chat_tokenizer import ChatTokenizer
from ..data.reasoning_world import Problem, is_correct
from ..utils.atomic import write_text_atomic
from .config import LoopConfig
from .experience import Rewards, Rollout
from .sandbox import CRASH, MEMORY, TIMEOUT, TOO_LONG

FAILURE_COLUMNS = {"fail_timeout": TIMEOUT, "fail_memory": MEMORY, "fail_too_long": TOO_LONG, "fail_crash": CRASH}

CSV_COLUMNS = (
    "step", "lr", "reward", "reward_accuracy", "reward_format", "reward_overlong", "pass_rate", "pass_rate_on",
    "pass_rate_off", "format_rate", "len_on", "len_off", "truncated", "groups", "groups_dropped", "seqs_trained",
    "tokens_trained", "updates", "loss", "pg_loss", "kl_loss", "kl_ref", "approx_kl", "clip_fraction", "ratio_mean",
    "entropy", "grad_norm", "prompt_pass_rate", "reward_failures", *FAILURE_COLUMNS, "fail_error", "time_s",
    "eval_accuracy",
)  # fmt: skip


def _mean(x: torch.Tensor, where: torch.Tensor | None = None) -> float | None:
    x = x.float() if where is None else x[where].float()
    return float(x.mean()) if x.numel() else None


def rollout_metrics(roll: Rollout, rewards: Rewards, cfg: LoopConfig) -> dict:
    """Reward total and by component, pass rate (share correct) overall and by mode, response
    length by mode, truncation, zero-variance groups and reward failures by reason."""
    on = torch.tensor(roll.thinking, dtype=torch.bool)
    lengths = roll.lengths
    grouped = rewards.total.view(-1, cfg.group_size)
    zero = grouped.amax(dim=1) == grouped.amin(dim=1)
    rc = cfg.rewards
    failures = rewards.failures
    row = {
        "reward": _mean(rewards.total),
        "reward_accuracy": rc.accuracy_weight * _mean(rewards.accuracy),
        "reward_format": rc.format_weight * _mean(rewards.format),
        "reward_overlong": _mean(rewards.overlong),
        "pass_rate": _mean(rewards.accuracy),
        "pass_rate_on": _mean(rewards.accuracy, on),
        "pass_rate_off": _mean(rewards.accuracy, ~on),
        "format_rate": _mean(rewards.format),
        "len_on": _mean(lengths, on),
        "len_off": _mean(lengths, ~on),
        "truncated": _mean(torch.tensor(roll.truncated)),
        "groups": int(zero.numel()),
        "groups_zero_variance": int(zero.sum()),
        "reward_failures": sum(failures.values()),
        "failures": dict(failures),
    }
    for col, reason in FAILURE_COLUMNS.items():
        row[col] = failures.get(reason, 0)
    row["fail_error"] = sum(n for r, n in failures.items() if r.startswith("error:"))
    return row


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_metrics(history: Sequence[dict], csv_path: Path, jsonl_path: Path) -> None:
    """metrics.csv (CSV_COLUMNS) and metrics.jsonl (every key), one row per step, atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for row in history:
        writer.writerow([_fmt(row.get(c)) for c in CSV_COLUMNS])
    write_text_atomic(csv_path, buffer.getvalue())
    write_text_atomic(jsonl_path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in history))


def heldout_accuracy(
    model, tok: ChatTokenizer, problems: Sequence[Problem], max_new_tokens: int, thinking: bool = True,
    verify: Callable[[str, Problem], bool] = is_correct,
) -> dict:  # fmt: skip
    """Greedy accuracy on held-out problems (`evaluate.task_accuracy`, answers checked by `verify`,
    e.g. `RewardSettings.verifier()`), JSON-ready (string keys)."""
    from ..evaluate import task_accuracy

    acc = task_accuracy(model, tok, problems, thinking=thinking, max_new_tokens=max_new_tokens, verify=verify)
    return {"accuracy": acc["accuracy"], "format_ok": acc["format_ok"], "n": acc["n"],
            "by_difficulty": {str(d): a for d, a in acc["by_difficulty"].items()}}  # fmt: skip
