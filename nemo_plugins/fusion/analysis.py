"""Where FFN Fusion (arXiv 2503.18908) can apply, and how much it would cost.

Read the model as its sequence of sub-blocks a0 f0 a1 f1 ...; no-op sub-blocks are identities.
A *run* is a maximal sequence of >= 2 present FFN sub-blocks with no present attention
(gqa or linear) between them: those FFNs could be computed in parallel on the run's input.
Block j of a run is f_j(X) = X + h_j(X), h_j(X) = FFN_j(RMSNorm_j(X)).

The dependency of block j on an earlier block i of the same run is measured on calibration
tokens: run the run sequentially from its captured input X_0 (X_{m+1} = X_m + h_m(X_m)), then
again with f_i skipped (X'_{i+1} = X_i, the rest recomputed); M[i, j] (i < j) is the mean over
real tokens of the cosine distance 1 - cos(h_j(X_j), h_j(X'_j)). M[i, j] = 0 means j does not
see i at all, so fusing them changes nothing; entries with i >= j are 0.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import partial

import torch

from ..arch.config import ModelConfig
from ..model.llama import HeteroLlamaForCausalLM
from ..utils.atomic import write_json_atomic

METRIC = "mean over real tokens of 1 - cos(h_j(X_j), h_j(X_j with f_i skipped))"
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def find_ffn_runs(cfg: ModelConfig) -> list[list[int]]:
    """Layer indices of the FFN sub-blocks of each run (maximal, >= 2 FFNs, no attention between)."""
    runs, current = [], []
    for i, b in enumerate(cfg.blocks):
        if b.attention.kind != "no_op":  # a present attention sub-block ends the run
            if len(current) >= 2:
                runs.append(current)
            current = []
        if b.ffn.kind != "no_op":
            current.append(i)
    if len(current) >= 2:
        runs.append(current)
    return runs


# ----------------------------------------------------------------------------- capture


class _Captured(Exception):
    """Raised by the last hook: the rest of the forward pass is not needed."""


def _grab(store: dict, layer: int, last: int, module, args):
    store[layer] = args[0].detach()
    if layer == last:
        raise _Captured


@torch.no_grad()
def capture_run_inputs(model: HeteroLlamaForCausalLM, layers: list[int], input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """{layer: input of its FFN sub-block} from the real model's forward pass (pre-hooks on the
    FFN norms; the pass stops after the last one). Right padding needs no mask (causal)."""
    layers = sorted(set(layers))
    mods = model.model.layers
    for l in layers:
        if mods[l].post_attention_layernorm is None:
            raise ValueError(f"layer {l}: its FFN sub-block is no_op, there is no FFN input to capture")
    store: dict[int, torch.Tensor] = {}
    hooks = [mods[l].post_attention_layernorm.register_forward_pre_hook(partial(_grab, store, l, layers[-1])) for l in layers]
    try:
        model.hidden_states(input_ids.to(model.lm_head.weight.device))
    except _Captured:
        pass
    finally:
        for h in hooks:
            h.remove()
    return store


# ----------------------------------------------------------------------------- dependency


def _residual_fns(model: HeteroLlamaForCausalLM, run: list[int]) -> list:
    """h_j = FFN_j ∘ RMSNorm_j for each layer of the run (the residual is added by the caller)."""
    out = []
    for l in run:
        block = model.model.layers[l]
        if block.mlp is None:
            raise ValueError(f"run {run}: layer {l} has no FFN (ffn kind no_op)")
        out.append(lambda x, b=block: b.mlp(b.post_attention_layernorm(x)))
    return out


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos over the last dim, in float64; two zero vectors are at distance 0, one zero
    vector is at distance 1 from anything else."""
    a, b = a.double(), b.double()
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    cos = (a * b).sum(-1) / (na * nb).clamp_min(1e-300)
    dist = (1 - cos).clamp(0, 2)
    both_zero = (na == 0) & (nb == 0)
    return torch.where(both_zero, torch.zeros_like(dist), dist)


@torch.no_grad()
def _dependency_sums(hs: list, x0: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[k, k] sums over the valid tokens of the cosine distances defined in the module docstring."""
    k = len(hs)
    sums = torch.zeros(k, k, dtype=torch.float64)
    inputs, outputs, x = [], [], x0
    for h in hs:
        y = h(x)
        inputs.append(x)
        outputs.append(y)
        x = x + y
    valid = valid.to(x0.device).bool()
    for i in range(k - 1):
        x = inputs[i]  # f_i skipped: block i+1 sees block i's input
        for j in range(i + 1, k):
            y = hs[j](x)
            sums[i, j] = cosine_distance(outputs[j], y)[valid].sum().cpu()
            x = x + y
    return sums


def check_window(model: HeteroLlamaForCausalLM, run: list[int]) -> None:
    """Raise ValueError unless `run` is a run or a contiguous piece of one (a single FFN is allowed)."""
    if len(run) < 1 or sorted(set(run)) != list(run):
        raise ValueError(f"run={run}: expected strictly increasing layer indices")
    blocks = model.config.blocks
    if run[-1] >= len(blocks) or run[0] < 0:
        raise ValueError(f"run={run}: layer index out of range for a model of {len(blocks)} layers")
    for l in range(run[0] + 1, run[-1] + 1):
        if blocks[l].attention.kind != "no_op":
            raise ValueError(
                f"run={run}: layer {l} has {blocks[l].attention.kind} attention between FFNs of the run (expected no_op)"
            )
        if l not in run and blocks[l].ffn.kind != "no_op":
            raise ValueError(f"run={run}: layer {l} has an FFN inside the run's span but is not listed in the run")


@torch.no_grad()
def dependency_matrices(model: HeteroLlamaForCausalLM, runs: list[list[int]], batches: Batches) -> tuple[list[torch.Tensor], int]:
    """One [k, k] matrix per run (see module docstring), all from one capture per batch;
    also returns the number of real tokens counted."""
    for run in runs:
        check_window(model, run)
    sums = [torch.zeros(len(r), len(r), dtype=torch.float64) for r in runs]
    fns = [_residual_fns(model, r) for r in runs]
    count = 0
    for ids, valid in batches:
        if not runs:
            break
        inputs = capture_run_inputs(model, [r[0] for r in runs], ids)
        for n, run in enumerate(runs):
            sums[n] += _dependency_sums(fns[n], inputs[run[0]], valid)
        count += int(valid.bool().sum())
    if runs and count == 0:
        raise ValueError("batches: no real (non-padding) calibration token to measure dependencies on")
    return [(s / max(count, 1)).float() for s in sums], count


def dependency_matrix(model: HeteroLlamaForCausalLM, run: list[int], batches: Batches) -> torch.Tensor:
    """[k, k] dependency matrix of one run over `batches` of (input_ids, real_token_mask);
    M[i, j] (i < j) as defined in the module docstring, 0 elsewhere."""
    return dependency_matrices(model, [list(run)], batches)[0][0]


# ----------------------------------------------------------------------------- scores


def window_score(matrix, start: int, end: int) -> dict:
    """Max, sum and mean of the upper triangle of matrix[start:end, start:end] (positions in the run)."""
    m = torch.as_tensor(matrix, dtype=torch.float64)[start:end, start:end]
    k = end - start
    vals = m[torch.triu_indices(k, k, offset=1).unbind()] if k >= 2 else m.new_zeros(0)
    n = len(vals)
    return {
        "max": float(vals.max()) if n else 0.0,
        "sum": float(vals.sum()),
        "mean": float(vals.mean()) if n else 0.0,
    }


def run_scores(run: list[int], matrix) -> dict:
    """A run's layers, matrix and scores, plus the same scores for every contiguous window of >= 2 FFNs."""
    k = len(run)
    windows = [
        {"layers": run[s:e], "start": s, "end": e, **window_score(matrix, s, e)}
        for s in range(k)
        for e in range(s + 2, k + 1)
    ]
    matrix = torch.as_tensor(matrix).tolist()
    return {"layers": list(run), "matrix": matrix, **window_score(matrix, 0, k), "windows": windows}


def analyze(model: HeteroLlamaForCausalLM, batches: Batches, path: str | os.PathLike | None = None) -> dict:
    """JSON-able dependency analysis of every run: {"metric", "num_tokens", "num_layers", "runs":
    [{"layers", "matrix", "max", "sum", "mean", "windows": [...]}]}; written atomically to `path`."""
    runs = find_ffn_runs(model.config)
    matrices, count = dependency_matrices(model, runs, list(batches))
    out = {
        "metric": METRIC,
        "num_tokens": count,
        "num_layers": model.config.num_layers,
        "runs": [run_scores(r, m) for r, m in zip(runs, matrices)],
    }
    if path is not None:
        write_json_atomic(path, out)
    return out
