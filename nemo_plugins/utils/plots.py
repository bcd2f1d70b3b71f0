"""Training curves of the step loops (recovery, SFT): the loss per step, and the validation metrics
(KL to the teacher, LM loss) by step."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .atomic import save_figure_atomic  # noqa: E402


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average, so a noisy per-step loss still shows its trend."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training_curves(train_losses: list[float], val_history: list[dict], path: str | Path) -> Path:
    """Two panels: train loss (step 1..n) and the validation metrics by step; written atomically."""
    path = Path(path)
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(10, 4))
    steps = list(range(1, len(train_losses) + 1))
    if train_losses:
        ax_t.plot(steps, train_losses, color="tab:blue", alpha=0.3, lw=1, label="per step")
        window = max(1, len(train_losses) // 20)
        ax_t.plot(steps, _smooth(train_losses, window), color="tab:blue", label=f"mean of {window}")
        ax_t.legend(fontsize=8)
    ax_t.set_xlabel("step")
    ax_t.set_ylabel("train loss")
    ax_t.set_title("training")
    for key, color, label in (("val_kl", "tab:red", "KL(teacher ‖ student)"), ("val_lm_loss", "tab:green", "LM loss")):
        pts = [(r["step"], r[key]) for r in val_history if r.get(key) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax_v.plot(xs, ys, "o-", color=color, ms=3, label=label)
    ax_v.set_xlabel("step")
    ax_v.set_title("validation")
    if ax_v.lines:
        ax_v.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)
    return path
