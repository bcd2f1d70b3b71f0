"""GRPO curves: one run's training signals (`plot_grpo`) and runs side by side (`plot_reward_curves`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..utils.atomic import save_figure_atomic  # noqa: E402


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average: per-step RL signals are noisy."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def _series(history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in history if r.get(key) is not None]
    return (list(map(list, zip(*pts))) if pts else ([], []))  # type: ignore[return-value]


def _line(ax, history, key, label, color, smooth: bool = False):
    xs, ys = _series(history, key)
    if not xs:
        return
    if smooth and len(ys) > 4:
        ax.plot(xs, ys, color=color, alpha=0.25, lw=1)
        ax.plot(xs, _smooth(ys, max(2, len(ys) // 10)), color=color, label=label)
    else:
        ax.plot(xs, ys, color=color, label=label, marker="o" if len(xs) < 30 else None, ms=3)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=100)
    plt.close(fig)
    return path


def _finish(ax, title: str, ylabel: str | None = None):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    if ax.lines and any(not line.get_label().startswith("_") for line in ax.lines):
        ax.legend(fontsize=7)


def plot_grpo(history: Sequence[dict], eval_history: Sequence[dict], path: str | Path) -> Path:
    """Six panels: reward and its parts; pass rate (train, by mode) and held-out accuracy;
    response length by mode; KL to the reference and to the old policy; clip fraction and
    entropy; groups dropped. Written atomically."""
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    ax = axes[0, 0]
    parts = (("reward", "black", "total"), ("reward_accuracy", "tab:green", "accuracy"),
             ("reward_format", "tab:blue", "format"), ("reward_overlong", "tab:red", "overlong"))
    for key, color, label in parts:
        _line(ax, history, key, label, color, smooth=True)
    _finish(ax, "reward (mean per completion)")
    ax = axes[0, 1]
    _line(ax, history, "pass_rate_on", "train, thinking on", "tab:green", smooth=True)
    _line(ax, history, "pass_rate_off", "train, thinking off", "tab:olive", smooth=True)
    _line(ax, eval_history, "accuracy", "held-out (greedy, on)", "tab:purple")
    _finish(ax, "accuracy")
    ax = axes[0, 2]
    _line(ax, history, "len_on", "thinking on", "tab:green")
    _line(ax, history, "len_off", "thinking off", "tab:olive")
    _finish(ax, "response length", "tokens")
    ax = axes[1, 0]
    _line(ax, history, "kl_ref", "KL(π ‖ ref), k3", "tab:red")
    _line(ax, history, "approx_kl", "KL(old ‖ π), k3", "tab:orange")
    _finish(ax, "KL")
    ax = axes[1, 1]
    _line(ax, history, "clip_fraction", "clip fraction", "tab:brown")
    _line(ax, history, "entropy", "entropy (nats/token)", "tab:cyan")
    _finish(ax, "clipping and entropy")
    ax = axes[1, 2]
    _line(ax, history, "groups_dropped", "dropped (zero variance)", "tab:gray")
    _line(ax, history, "groups", "groups", "black")
    _finish(ax, "groups per step")
    return _save(fig, path)


COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def plot_reward_curves(runs: Mapping[str, dict], path: str | Path, baseline: float | None = None) -> Path:
    """Runs side by side ({name: {"history": [...], "eval_history": [...]}}): reward, train pass
    rate and held-out accuracy per step; `baseline` (held-out accuracy before) starts every
    accuracy curve at step 0 and is drawn as a dashed line."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for (name, run), color in zip(runs.items(), COLORS):
        evals = list(run.get("eval_history", []))
        if baseline is not None and not (evals and evals[0]["step"] == 0):
            evals.insert(0, {"step": 0, "accuracy": baseline})
        _line(axes[0], run.get("history", []), "reward", name, color, smooth=True)
        _line(axes[1], run.get("history", []), "pass_rate", name, color, smooth=True)
        _line(axes[2], evals, "accuracy", name, color)
    if baseline is not None:
        axes[2].axhline(baseline, color="gray", ls="--", lw=1, label="before")
    _finish(axes[0], "reward (mean per completion)")
    _finish(axes[1], "train pass rate (sampled)")
    _finish(axes[2], "held-out accuracy (greedy, thinking on)")
    return _save(fig, path)


def plot_rpo_iterations(rows: Sequence[dict], path: str | Path) -> Path:
    """Three panels over RPO rounds (0 = the starting policy), on held-out prompts: the reward
    model's mean score, the win rate against the start (½ = even) and task accuracy."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    xs = [r["iteration"] for r in rows]
    for ax, key, title in zip(axes, ("rm_score", "win_rate", "accuracy"),
                              ("reward model score (mean)", "win rate vs start (RM judge)", "task accuracy")):  # fmt: skip
        ax.plot(xs, [r[key] for r in rows], marker="o", color="tab:blue")
        if key == "win_rate":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(xs)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RPO iteration")
    return _save(fig, path)


def plot_rloo(history: Sequence[dict], before: Mapping | None, after: Mapping | None, path: str | Path) -> Path:
    """RLOO per step: reward; the sampled completions' instruction-following rate and task pass
    rate, with held-out greedy accuracies before (dashed) and after (dotted); KL to the reference."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    _line(axes[0], history, "reward", "total", "black", smooth=True)
    _finish(axes[0], "reward (mean per completion)")
    for ax, key, held, title in ((axes[1], "instruction_rate", "instruction_accuracy", "instruction followed"),
                                 (axes[1], "pass_rate", "task_accuracy", "task correct")):  # fmt: skip
        color = "tab:blue" if key == "instruction_rate" else "tab:green"
        _line(ax, history, key, f"{title} (train, sampled)", color, smooth=True)
        if before is not None:
            ax.axhline(before[held], color=color, ls="--", lw=1, label=f"{title}: held-out before")
        if after is not None:
            ax.axhline(after[held], color=color, ls=":", lw=1.5, label=f"{title}: held-out after")
    _finish(axes[1], "instruction following and task accuracy")
    _line(axes[2], history, "kl_ref", "KL(π ‖ ref), k3 per token", "tab:red")
    _finish(axes[2], "KL to the reference")
    return _save(fig, path)
