"""Reference heterogeneous Llama in plain PyTorch, readable top to bottom.

Every layer follows its `BlockConfig`: GQA attention with its own KV heads (through
`scaled_dot_product_attention`), a linear replacement (x + W·norm(x)), or nothing; then a
SwiGLU FFN with its own width, a linear replacement, nothing, or a parallel group of FFNs
summed on one normalized input. Parameter names follow the HF nemotron-nas layout
(`model.layers.{i}.self_attn.q_proj.weight`, `...self_attn.linear_attn.weight`,
`...mlp.linear_mlp.weight`), so checkpoints map one-to-one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..arch.config import BlockConfig, FFNConfig, ModelConfig, RopeScaling, validate

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back (as Llama does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies, with Llama-3 scaling: long wavelengths are slowed by `factor`,
    short ones kept, and the band between interpolated smoothly."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin of shape [B, 1, T, head_dim] for integer `positions` [B, T] (B may be 1)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated keys/values for the GQA layers of one batch of sequences."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype, device=None):
        self.max_len = max_len
        self.length = 0
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for i, b in enumerate(cfg.blocks):
            if b.attention.kind == "gqa":
                shape = (batch_size, b.attention.num_kv_heads, max_len, cfg.kv_channels)
                self.k[i] = torch.zeros(shape, dtype=dtype, device=device)
                self.v[i] = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's keys/values after the cached ones; return all of them so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len={self.max_len}")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def keep(self, rows: torch.Tensor):
        """Keep only the sequences `rows` (indices into the batch), in that order."""
        for cached in (self.k, self.v):
            for layer, t in cached.items():
                cached[layer] = t.index_select(0, rows)


# ----------------------------------------------------------------------------- sub-blocks


class GQAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, num_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, num_kv_heads, cfg.kv_channels
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)

    def forward(self, x, rope, mask, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        attn_mask, is_causal = mask
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=self.n_kv != self.n_heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LinearAttention(nn.Module):
    """Attention replaced by one [hidden, hidden] matrix (Puzzle's linear replacement)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.linear_attn = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x, rope, mask, cache, layer):
        return self.linear_attn(x)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LinearFFN(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear_mlp = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        return self.linear_mlp(x)


class ParallelFFN(nn.Module):
    """Several FFNs applied to the same normalized input, outputs summed (FFN Fusion)."""

    def __init__(self, hidden: int, members: tuple[FFNConfig, ...]):
        super().__init__()
        self.branches = nn.ModuleList(build_ffn(hidden, m) for m in members)

    def forward(self, x):
        return sum(branch(x) for branch in self.branches)


def build_ffn(hidden: int, f: FFNConfig) -> nn.Module:
    if f.kind == "swiglu":
        return SwiGLU(hidden, f.intermediate_size)
    if f.kind == "linear":
        return LinearFFN(hidden)
    if f.kind == "parallel":
        return ParallelFFN(hidden, f.members)
    raise ValueError(f"no module for FFN kind {f.kind!r}")


class Block(nn.Module):
    """One layer: x + attn(norm(x)), then x + ffn(norm(x)); absent sub-blocks pass x through."""

    def __init__(self, cfg: ModelConfig, block: BlockConfig, index: int):
        super().__init__()
        self.index = index
        self.config = block
        a, h, eps = block.attention, cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = self.self_attn = None
        if a.kind != "no_op":
            self.input_layernorm = RMSNorm(h, eps)
            self.self_attn = GQAttention(cfg, a.num_kv_heads) if a.kind == "gqa" else LinearAttention(cfg)
        self.post_attention_layernorm = self.mlp = None
        if block.ffn.kind != "no_op":
            self.post_attention_layernorm = RMSNorm(h, eps)
            self.mlp = build_ffn(h, block.ffn)

    def attention(self, x, rope, mask, cache=None):
        if self.self_attn is None:
            return x
        return x + self.self_attn(self.input_layernorm(x), rope, mask, cache, self.index)

    def ffn(self, x):
        if self.mlp is None:
            return x
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x, rope, mask, cache=None):
        return self.ffn(self.attention(x, rope, mask, cache))


# ----------------------------------------------------------------------------- model


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, b, i) for i, b in enumerate(cfg.blocks))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def _attention_mask(
    key_valid: torch.Tensor | None, q_len: int, k_len: int, device
) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for SDPA. Fast path: no padding and queries aligned to the keys' end."""
    if key_valid is None and (q_len == 1 or q_len == k_len):
        return None, q_len > 1
    offset = k_len - q_len
    q_pos = torch.arange(q_len, device=device)[:, None] + offset
    allowed = torch.arange(k_len, device=device)[None, :] <= q_pos  # [q, k] causal
    allowed = allowed[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :k_len].bool()
        # A query at a padding position would see no key at all (NaN); let it see itself.
        allowed = allowed | (torch.arange(k_len, device=device)[None, None, None, :] == q_pos[None, None])
    return allowed, False


class HeteroLlamaForCausalLM(nn.Module):
    """Heterogeneous Llama; `forward` returns logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = validate(cfg)
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer(
            "inv_freq", rope_inv_freq(cfg.kv_channels, cfg.rope_theta, cfg.rope_scaling), persistent=False
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module, std: float = 0.02):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)

    def prepare(self, input_ids, positions=None, key_valid=None, cache: KVCache | None = None, attn_mask=None):
        """Embeddings, RoPE tables and attention mask shared by all layers. `attn_mask`
        [B, 1, T, T] bool (True = may attend) replaces the causal/padding mask, e.g. the
        block-diagonal mask of packed sequences (`data.sft_data.packed_attention_mask`)."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if positions is None:  # one row, broadcast over the batch: RoPE tables stay [1, 1, T, d]
            positions = torch.arange(past, past + T, device=input_ids.device)[None]
        x = self.model.embed_tokens(input_ids)
        rope = rope_cos_sin(self.inv_freq, positions, x.dtype)
        if attn_mask is not None:
            if cache is not None or key_valid is not None:
                raise ValueError("attn_mask replaces the causal and padding mask: pass it without cache or key_valid")
            mask = (attn_mask, False)
        else:
            mask = _attention_mask(key_valid, T, past + T, input_ids.device)
        return x, rope, mask

    def hidden_states(self, input_ids, positions=None, key_valid=None, cache: KVCache | None = None, attn_mask=None):
        """Final-norm hidden states [B, T, hidden]."""
        x, rope, mask = self.prepare(input_ids, positions, key_valid, cache, attn_mask)
        for layer in self.model.layers:
            x = layer(x, rope, mask, cache)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.model.norm(x)

    def forward(self, input_ids, positions=None, key_valid=None, cache: KVCache | None = None, attn_mask=None):
        """input_ids [B, T]; positions [B, T] (default: continue after the cache);
        key_valid [B, cached+T] marks real (non-padding) tokens; cache is updated in place."""
        return self.lm_head(self.hidden_states(input_ids, positions, key_valid, cache, attn_mask))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, p.dtype, p.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None):
    """Mean next-token cross-entropy; `loss_mask` [B, T] selects which target tokens count.

    The targets are shifted (not the logits), so the [B, T, V] logits are never copied.
    """
    targets = F.pad(input_ids[:, 1:], (0, 1), value=IGNORE_INDEX)
    if loss_mask is not None:
        keep = F.pad(loss_mask[:, 1:], (0, 1), value=0).bool()
        targets = targets.masked_fill(~keep, IGNORE_INDEX)
    flat = targets.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (flat != IGNORE_INDEX).sum().clamp_min(1)
