"""Batched generation: left-padded prompts, KV cache, greedy / temperature / top-p, a repetition
penalty, stop tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .llama import HeteroLlamaForCausalLM


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; top_p 1.0 keeps the whole distribution.

    `repetition_penalty` > 1 lowers the logit of every token the completion already holds, before
    sampling: divided by it where positive, multiplied where negative (transformers' rule). 1.0 is
    off. Unlike transformers, the prompt's tokens are not counted: every chat prompt holds the
    end-of-turn token, and penalizing it keeps answers from stopping (on SmolLM2's SFT child,
    penalty 1.2: 57% of thinking answers cut at the token limit with the prompt counted, 0% without)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: expected >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: expected >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: expected 0 < top_p <= 1")
        if not 1.0 <= self.repetition_penalty < float("inf"):
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: expected a finite number >= 1 (1 is off)")


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """`logits` [B, V] with each row's `seen` [B, V] tokens penalized (see `SamplingConfig`)."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= cfg.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), longest), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, longest - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            valid[i, longest - len(p) :] = True
    return ids.to(device), valid.to(device)


# Stopped rows leave the batch (with the KV cache, `_rows_to_keep`) once it can shrink by an eighth,
# to a multiple of ROW_GRANULE rows and never below MIN_ROWS. The CPU GEMM (MKL) computes rows in
# blocks of 4; a remainder of 1-3 rows (and, with several threads, some other counts) takes other
# paths, which round differently. With every batch a whole number of blocks, the shrunken batches
# give the same logits bit for bit as the full one (measured at 1-16 threads; tests/test_model.py
# checks the completions). Another BLAS may differ in the last bits, as any change of BLAS does.
ROW_GRANULE = 4
MIN_ROWS = 16


def _rows_to_keep(alive: torch.Tensor) -> torch.Tensor | None:
    """Positions in the running batch to keep, given which of its rows are `alive`; None: keep all.

    The live rows, topped up with stopped ones to a multiple of ROW_GRANULE and to MIN_ROWS."""
    n_run = alive.numel()
    n_alive = int(alive.sum())
    target = -(-max(n_alive, MIN_ROWS) // ROW_GRANULE) * ROW_GRANULE
    if n_run % ROW_GRANULE or target > 0.875 * n_run:
        return None
    order = torch.argsort((~alive).to(torch.int8), stable=True)  # live rows first, in batch order
    return order[:target].sort().values


@torch.no_grad()
def generate(
    model: HeteroLlamaForCausalLM,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig = SamplingConfig(),
    *,
    pad_id: int = 0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue each prompt; returns the new tokens of each, ending at (and including) a stop token.

    With `use_cache=False` every step re-runs the whole sequence (the slow path, kept for
    benchmarks and as a check of the cache). With the cache, rows that have stopped stop being
    computed (see `ROW_GRANULE`); sampling still draws for every row, so a row's tokens do not
    depend on when the others stop.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    device = model.lm_head.weight.device
    ids, valid = _left_pad(prompts, pad_id, device)
    B, T = ids.shape
    positions = (valid.long().cumsum(-1) - 1).clamp_min(0)
    padded = not bool(valid.all())
    stop = torch.tensor(sorted(cfg.stop_token_ids), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = torch.full((B, cfg.max_new_tokens), pad_id, dtype=torch.long, device=device)
    n_out = torch.zeros(B, dtype=torch.long, device=device)

    cache = model.new_cache(B, T + cfg.max_new_tokens) if use_cache else None
    running = torch.arange(B, device=device)  # the batch rows the model still computes (cache order)
    logits = _last_logits(model, ids, positions, valid if padded else None, cache)
    penalize = cfg.repetition_penalty != 1.0
    seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=device) if penalize else None
    for step in range(cfg.max_new_tokens):
        if seen is not None:
            logits = penalize_repeats(logits, seen, cfg.repetition_penalty)
        nxt = sample_next(logits, cfg, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        if seen is not None:
            seen[torch.arange(B, device=device), nxt] = True
        out[:, step] = nxt
        n_out += (~done).long()
        if len(stop):
            done |= torch.isin(nxt, stop)
        if bool(done.all()) or step == cfg.max_new_tokens - 1:
            break
        next_pos = positions[:, -1:] + 1
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        positions = torch.cat([positions, next_pos], dim=1)
        if use_cache:
            keep = _rows_to_keep(~done[running])
            if keep is not None:
                running = running[keep]
                cache.keep(keep)
            key_valid = valid[running] if padded else None
            step_logits = model(nxt[running, None], positions=next_pos[running], key_valid=key_valid, cache=cache)
            # Rows no longer computed keep stale logits: they have stopped, their draws are discarded.
            logits = logits.index_copy(0, running, step_logits[:, -1]) if len(running) < B else step_logits[:, -1]
        else:
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            logits = _last_logits(model, ids, positions, valid if padded else None, None)
    return [out[i, : n_out[i]].tolist() for i in range(B)]


def _last_logits(model, ids, positions, key_valid, cache) -> torch.Tensor:
    """Logits [B, V] of the last position only: the prompt's other positions need no vocabulary
    projection (with a 49k vocabulary, 64 prompts of 100 tokens would hold 1.3 GB of logits)."""
    hidden = model.hidden_states(ids, positions=positions, key_valid=key_valid, cache=cache)
    return model.lm_head(hidden[:, -1])
