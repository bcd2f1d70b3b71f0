"""FFN Fusion (arXiv 2503.18908): a run of sequential FFNs becomes one FFN on the run's input.

Fusing a window of k consecutive FFNs f_j(X) = X + FFN_j(RMSNorm_j(X)) replaces them with the
parallel form x + Σ_j FFN_j(RMSNorm_j(x)), written as ONE FFN at the window's first layer:
each member's RMSNorm gain g_j is folded into the columns of its input matrices (W·diag(g_j)),
so all members share one RMSNorm with gain ones; SwiGLU members are concatenated into one wide
SwiGLU (gate/up along the output dim, down along the input dim) and linear members summed into
one matrix. The result is exact for the parallel form (not for the sequential original, whose
gap `fusion_report` measures). The window's later layers become empty (attention and FFN
no_op), so layer count and indices are unchanged, as in Llama-Nemotron-Ultra-253B.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..arch.config import FFN_LINEAR, FFN_NO_OP, BlockConfig, FFNConfig, ModelConfig, parallel, swiglu
from ..arch.hf_json import nas_compatible
from ..model.checkpoint import choose_architecture, model_from_state, save_checkpoint
from ..model.llama import HeteroLlamaForCausalLM
from ..utils.atomic import write_json_atomic
from .analysis import analyze, check_window, find_ffn_runs, window_score

log = logging.getLogger("nemo_plugins.fusion")



@dataclass
class FusionResult:
    """The fused model, the windows fused (layer lists), layers saved and a human-readable message."""

    model: HeteroLlamaForCausalLM
    windows: list[list[int]] = field(default_factory=list)
    layers_saved: int = 0
    message: str = ""


# ----------------------------------------------------------------------------- weights


def _members(layer: int, f: FFNConfig) -> list[tuple[FFNConfig, str]]:
    """(member config, state-dict prefix) of a layer's FFN; a parallel group is flattened."""
    base = f"model.layers.{layer}.mlp."
    if f.kind == "parallel":
        return [(m, f"{base}branches.{n}.") for n, m in enumerate(f.members)]
    return [(f, base)]


def _fold(state: dict, layer: int, f: FFNConfig) -> tuple[list, list, list, list]:
    """Gate, up, down and linear matrices of a layer's FFN with its norm gain folded in (float64)."""
    g = state[f"model.layers.{layer}.post_attention_layernorm.weight"].double()
    gates, ups, downs, linears = [], [], [], []
    for m, p in _members(layer, f):
        if m.kind == "swiglu":
            gates.append(state[f"{p}gate_proj.weight"].double() * g)
            ups.append(state[f"{p}up_proj.weight"].double() * g)
            downs.append(state[f"{p}down_proj.weight"].double())
        else:
            linears.append(state[f"{p}linear_mlp.weight"].double() * g)
    return gates, ups, downs, linears


def _merged(gates, ups, downs, linears, dtype) -> tuple[FFNConfig, dict[str, torch.Tensor]]:
    """One FFN (swiglu, linear, or parallel of both) and its weights relative to `mlp.`."""
    parts: list[tuple[FFNConfig, dict]] = []
    if gates:
        gate, up, down = torch.cat(gates, 0), torch.cat(ups, 0), torch.cat(downs, 1)
        parts.append((swiglu(gate.shape[0]), {"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": down}))
    if linears:
        parts.append((FFN_LINEAR, {"linear_mlp.weight": torch.stack(linears).sum(0)}))
    if len(parts) == 1:
        cfg, weights = parts[0]
    else:
        cfg = parallel(*(c for c, _ in parts))
        weights = {f"branches.{n}.{k}": t for n, (_, w) in enumerate(parts) for k, t in w.items()}
    return cfg, {k: t.to(dtype).contiguous() for k, t in weights.items()}


def _drop_ffn(state: dict, layer: int) -> None:
    prefixes = (f"model.layers.{layer}.mlp.", f"model.layers.{layer}.post_attention_layernorm.")
    for k in [k for k in state if k.startswith(prefixes)]:
        del state[k]


def fuse_state(cfg: ModelConfig, state: dict[str, torch.Tensor], run: list[int]) -> ModelConfig:
    """Fuse `run` (layer indices) in `state` in place; return the new config. A run of one is untouched."""
    run = list(run)
    if len(run) < 2:
        return cfg
    first = run[0]
    gain = state[f"model.layers.{first}.post_attention_layernorm.weight"]
    dtype, device = gain.dtype, gain.device
    gates, ups, downs, linears = [], [], [], []
    for l in run:
        for acc, part in zip((gates, ups, downs, linears), _fold(state, l, cfg.blocks[l].ffn)):
            acc.extend(part)
    ffn, weights = _merged(gates, ups, downs, linears, dtype)
    for l in run:
        _drop_ffn(state, l)
    state[f"model.layers.{first}.post_attention_layernorm.weight"] = torch.ones(cfg.hidden_size, dtype=dtype, device=device)
    state.update({f"model.layers.{first}.mlp.{k}": t for k, t in weights.items()})
    blocks = list(cfg.blocks)
    blocks[first] = BlockConfig(blocks[first].attention, ffn)
    for l in run[1:]:
        blocks[l] = BlockConfig(blocks[l].attention, FFN_NO_OP)
    return cfg.replace_blocks(blocks)


def _check_windows(model: HeteroLlamaForCausalLM, windows: list[list[int]]) -> None:
    seen: dict[int, list[int]] = {}
    for w in windows:
        check_window(model, list(w))
        for l in w:
            if l in seen:
                raise ValueError(f"windows {seen[l]} and {list(w)} both contain layer {l} (windows must be disjoint)")
            seen[l] = list(w)


def fuse_model(
    model: HeteroLlamaForCausalLM, windows: list[list[int]] | None = None, *, share_weights: bool = False
) -> FusionResult:
    """Fuse each window (default: every run of `find_ffn_runs`) and return a new model.

    With no window of >= 2 FFNs the model is returned as is (not copied), with a message saying
    so (also logged): the pipeline continues with the unfused model. Unless `share_weights`,
    the new model's tensors are copies, so training one model leaves the other intact.
    """
    windows = find_ffn_runs(model.config) if windows is None else [list(w) for w in windows]
    _check_windows(model, windows)
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        if find_ffn_runs(model.config):
            msg = "FFN fusion: no window selected (every candidate above the dependency threshold?); model unchanged"
        else:
            msg = "FFN fusion: no run of >= 2 consecutive FFNs without attention between them to fuse; model unchanged"
        log.info(msg)
        return FusionResult(model, [], 0, msg)
    cfg = model.config
    state = {k: v if share_weights else v.clone() for k, v in model.state_dict().items()}
    for w in windows:
        cfg = fuse_state(cfg, state, w)
    saved = sum(len(w) - 1 for w in windows)
    msg = f"FFN fusion: fused {len(windows)} window(s) {windows}, {saved} sequential FFN layer(s) saved"
    log.info(msg)
    return FusionResult(model_from_state(cfg, state), windows, saved, msg)


def fuse_run(model: HeteroLlamaForCausalLM, run: list[int], *, share_weights: bool = False) -> HeteroLlamaForCausalLM:
    """The model with the FFNs of `run` fused into one at the run's first layer (exact for the
    parallel form). A run of one is the identity: the same model is returned."""
    if len(run) < 2:
        check_window(model, list(run))
        return model
    return fuse_model(model, [list(run)], share_weights=share_weights).model


# ----------------------------------------------------------------------------- selection


def _run_windows(analysis: dict) -> list[tuple[list[int], list]]:
    runs = analysis.get("runs")
    if not isinstance(runs, list):
        raise ValueError(f"analysis['runs']={runs!r}: expected the list written by fusion.analysis.analyze")
    return [(r["layers"], r["matrix"]) for r in runs]


def _best_under_threshold(matrix, k: int, threshold: float) -> list[tuple[int, int]]:
    """Disjoint windows [s, e) of one run, each with max dependency <= threshold, saving the most
    layers (ties: lowest total dependency), by dynamic programming over the run's positions."""
    best: list[tuple[tuple[int, float], list]] = [((0, 0.0), [])]
    for e in range(1, k + 1):
        cand = best[e - 1]
        for s in range(e - 1):
            sc = window_score(matrix, s, e)
            if sc["max"] <= threshold:
                (saved, neg_dep), chosen = best[s]
                key = (saved + e - s - 1, neg_dep - sc["sum"])
                if key > cand[0]:
                    cand = (key, chosen + [(s, e)])
        best.append(cand)
    return best[k][1]


def _moves(k: int, windows: list[tuple[int, int]]) -> list[tuple[int, int, tuple]]:
    """Every change saving exactly one more layer: (new window s, e, windows it replaces)."""
    taken = {p for s, e in windows for p in range(s, e)}
    out = [(p, p + 2, ()) for p in range(k - 1) if p not in taken and p + 1 not in taken]
    for s, e in windows:
        if s > 0 and s - 1 not in taken:
            out.append((s - 1, e, ((s, e),)))
        if e < k and e not in taken:
            out.append((s, e + 1, ((s, e),)))
        for s2, e2 in windows:
            if s2 == e:
                out.append((s, e2, ((s, e), (s2, e2))))
    return out


def _greedy_to_target(runs: list[tuple[list[int], list]], target: int) -> list[list[tuple[int, int]]]:
    chosen: list[list[tuple[int, int]]] = [[] for _ in runs]
    for _ in range(target):
        options = []
        for n, (layers, matrix) in enumerate(runs):
            for s, e, old in _moves(len(layers), chosen[n]):
                sc = window_score(matrix, s, e)
                options.append(((sc["max"], sc["sum"], n, s), n, s, e, old))
        if not options:
            break
        _, n, s, e, old = min(options)
        chosen[n] = sorted([w for w in chosen[n] if w not in old] + [(s, e)])
    return chosen


def select_runs(analysis: dict, threshold: float | None = None, target_layers_saved: int | None = None) -> list[list[int]]:
    """Windows (contiguous pieces of runs, as layer lists) to fuse; a window of k FFNs saves k - 1 layers.

    - `threshold`: in each run, disjoint windows whose max dependency M[i, j] (over the window's
      pairs) is <= threshold, chosen to save the most layers (ties: lowest summed dependency).
    - `target_layers_saved`: greedy, one layer at a time: among all changes that save exactly one
      more layer (start a window of two free neighbouring FFNs, grow a window by a free neighbour,
      or join two touching windows), take the one whose resulting window has the lowest max
      dependency (then lowest sum, then earliest); stop at the target or when every run is fused
      whole (logged when the target is out of reach).
    - neither: every run whole.
    """
    if threshold is not None and target_layers_saved is not None:
        raise ValueError(
            f"threshold={threshold!r} and target_layers_saved={target_layers_saved!r}: give one or the other, not both"
        )
    runs = _run_windows(analysis)
    if threshold is None and target_layers_saved is None:
        return [list(layers) for layers, _ in runs]
    if threshold is not None:
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or threshold < 0:
            raise ValueError(f"threshold={threshold!r}: expected a number >= 0 (a cosine distance)")
        spans = [_best_under_threshold(m, len(layers), threshold) for layers, m in runs]
    else:
        if not isinstance(target_layers_saved, int) or isinstance(target_layers_saved, bool) or target_layers_saved < 0:
            raise ValueError(f"target_layers_saved={target_layers_saved!r}: expected an integer >= 0")
        spans = _greedy_to_target(runs, target_layers_saved)
        reachable = sum(len(layers) - 1 for layers, _ in runs)
        if target_layers_saved > reachable:
            log.warning(
                "target_layers_saved=%d is more than fusing every run saves (%d); fusing every run whole",
                target_layers_saved, reachable,
            )
    windows = [layers[s:e] for (layers, _), sp in zip(runs, spans) for s, e in sp]
    return sorted(windows)


# ----------------------------------------------------------------------------- report


def _sequential_ffns(cfg: ModelConfig) -> int:
    return sum(b.ffn.kind != "no_op" for b in cfg.blocks)


def _depth(cfg: ModelConfig) -> int:
    return sum((b.attention.kind != "no_op") + (b.ffn.kind != "no_op") for b in cfg.blocks)


def _kl_sum(p_logits: torch.Tensor, q_logits: torch.Tensor, rows: int = 256) -> float:
    """Sum over rows of KL(softmax(p) || softmax(q)) in float64, `rows` positions at a time (a
    whole batch of 49,152-way float64 log-probabilities would be gigabytes)."""
    total = 0.0
    for start in range(0, p_logits.shape[0], rows):
        lp = F.log_softmax(p_logits[start : start + rows].double(), -1)
        lq = F.log_softmax(q_logits[start : start + rows].double(), -1)
        total += float((lp.exp() * (lp - lq)).sum())
    return total


@torch.no_grad()
def fusion_report(original: HeteroLlamaForCausalLM, fused: HeteroLlamaForCausalLM, batches: Iterable) -> dict:
    """How far the fused model is from the original SEQUENTIAL one on calibration tokens.

    Hidden-state and logit differences (final-norm hidden states) and KL(original || fused) of
    the next-token distributions, over real tokens; layers saved = sequential FFN sub-blocks
    removed; parameters before/after (they differ only by the dropped RMSNorm gains, hidden per
    fused-away FFN, and by merged linear members).
    """
    dev = original.lm_head.weight.device
    max_h = max_l = 0.0
    sum_h = sum_l = kl = 0.0
    n = 0
    for ids, valid in batches:
        ids, valid = ids.to(dev), valid.to(dev).bool()
        ho, hf = original.hidden_states(ids), fused.hidden_states(ids)
        lo, lf = original.lm_head(ho), fused.lm_head(hf)
        dh, dl = (ho - hf).abs()[valid].float(), (lo - lf).abs()[valid].float()
        if dh.numel():
            max_h, max_l = max(max_h, float(dh.max())), max(max_l, float(dl.max()))
        sum_h, sum_l = sum_h + float(dh.mean(-1).sum()), sum_l + float(dl.mean(-1).sum())
        kl += _kl_sum(lo[valid], lf[valid])
        n += int(valid.sum())
    d = max(n, 1)
    before, after = original.config, fused.config
    return {
        "num_tokens": n,
        "max_abs_diff_hidden": max_h,
        "mean_abs_diff_hidden": sum_h / d,
        "max_abs_diff_logits": max_l,
        "mean_abs_diff_logits": sum_l / d,
        "kl_div": kl / d,
        "layers_saved": _sequential_ffns(before) - _sequential_ffns(after),
        "sequential_ffns_before": _sequential_ffns(before),
        "sequential_ffns_after": _sequential_ffns(after),
        "depth_before": _depth(before),
        "depth_after": _depth(after),
        "num_layers": after.num_layers,
        "params_before": original.num_parameters(),
        "params_after": fused.num_parameters(),
    }


# ----------------------------------------------------------------------------- saving


def save_fused(
    model: HeteroLlamaForCausalLM, path: str | os.PathLike, *, extra_files: dict[str, str | bytes] | None = None
) -> dict:
    """Save as nemotron-nas when the config allows it (one wide swiglu per layer, empty layers),
    else in the project's own schema (e.g. a parallel group with a linear member).
    Returns {"path", "format", "reasons"} (reasons: why nemotron-nas was not possible)."""
    architecture = choose_architecture(model.config)
    reasons = nas_compatible(model.config) if architecture == "nemo_plugins" else []
    if reasons:
        log.info("saving %s in the nemo_plugins schema: %s", path, reasons[0])
    save_checkpoint(model, path, architecture=architecture, extra_files=extra_files)
    return {"path": str(path), "format": architecture, "reasons": reasons}


# ----------------------------------------------------------------------------- end to end


def run_fusion(
    model: HeteroLlamaForCausalLM,
    batches: Iterable,
    out_dir: str | os.PathLike,
    *,
    threshold: float | None = None,
    target_layers_saved: int | None = None,
    extra_files: dict[str, str | bytes] | None = None,
) -> dict:
    """Analyze, select, fuse, report, plot and save under `out_dir` (fusion_analysis.json,
    dependency.png, model/, report.json); returns the report. With nothing to fuse the
    report says so and the unchanged model is still saved, so later stages can proceed."""
    from .plots import plot_dependency  # matplotlib only when plotting

    out = Path(out_dir)
    batches = list(batches)
    analysis = analyze(model, batches, out / "fusion_analysis.json")
    plot_dependency(analysis, out / "dependency.png")
    windows = select_runs(analysis, threshold, target_layers_saved)
    result = fuse_model(model, windows)
    report = {"message": result.message, "windows": result.windows, **fusion_report(model, result.model, batches)}
    report["checkpoint"] = save_fused(result.model, out / "model", extra_files=extra_files)
    report["model"] = report["checkpoint"]["path"]
    write_json_atomic(out / "report.json", report)
    return report
