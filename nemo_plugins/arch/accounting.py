"""Exact integer accounting of a `ModelConfig`: parameters, KV cache, FLOPs, memory.

Conventions (those of the released nemotron-nas checkpoints):
- a GQA block holds input RMSNorm + q, k, v, o projections (no biases);
- a linear attention or linear FFN holds its RMSNorm + one [hidden, hidden] matrix;
- a SwiGLU FFN holds its RMSNorm + gate, up [I, hidden] and down [hidden, I];
- a parallel FFN group shares one RMSNorm and sums its members;
- no-op sub-blocks hold nothing; the model adds embeddings, final norm and (untied) lm_head.
FLOPs count 2 per multiply-add. Attention score FLOPs (QK^T and AV) depend on context:
prefill averages over causal positions of a `seq_len` prompt, decode attends to `seq_len` keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import ArchConfigError, BlockConfig, FFNConfig, ModelConfig

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1}


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ArchConfigError(f"dtype={dtype!r}: expected one of {sorted(DTYPE_BYTES)}") from None


def _attention_matrix_params(cfg: ModelConfig, block: BlockConfig) -> int:
    a, h = block.attention, cfg.hidden_size
    if a.kind == "gqa":
        return 2 * h * cfg.num_attention_heads * cfg.kv_channels + 2 * h * a.num_kv_heads * cfg.kv_channels
    return h * h if a.kind == "linear" else 0


def _ffn_matrix_params(h: int, f: FFNConfig) -> int:
    if f.kind == "swiglu":
        return 3 * h * f.intermediate_size
    if f.kind == "linear":
        return h * h
    if f.kind == "parallel":
        return sum(_ffn_matrix_params(h, m) for m in f.members)
    return 0


def attention_params(cfg: ModelConfig, block: BlockConfig) -> int:
    """Attention weights plus its input RMSNorm (none for a no-op)."""
    norm = 0 if block.attention.kind == "no_op" else cfg.hidden_size
    return norm + _attention_matrix_params(cfg, block)


def ffn_params(cfg: ModelConfig, block: BlockConfig) -> int:
    """FFN weights plus its RMSNorm (none for a no-op)."""
    norm = 0 if block.ffn.kind == "no_op" else cfg.hidden_size
    return norm + _ffn_matrix_params(cfg.hidden_size, block.ffn)


def block_params(cfg: ModelConfig, block: BlockConfig) -> int:
    return attention_params(cfg, block) + ffn_params(cfg, block)


def non_block_params(cfg: ModelConfig) -> int:
    """Embeddings, final norm and lm_head (counted once when tied)."""
    embed = cfg.vocab_size * cfg.hidden_size
    return embed + cfg.hidden_size + (0 if cfg.tie_word_embeddings else embed)


def kv_cache_bytes_per_token(cfg: ModelConfig, block: BlockConfig, dtype: str = "bf16") -> int:
    a = block.attention
    return 2 * a.num_kv_heads * cfg.kv_channels * dtype_bytes(dtype) if a.kind == "gqa" else 0


def block_matmul_flops(cfg: ModelConfig, block: BlockConfig) -> int:
    """FLOPs per token of the block's weight matmuls (2 per weight, norms ignored)."""
    return 2 * (_attention_matrix_params(cfg, block) + _ffn_matrix_params(cfg.hidden_size, block.ffn))


def attention_score_flops(cfg: ModelConfig, block: BlockConfig, context: float) -> float:
    """QK^T plus AV FLOPs for one query attending to `context` keys."""
    if block.attention.kind != "gqa":
        return 0
    return 4 * cfg.num_attention_heads * cfg.kv_channels * context


def block_flops_per_token(cfg: ModelConfig, block: BlockConfig, seq_len: int, phase: str) -> int:
    """Per-token FLOPs: `prefill` over a `seq_len` prompt, or `decode` with `seq_len` cached tokens."""
    if phase == "prefill":
        context = (seq_len + 1) / 2
    elif phase == "decode":
        context = seq_len
    else:
        raise ArchConfigError(f"phase={phase!r}: expected 'prefill' or 'decode'")
    return int(block_matmul_flops(cfg, block) + attention_score_flops(cfg, block, context))


@dataclass
class LayerReport:
    index: int
    attention: str
    ffn: str
    params: int
    kv_cache_bytes_per_token: int
    prefill_flops_per_token: int
    decode_flops_per_token: int


@dataclass
class ModelReport:
    layers: list[LayerReport]
    params: int
    block_params: int
    non_block_params: int
    kv_cache_bytes_per_token: int
    prefill_flops_per_token: int
    decode_flops_per_token: int
    weight_bytes: int
    kv_cache_bytes: int
    memory_bytes: int
    dtype: str
    batch_size: int
    seq_len: int

    def to_json(self) -> dict:
        d = asdict(self)
        totals = {k: v for k, v in d.items() if k != "layers"}
        return {"totals": totals, "layers": d["layers"]}


def describe_attention(cfg: ModelConfig, block: BlockConfig) -> str:
    a = block.attention
    return f"gqa(kv={a.num_kv_heads})" if a.kind == "gqa" else a.kind


def describe_ffn(f: FFNConfig) -> str:
    if f.kind == "swiglu":
        return f"swiglu({f.intermediate_size})"
    if f.kind == "parallel":
        return "parallel[" + ", ".join(describe_ffn(m) for m in f.members) + "]"
    return f.kind


def report(cfg: ModelConfig, *, dtype: str = "bf16", batch_size: int = 1, seq_len: int = 4096) -> ModelReport:
    """Per-layer and whole-model accounting at a (batch, sequence length, dtype) operating point."""
    if batch_size <= 0 or seq_len <= 0:
        raise ArchConfigError(f"batch_size={batch_size}, seq_len={seq_len}: expected positive integers")
    nbytes = dtype_bytes(dtype)
    layers = [
        LayerReport(
            index=i,
            attention=describe_attention(cfg, b),
            ffn=describe_ffn(b.ffn),
            params=block_params(cfg, b),
            kv_cache_bytes_per_token=kv_cache_bytes_per_token(cfg, b, dtype),
            prefill_flops_per_token=block_flops_per_token(cfg, b, seq_len, "prefill"),
            decode_flops_per_token=block_flops_per_token(cfg, b, seq_len, "decode"),
        )
        for i, b in enumerate(cfg.blocks)
    ]
    head_flops = 2 * cfg.vocab_size * cfg.hidden_size
    blocks = sum(layer.params for layer in layers)
    total = blocks + non_block_params(cfg)
    kv = sum(layer.kv_cache_bytes_per_token for layer in layers)
    kv_total = kv * batch_size * seq_len
    return ModelReport(
        layers=layers,
        params=total,
        block_params=blocks,
        non_block_params=non_block_params(cfg),
        kv_cache_bytes_per_token=kv,
        prefill_flops_per_token=sum(layer.prefill_flops_per_token for layer in layers) + head_flops,
        decode_flops_per_token=sum(layer.decode_flops_per_token for layer in layers) + head_flops,
        weight_bytes=total * nbytes,
        kv_cache_bytes=kv_total,
        memory_bytes=total * nbytes + kv_total,
        dtype=dtype,
        batch_size=batch_size,
        seq_len=seq_len,
    )


def count_params(cfg: ModelConfig) -> int:
    return sum(block_params(cfg, b) for b in cfg.blocks) + non_block_params(cfg)
