"""Report figures: the child's per-layer architecture next to the parent's, and the Pareto
frontier (quality vs budget) with the chosen point."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..arch.config import ModelConfig  # noqa: E402
from ..utils.atomic import save_figure_atomic  # noqa: E402


def _attention_height(cfg: ModelConfig, b) -> float:
    a = b.attention
    if a.kind == "gqa":
        return a.num_kv_heads / max(x.attention.num_kv_heads or 1 for x in cfg.blocks)
    return 0.15 if a.kind == "linear" else 0.0


def plot_architecture(parent: ModelConfig, child: ModelConfig, path: Path) -> Path:
    """Two bar rows per layer: KV heads (attention) and FFN width, relative to the parent's."""
    layers = range(child.num_layers)
    p_width = max(b.ffn.intermediate_size or 0 for b in parent.blocks) or 1
    fig, (ax_a, ax_f) = plt.subplots(2, 1, figsize=(max(6, 0.35 * child.num_layers), 5), sharex=True)
    ax_a.bar(layers, [_attention_height(parent, b) for b in parent.blocks], color="lightgray", label="parent")
    ax_a.bar(layers, [_attention_height(parent, b) for b in child.blocks], color="tab:blue", width=0.6, label="child")
    for i, b in enumerate(child.blocks):
        label = {"gqa": f"kv{b.attention.num_kv_heads}", "linear": "lin", "no_op": "-"}[b.attention.kind]
        ax_a.text(i, 1.02, label, ha="center", fontsize=7)
    ax_a.set_ylabel("attention (KV heads)")
    ax_a.set_ylim(0, 1.15)
    ax_a.legend(loc="lower right", fontsize=7)

    def width(b):
        f = b.ffn
        return (f.intermediate_size or 0) / p_width if f.kind == "swiglu" else (0.1 if f.kind == "linear" else 0.0)

    ax_f.bar(layers, [width(b) for b in parent.blocks], color="lightgray")
    ax_f.bar(layers, [width(b) for b in child.blocks], color="tab:orange", width=0.6)
    ax_f.set_ylabel("FFN width / parent")
    ax_f.set_xlabel("layer")
    ax_f.set_xticks(list(layers))
    fig.suptitle("Puzzle child architecture (gray: parent)")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)
    return path


def plot_pareto(frontier, budgets, chosen, path: Path, budget_key: str, objective: str) -> Path:
    """Objective vs budget for every feasible sweep point, and the chosen solution."""
    pts = [(b, s.objective) for b, s in zip(budgets, frontier) if s is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, "o-", color="tab:blue", label="Pareto frontier")
    if budget_key in chosen.totals:
        ax.plot([chosen.totals[budget_key]], [chosen.objective], "*", color="tab:red", markersize=14, label="chosen")
    ax.set_xlabel(budget_key)
    ax.set_ylabel(objective)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)
    return path
