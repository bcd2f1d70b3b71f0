"""megatron-core layer spec for a Puzzle child.

Built on megatron-core's own heterogeneous spec (`get_gpt_heterogeneous_layer_spec`), which
already gives every block its own attention (GQA with the layer's `num_query_groups`, a
gathered hidden->hidden linear, or a no-op without norm) and FFN (SwiGLU of the layer's width,
a gathered linear, or a no-op), with TE or local modules, sliced for the pipeline stage.

What it lacks is FFN Fusion's parallel group. The heterogeneous JSON written by
`nemo_plugins.arch.mcore_json` describes a group to megatron-core as the one wide SwiGLU its
swiglu members make together (a fused FFN is one wide FFN, also under tensor parallelism: the
intermediate dimension is split across ranks like any FFN's), so megatron's spec already
builds that part. A group with a linear member gets `MLPWithLinear` here instead: the same wide
MLP plus a gathered hidden->hidden linear on the same normalized input, outputs summed.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

from ..arch.config import ArchConfigError, ModelConfig
from . import require_nemo

require_nemo("megatron.core")

from megatron.core.models.gpt.heterogeneous import heterogeneous_layer_specs as _hetero  # noqa: E402
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron.core.transformer.heterogeneous.linear_replacements import (  # noqa: E402
    ColumnParallelLinearGathered,
)
from megatron.core.transformer.mlp import MLP, MLPSubmodules  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec, build_module  # noqa: E402
from megatron.core.transformer.torch_norm import WrappedTorchNorm  # noqa: E402
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules  # noqa: E402
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset  # noqa: E402

HAVE_TE = _hetero.HAVE_TE


# ----------------------------------------------------------------------------- the fused FFN module


@dataclasses.dataclass
class MLPWithLinearSubmodules(MLPSubmodules):
    """`MLPSubmodules` plus the spec of the linear member."""

    linear_mlp: ModuleSpec | type | None = None


class MLPWithLinear(MLP):
    """A parallel FFN group: one wide SwiGLU (`linear_fc1`/`linear_fc2`, as megatron's MLP,
    width `config.ffn_hidden_size`) plus a hidden->hidden linear (`linear_mlp`), both applied
    to the same input and summed.

    The linear member is gathered over tensor parallelism (and reduce-scattered under sequence
    parallelism), so its output has the same layout as the MLP's row-parallel output.
    """

    def __init__(self, config, submodules: MLPWithLinearSubmodules, tp_group=None, **kwargs):
        super().__init__(config, submodules, ffn_hidden_size=config.ffn_hidden_size, tp_group=tp_group)
        self.linear_mlp = build_module(submodules.linear_mlp, config=config)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        output, bias = super().forward(hidden_states, per_token_scale, **kwargs)
        linear, _ = self.linear_mlp(hidden_states)
        return output + linear, bias


# ----------------------------------------------------------------------------- validation


def ffn_width(f) -> int | None:
    """Width of the MLP megatron builds for an FFN: its own, a group's summed swiglu width, or None."""
    if f.kind == "swiglu":
        return f.intermediate_size
    if f.kind == "parallel":
        return sum(m.intermediate_size for m in f.members if m.kind == "swiglu") or None
    return None


def check_parallelism(arch: ModelConfig, tensor_model_parallel_size: int = 1) -> None:
    """Raise `ArchConfigError` naming the layer and sizes that tensor parallelism cannot split.

    Every GQA layer's KV heads must divide the TP size or be divisible by it; every FFN width (a parallel group's summed swiglu width), the
    attention heads and the vocabulary must be divisible by the TP size; so must the hidden size
    when a linear replacement (column-parallel, then gathered) is present. Parallel groups need
    at least one swiglu member and at most one linear member.
    """
    tp = tensor_model_parallel_size
    if not isinstance(tp, int) or tp < 1:
        raise ArchConfigError(f"tensor_model_parallel_size={tp!r}: expected a positive integer")
    for name in ("num_attention_heads", "vocab_size"):
        if getattr(arch, name) % tp:
            raise ArchConfigError(
                f"{name}={getattr(arch, name)} is not divisible by tensor_model_parallel_size={tp}"
            )
    for i, b in enumerate(arch.blocks):
        a, f = b.attention, b.ffn
        # megatron-core splits KV heads over TP ranks, or replicates them when there are fewer
        # KV heads than ranks (Puzzle's 1- and 2-head layers under TP 8): either must divide.
        if a.kind == "gqa" and a.num_kv_heads % tp and tp % a.num_kv_heads:
            raise ArchConfigError(
                f"layers[{i}].attention: num_kv_heads={a.num_kv_heads} and tensor_model_parallel_size={tp}: "
                "one must divide the other"
            )
        if f.kind == "parallel":
            kinds = Counter(m.kind for m in f.members)
            if kinds["linear"] > 1 or not kinds["swiglu"]:
                raise ArchConfigError(
                    f"layers[{i}].ffn: a parallel group must be swiglu members plus at most one linear member, "
                    f"got {kinds['swiglu']} swiglu and {kinds['linear']} linear (sum the linear members into one "
                    "first, as FFN Fusion does)"
                )
        width = ffn_width(f)
        if width is not None and width % tp:
            raise ArchConfigError(
                f"layers[{i}].ffn: intermediate size {width} is not divisible by tensor_model_parallel_size={tp}"
            )
        has_linear = a.kind == "linear" or f.kind == "linear" or any(m.kind == "linear" for m in f.members)
        if has_linear and arch.hidden_size % tp:
            raise ArchConfigError(
                f"layers[{i}]: hidden_size={arch.hidden_size} of its linear replacement is not divisible by "
                f"tensor_model_parallel_size={tp}"
            )


# ----------------------------------------------------------------------------- the spec


def linear_member_layers(config) -> set[int]:
    """0-based layers whose FFN is a parallel group with a linear member, read from the
    heterogeneous JSON's `members` entries (written by `nemo_plugins.arch.mcore_json`)."""
    blocks = json.loads(config.heterogeneous_layers_config_encoded_json)["block_configs"]
    layers = set()
    for i, block in enumerate(blocks):
        members = (block.get("mlp") or block.get("ffn") or {}).get("members")
        if not members:
            continue
        linear = sum(bool(m.get("replace_with_linear")) for m in members)
        swiglu = sum(not m.get("replace_with_linear") and not m.get("no_op") for m in members)
        if linear > 1 or not swiglu:
            raise ArchConfigError(
                f"layers[{i}].ffn: a parallel group must be swiglu members plus at most one linear member, "
                f"got {swiglu} swiglu and {linear} linear (sum the linear members into one first, as FFN Fusion does)"
            )
        if linear:
            layers.add(i)
    return layers


def _mlp_with_linear_layer(spec: ModuleSpec, use_te: bool, normalization: str) -> ModuleSpec:
    """`spec` (megatron's layer spec for the group's wide SwiGLU) with `MLPWithLinear` as its FFN.

    The linear member needs the normalized input, so the norm is a separate module (not fused
    into fc1 as TE's spec does) and is saved as `pre_mlp_layernorm.weight` with TE and without.
    """
    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        norm, fc1, fc2 = TENorm, TEColumnParallelLinear, TERowParallelLinear
    else:
        norm = _hetero.LNImpl if normalization == "LayerNorm" else WrappedTorchNorm
        fc1, fc2 = ColumnParallelLinear, RowParallelLinear
    mlp = ModuleSpec(
        module=MLPWithLinear,
        submodules=MLPWithLinearSubmodules(
            linear_fc1=fc1,
            linear_fc2=fc2,
            linear_mlp=ModuleSpec(module=ColumnParallelLinearGathered, params={"tp_comm_buffer_name": "linear_mlp"}),
        ),
    )
    keys_map = {k: v for k, v in spec.submodules.sharded_state_dict_keys_map.items() if k != "pre_mlp_layernorm."}
    submodules = dataclasses.replace(
        spec.submodules, pre_mlp_layernorm=norm, mlp=mlp, sharded_state_dict_keys_map=keys_map
    )
    return dataclasses.replace(spec, submodules=submodules)


def puzzle_layer_spec(config, use_te: bool | None = None, vp_stage: int | None = None, pp_rank: int | None = None):
    """`TransformerBlockSubmodules` for the layers of this pipeline stage.

    `config` is a megatron `HeterogeneousTransformerConfig` (e.g. `PuzzleChildConfig`);
    `use_te=None` uses Transformer Engine when it is installed, local modules otherwise. The
    signature matches megatron's `get_gpt_heterogeneous_layer_spec`, so NeMo passes `vp_stage`.
    """
    use_te = HAVE_TE if use_te is None else use_te
    block = _hetero.get_gpt_heterogeneous_layer_spec(config, use_te=use_te, vp_stage=vp_stage, pp_rank=pp_rank)
    patched = linear_member_layers(config)
    if not patched:
        return block
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    specs = [
        _mlp_with_linear_layer(spec, use_te, config.normalization) if offset + i in patched else spec
        for i, spec in enumerate(block.layer_specs)
    ]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=block.layer_norm)
