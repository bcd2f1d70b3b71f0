"""Initialize cheaper child sub-blocks from their parent (Puzzle, arXiv 2411.19146, sec. 3).

Every function takes parent modules (and, where the method is data-driven, calibration
statistics) and returns a *new* module of the reference model's classes, on the parent's
device and dtype; the parent is never modified. The pieces compose freely:

    stats = collect_ffn_activation_stats(model, batches)          # {layer: [I]}
    imp = ffn_channel_importance(stats[i], mlp.down_proj.weight)  # [I]
    child = prune_ffn(mlp, keep=512, importance=imp)              # narrower SwiGLU

    io = capture_sublayer_io(model, batches, layers=[i])          # {layer: {"ffn_in": [N, h], ...}}
    lin = linear_ffn_init_lstsq(io[i]["ffn_in"], io[i]["ffn_out"])

Calibration batches (`batches`, any iterable) hold one of:
  * input_ids [B, T]                                 every token counts;
  * (input_ids, token_mask)                          token_mask [B, T] (e.g. a collate()'s loss
                                                     mask) picks the tokens that count; it does
                                                     not change attention (right padding only
                                                     follows real tokens, so causal attention
                                                     never sees it);
  * {"input_ids", "attention_mask"?, "loss_mask"?}   attention_mask marks real tokens: padding
                                                     is hidden from attention (left padding
                                                     works) and excluded; loss_mask, if given,
                                                     further restricts which tokens count.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..arch.config import ModelConfig
from ..model.llama import GQAttention, HeteroLlamaForCausalLM, LinearAttention, LinearFFN, SwiGLU

# ----------------------------------------------------------------------------- calibration


def _unpack(batch, device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """(input_ids, positions, key_valid, counted [B, T] bool) for one calibration batch."""
    key_valid = token_mask = None
    if isinstance(batch, Mapping):
        ids, key_valid, token_mask = batch["input_ids"], batch.get("attention_mask"), batch.get("loss_mask")
    elif isinstance(batch, (tuple, list)):
        ids, token_mask = batch
    else:
        ids = batch
    ids = ids.to(device)
    counted = torch.ones(ids.shape, dtype=torch.bool, device=device)
    positions = None
    if key_valid is not None:
        key_valid = key_valid.to(device).bool()
        counted &= key_valid
        positions = (key_valid.long().cumsum(-1) - 1).clamp_min(0)  # left padding: real tokens start at 0
        if bool(key_valid.all()):
            key_valid = positions = None  # nothing hidden: keep SDPA's causal fast path
    if token_mask is not None:
        counted &= token_mask.to(device).bool()
    return ids, positions, key_valid, counted


def _run_calibration(model: HeteroLlamaForCausalLM, batches: Iterable, hooks: list, state: dict) -> None:
    """Forward every batch through the layers (no lm_head) with `hooks` registered, then remove
    them, also on error. `state["counted"]` holds the current batch's token mask for the hooks."""
    device = model.lm_head.weight.device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                ids, positions, key_valid, counted = _unpack(batch, device)
                state["counted"] = counted
                model.hidden_states(ids, positions=positions, key_valid=key_valid)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def collect_ffn_activation_stats(model: HeteroLlamaForCausalLM, batches: Iterable) -> dict[int, torch.Tensor]:
    """Mean |silu(gate x) * up x| per intermediate channel, over all counted calibration tokens.

    Returns {layer index: float32 [I]} for every layer whose FFN is a plain SwiGLU (members of
    parallel FFN groups are not included). Gathered by a forward pre-hook on `mlp.down_proj`,
    whose input is exactly that activation; sums are kept in float64 so long runs don't drift.
    """
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    state: dict = {}

    def make_hook(i: int):
        def hook(module, args):
            a = args[0][state["counted"]].abs()  # [N, I], counted tokens only
            sums[i] = sums[i] + a.sum(0, dtype=torch.float64)
            counts[i] += a.shape[0]

        return hook

    hooks = []
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, SwiGLU):
            w = layer.mlp.down_proj.weight
            sums[i] = torch.zeros(w.shape[1], dtype=torch.float64, device=w.device)
            counts[i] = 0
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(make_hook(i)))
    _run_calibration(model, batches, hooks, state)
    if sums and not next(iter(counts.values())):
        raise ValueError("collect_ffn_activation_stats: the calibration batches had no counted tokens")
    return {i: (sums[i] / counts[i]).float() for i in sums}


def capture_sublayer_io(
    model: HeteroLlamaForCausalLM,
    batches: Iterable,
    layers: Iterable[int] | None = None,
    max_tokens: int | None = None,
) -> dict[int, dict[str, torch.Tensor]]:
    """The parent's sub-block inputs/outputs on counted tokens, flattened to [N, hidden].

    Returns {layer: {"attn_in", "attn_out", "ffn_in", "ffn_out"}} where `*_in` is the
    *normalized* input the sub-block sees (after its RMSNorm) and `*_out` its output before the
    residual add, so a replacement f with f(*_in) ~ *_out keeps the residual stream. Keys for
    absent (no-op) sub-blocks are left out. Used to fit linear replacements by least squares.
    `layers` restricts which layers are kept (default all); `max_tokens` caps N per layer
    (memory grows as N x hidden x 4 tensors x layers). Tensors are float32 on the CPU.
    """
    wanted = set(range(len(model.model.layers))) if layers is None else set(layers)
    store: dict[int, dict[str, list[torch.Tensor]]] = {i: {} for i in wanted}
    state: dict = {}

    def keep(i: int, key: str, t: torch.Tensor):
        chunks = store[i].setdefault(key, [])
        have = sum(c.shape[0] for c in chunks)
        if max_tokens is not None and have >= max_tokens:
            return
        rows = t[state["counted"]]
        if max_tokens is not None:
            rows = rows[: max_tokens - have]
        chunks.append(rows.detach().float().cpu())

    def make_hook(i: int, name: str):
        def hook(module, args, output):
            keep(i, f"{name}_in", args[0])
            keep(i, f"{name}_out", output)

        return hook

    hooks = []
    for i in sorted(wanted):
        layer = model.model.layers[i]
        if layer.self_attn is not None:
            hooks.append(layer.self_attn.register_forward_hook(make_hook(i, "attn")))
        if layer.mlp is not None:
            hooks.append(layer.mlp.register_forward_hook(make_hook(i, "ffn")))
    _run_calibration(model, batches, hooks, state)
    return {i: {k: torch.cat(v) for k, v in store[i].items()} for i in sorted(wanted)}


# ----------------------------------------------------------------------------- FFN pruning


def ffn_channel_importance(act_abs_mean: torch.Tensor, down_proj_weight: torch.Tensor) -> torch.Tensor:
    """Channel j's importance = mean|activation_j| x ||W_down[:, j]||_2: a typical size of what
    the channel writes into the residual stream. act_abs_mean [I], down_proj_weight [h, I] -> [I]."""
    if act_abs_mean.shape != down_proj_weight.shape[1:]:
        raise ValueError(
            f"ffn_channel_importance: activations {tuple(act_abs_mean.shape)} do not match "
            f"down_proj columns {down_proj_weight.shape[1]}"
        )
    return act_abs_mean.float() * down_proj_weight.float().norm(dim=0).to(act_abs_mean.device)


def top_channels(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` largest entries, in ascending (original) order."""
    if not 1 <= keep <= importance.numel():
        raise ValueError(f"keep={keep}: expected 1 <= keep <= {importance.numel()}")
    return importance.topk(keep).indices.sort().values


def _new_like(ref: torch.Tensor, ctor, *args) -> nn.Module:
    """A fresh module built directly on `ref`'s device and cast to its dtype."""
    with torch.device(ref.device):
        return ctor(*args).to(ref.dtype)


@torch.no_grad()
def prune_ffn(mlp: SwiGLU, keep: int, importance: torch.Tensor) -> SwiGLU:
    """A narrower SwiGLU keeping the `keep` most important intermediate channels (gate/up rows,
    down columns), in their original order. Equals the parent with the other channels' activations
    set to zero."""
    idx = top_channels(importance, keep).to(mlp.gate_proj.weight.device)
    child = _new_like(mlp.gate_proj.weight, SwiGLU, mlp.gate_proj.in_features, keep)
    child.gate_proj.weight.copy_(mlp.gate_proj.weight[idx])
    child.up_proj.weight.copy_(mlp.up_proj.weight[idx])
    child.down_proj.weight.copy_(mlp.down_proj.weight[:, idx])
    return child


# ----------------------------------------------------------------------------- KV heads


def _kv_groups(attn: GQAttention, cfg: ModelConfig, new_kv: int) -> int:
    """How many old KV heads merge into each new one; checks that the reduction is valid."""
    old_kv, n_heads = attn.n_kv, cfg.num_attention_heads
    if attn.n_heads != n_heads or attn.head_dim != cfg.kv_channels:
        raise ValueError(
            f"attention has {attn.n_heads} heads of dim {attn.head_dim}, config says "
            f"{n_heads} of dim {cfg.kv_channels}"
        )
    if new_kv <= 0 or old_kv % new_kv or n_heads % new_kv:
        raise ValueError(
            f"new_kv={new_kv}: must be a positive divisor of the parent's num_kv_heads={old_kv} "
            f"(and of num_attention_heads={n_heads}) so whole groups of contiguous KV heads merge"
        )
    return old_kv // new_kv


def _per_head(w: torch.Tensor, n: int) -> torch.Tensor:
    """[n * d, h] projection weight -> [n, d, h]."""
    return w.view(n, -1, w.shape[-1])


@torch.no_grad()
def _gqa_with_kv(attn: GQAttention, cfg: ModelConfig, k: torch.Tensor, v: torch.Tensor) -> GQAttention:
    """A GQAttention with the parent's q/o projections and the given per-head k/v [new_kv, d, h]."""
    child = _new_like(attn.q_proj.weight, GQAttention, cfg, k.shape[0])
    child.q_proj.weight.copy_(attn.q_proj.weight)
    child.o_proj.weight.copy_(attn.o_proj.weight)
    child.k_proj.weight.copy_(k.reshape(child.k_proj.weight.shape))
    child.v_proj.weight.copy_(v.reshape(child.v_proj.weight.shape))
    return child


def reduce_kv_heads_mean(attn: GQAttention, cfg: ModelConfig, new_kv: int) -> GQAttention:
    """Fewer KV heads by averaging each contiguous group of old_kv // new_kv old heads' k/v
    projections (Puzzle's default). GQA grouping is contiguous, so the query heads served by new
    head j are exactly those the old heads of group j served; q_proj/o_proj are unchanged."""
    r = _kv_groups(attn, cfg, new_kv)
    k = _per_head(attn.k_proj.weight, attn.n_kv).unflatten(0, (new_kv, r)).float().mean(1)
    v = _per_head(attn.v_proj.weight, attn.n_kv).unflatten(0, (new_kv, r)).float().mean(1)
    return _gqa_with_kv(attn, cfg, k, v)


@torch.no_grad()
def kv_head_importance(attn: GQAttention, input_cov: torch.Tensor | None = None) -> torch.Tensor:
    """How much each KV head can move the residual stream through its value/output path: [n_kv].

    importance_k = sqrt(sum over query heads q served by k of E||W_o[:, q] W_v[k] x||^2), i.e.
    the output energy of the head's values if attention were one-hot. E is over inputs x with
    second moment `input_cov` [h, h] (e.g. x.T @ x / N of captured normalized attention inputs);
    by default x is isotropic (identity), making it a weights-only score. Computed through [d, d]
    Gram matrices, never an [h, h] map per head.
    """
    n_kv, g, d = attn.n_kv, attn.n_heads // attn.n_kv, attn.head_dim
    wv = _per_head(attn.v_proj.weight, n_kv).double()  # [kv, d, h]
    wo = attn.o_proj.weight.double().view(-1, attn.n_heads, d)  # [h, H, d]
    cov_v = wv @ wv.transpose(1, 2) if input_cov is None else wv @ input_cov.double() @ wv.transpose(1, 2)
    gram_o = torch.einsum("hqd,hqe->qde", wo, wo)  # [H, d, d]
    per_q = (gram_o * cov_v.repeat_interleave(g, dim=0)).sum((1, 2))  # [H]
    return per_q.view(n_kv, g).sum(1).clamp_min(0).sqrt().float()


def reduce_kv_heads_importance(
    attn: GQAttention, cfg: ModelConfig, new_kv: int, importance: torch.Tensor
) -> GQAttention:
    """Fewer KV heads by keeping, within each contiguous group of old heads, the most important one
    (`importance` [old_kv], e.g. `kv_head_importance`); its k/v rows are copied exactly and it then
    serves the whole group's query heads. q_proj/o_proj are unchanged."""
    r = _kv_groups(attn, cfg, new_kv)
    if importance.shape != (attn.n_kv,):
        raise ValueError(f"importance: expected shape ({attn.n_kv},), got {tuple(importance.shape)}")
    chosen = importance.view(new_kv, r).argmax(1) + torch.arange(new_kv, device=importance.device) * r
    chosen = chosen.to(attn.k_proj.weight.device)
    k = _per_head(attn.k_proj.weight, attn.n_kv)[chosen]
    v = _per_head(attn.v_proj.weight, attn.n_kv)[chosen]
    return _gqa_with_kv(attn, cfg, k, v)


# ----------------------------------------------------------------------------- linear replacements


def linear_attention_weight(attn: GQAttention) -> torch.Tensor:
    """W_o · repeat(W_v): [h, h], what the attention computes when every token attends only to
    itself (softmax over one key is 1, RoPE does not touch values). Float32."""
    g = attn.n_heads // attn.n_kv
    wv = _per_head(attn.v_proj.weight.float(), attn.n_kv).repeat_interleave(g, dim=0)  # [H, d, h]
    return attn.o_proj.weight.float() @ wv.reshape(-1, wv.shape[-1])


@torch.no_grad()
def linear_attention_init(attn: GQAttention, cfg: ModelConfig) -> LinearAttention:
    """A LinearAttention initialized to the parent's self-attention-only map (see above)."""
    child = _new_like(attn.o_proj.weight, LinearAttention, cfg)
    child.linear_attn.weight.copy_(linear_attention_weight(attn))
    return child


def lstsq_weight(x: torch.Tensor, y: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """W [h_out, h_in] minimizing mean_n ||W x_n - y_n||^2 + ridge ||W||_F^2, in float64.

    ridge == 0: torch.linalg.lstsq (QR/complete-orthogonal; robust to poorly conditioned x).
    ridge > 0: normal equations (x^T x / N + ridge I) W^T = x^T y / N, a Cholesky-friendly solve;
    the ridge is per token, so its strength does not depend on how many tokens were captured.
    x [N, h_in], y [N, h_out]. Returns float32 on x's device.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"lstsq_weight: expected x [N, h_in] and y [N, h_out], got {tuple(x.shape)}, {tuple(y.shape)}")
    if ridge < 0:
        raise ValueError(f"ridge={ridge}: expected >= 0")
    x64, y64 = x.double(), y.double()
    if ridge == 0:
        return torch.linalg.lstsq(x64, y64).solution.T.float()
    n = x64.shape[0]
    gram = x64.T @ x64 / n + ridge * torch.eye(x64.shape[1], dtype=x64.dtype, device=x64.device)
    return torch.linalg.solve(gram, x64.T @ y64 / n).T.float()


def _linear_ffn_with(weight: torch.Tensor, like: torch.Tensor) -> LinearFFN:
    child = _new_like(like, LinearFFN, weight.shape[0])
    with torch.no_grad():
        child.linear_mlp.weight.copy_(weight)
    return child


def linear_ffn_init_lstsq(x_normed: torch.Tensor, y: torch.Tensor, ridge: float = 0.0) -> LinearFFN:
    """The linear FFN best fitting the parent FFN on captured pairs: x_normed [N, h] is the
    normalized FFN input, y [N, h] its output (`capture_sublayer_io`'s ffn_in/ffn_out).
    Built on x_normed's device, in its dtype."""
    return _linear_ffn_with(lstsq_weight(x_normed, y, ridge), x_normed)


def linear_attention_init_lstsq(
    x_normed: torch.Tensor, y: torch.Tensor, cfg: ModelConfig, ridge: float = 0.0
) -> LinearAttention:
    """The data-driven alternative to `linear_attention_init`: fit attn_in -> attn_out pairs."""
    child = _new_like(x_normed, LinearAttention, cfg)
    with torch.no_grad():
        child.linear_attn.weight.copy_(lstsq_weight(x_normed, y, ridge))
    return child


@torch.no_grad()
def linear_ffn_init_from_weights(mlp: SwiGLU) -> LinearFFN:
    """Data-free linear FFN W_down · W_up: the SwiGLU with its gate dropped (silu(gate) -> 1)."""
    w = mlp.down_proj.weight.float() @ mlp.up_proj.weight.float()
    return _linear_ffn_with(w, mlp.down_proj.weight)
