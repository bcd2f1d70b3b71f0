"""Dependency heatmaps: one panel per FFN run, M[i, j] = how much block j changes when block i
of the same run is skipped (see `fusion.analysis`); low values mark fusable windows."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..utils.atomic import save_figure_atomic  # noqa: E402


def _heatmap(ax, run: dict, vmax: float):
    m = np.array(run["matrix"], dtype=float)
    k = len(run["layers"])
    shown = np.where(np.triu(np.ones((k, k), dtype=bool), 1), m, np.nan)
    im = ax.imshow(shown, cmap="viridis", vmin=0.0, vmax=vmax)
    ticks = [str(l) for l in run["layers"]]
    ax.set_xticks(range(k), ticks, fontsize=7)
    ax.set_yticks(range(k), ticks, fontsize=7)
    ax.set_xlabel("block j (layer)")
    ax.set_ylabel("skipped block i (layer)")
    ax.set_title(f"layers {run['layers'][0]}-{run['layers'][-1]}: max {run['max']:.3g}", fontsize=9)
    if k <= 12:
        for i in range(k):
            for j in range(i + 1, k):
                ax.text(j, i, f"{m[i, j]:.2g}", ha="center", va="center", fontsize=6, color="white")
    return im


def plot_dependency(analysis: dict, path: str | os.PathLike) -> Path:
    """Heatmaps of every run's dependency matrix (shared color scale), written atomically;
    a model without runs gets a figure saying so."""
    path = Path(path)
    runs = analysis.get("runs") or []
    n = max(len(runs), 1)
    fig, axes = plt.subplots(1, n, figsize=(max(4.0, 3.6 * n), 3.8), squeeze=False)
    try:
        if not runs:
            axes[0, 0].text(0.5, 0.5, "no FFN runs to fuse", ha="center", va="center")
            axes[0, 0].set_axis_off()
        else:
            vmax = max(max((r["max"] for r in runs), default=0.0), 1e-12)
            for ax, run in zip(axes[0], runs):
                im = _heatmap(ax, run, vmax)
            fig.colorbar(im, ax=list(axes[0]), label="1 - cos(h_j, h_j without i)", shrink=0.8)
        fig.suptitle("FFN Fusion: dependency between FFNs of each run")
        save_figure_atomic(fig, path, dpi=120)
    finally:
        plt.close(fig)
    return path
