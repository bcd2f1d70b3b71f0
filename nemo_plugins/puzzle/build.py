"""Build every library variant as a module initialized from the parent (before BLD).

A variant's module is a `Block` holding only the part it replaces (decoupled attention
variants carry no FFN, and vice versa). Sub-blocks equal to the parent's are copied;
fewer KV heads average contiguous head groups (or keep the most important head of each);
narrower FFNs keep the channels with the largest activation importance; linear attention
starts from W_o·repeat(W_v); linear FFNs from least squares on calibration activations.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..arch.config import ModelConfig
from ..model.llama import Block, HeteroLlamaForCausalLM
from . import init as I
from .costs import subblock_config
from .library import Variant


@dataclass
class InitConfig:
    kv_heads: str = "mean"  # mean | importance
    linear_ffn: str = "lstsq"  # lstsq | weights (W_down·W_up)
    calibration_batches: int = 8
    max_tokens: int = 4096  # per layer, for least squares

    def __post_init__(self):
        if self.kv_heads not in ("mean", "importance"):
            raise ValueError(f"init.kv_heads={self.kv_heads!r}: expected 'mean' or 'importance'")
        if self.linear_ffn not in ("lstsq", "weights"):
            raise ValueError(f"init.linear_ffn={self.linear_ffn!r}: expected 'lstsq' or 'weights'")


def _attention_module(parent_block: Block, cfg: ModelConfig, v_attn, init: InitConfig):
    pa = parent_block.config.attention
    if v_attn == pa:
        return copy.deepcopy(parent_block.self_attn)
    if v_attn.kind == "gqa":
        if init.kv_heads == "importance":
            imp = I.kv_head_importance(parent_block.self_attn)
            return I.reduce_kv_heads_importance(parent_block.self_attn, cfg, v_attn.num_kv_heads, imp)
        return I.reduce_kv_heads_mean(parent_block.self_attn, cfg, v_attn.num_kv_heads)
    if v_attn.kind == "linear":
        return I.linear_attention_init(parent_block.self_attn, cfg)
    raise ValueError(f"cannot initialize attention {v_attn} from parent attention {pa}")


def _ffn_module(parent_block: Block, layer: int, v_ffn, init: InitConfig, calib: dict):
    pf = parent_block.config.ffn
    if v_ffn == pf:
        return copy.deepcopy(parent_block.mlp)
    if v_ffn.kind == "swiglu" and pf.kind == "swiglu":
        imp = I.ffn_channel_importance(calib["act"][layer], parent_block.mlp.down_proj.weight)
        return I.prune_ffn(parent_block.mlp, v_ffn.intermediate_size, imp)
    if v_ffn.kind == "linear":
        if init.linear_ffn == "lstsq":
            io = calib["io"][layer]
            return I.linear_ffn_init_lstsq(io["ffn_in"], io["ffn_out"])
        return I.linear_ffn_init_from_weights(parent_block.mlp)
    raise ValueError(f"cannot initialize FFN {v_ffn} from parent FFN {pf}")


def calibration(parent: HeteroLlamaForCausalLM, variants: list[Variant], batches, init: InitConfig) -> dict:
    """The parent statistics the initializations need (gathered only if some variant needs them)."""
    batches = list(batches)[: init.calibration_batches]
    out: dict = {"act": {}, "io": {}}
    pblocks = parent.config.blocks
    if any(v.block.ffn.kind == "swiglu" and v.block.ffn != pblocks[v.layer].ffn for v in variants):
        out["act"] = I.collect_ffn_activation_stats(parent, batches)
    lin_layers = sorted({v.layer for v in variants if v.block.ffn.kind == "linear" and pblocks[v.layer].ffn.kind != "linear"})
    if lin_layers and init.linear_ffn == "lstsq":
        out["io"] = I.capture_sublayer_io(parent, batches, layers=lin_layers, max_tokens=init.max_tokens)
    return out


@torch.no_grad()
def build_student(parent: HeteroLlamaForCausalLM, v: Variant, init: InitConfig, calib: dict) -> Block:
    """The variant's module, its weights derived from the parent."""
    cfg = parent.config
    pblock = parent.model.layers[v.layer]
    block = Block(cfg, subblock_config(v), v.layer).to(parent.lm_head.weight.device)
    if block.self_attn is not None:
        block.input_layernorm.load_state_dict(pblock.input_layernorm.state_dict())
        block.self_attn = _attention_module(pblock, cfg, block.config.attention, init)
    if block.mlp is not None:
        block.post_attention_layernorm.load_state_dict(pblock.post_attention_layernorm.state_dict())
        block.mlp = _ffn_module(pblock, v.layer, block.config.ffn, init, calib)
    return block


def build_students(parent: HeteroLlamaForCausalLM, variants: list[Variant], batches, init: InitConfig) -> dict[Variant, Block]:
    calib = calibration(parent, variants, batches, init)
    return {v: build_student(parent, v, init, calib) for v in variants}
