"""NeMo 2 config and model class for Puzzle children (heterogeneous Llama-Nemotron models).

`PuzzleChildConfig` follows NeMo's `Llama33NemotronSuper49BConfig` (a Llama 3.1 config that
is also a megatron `HeterogeneousTransformerConfig`), but is built from the project's own
architecture description, named by `arch_path`: a model's config file (HF `config.json`, plain
Llama or nemotron-nas, or the project's `nemo_plugins_config.json`), read with
`model.checkpoint.read_config`. A path, not the architecture inline, so that NeMo-Run can write a
config to YAML and read it back (`--to-yaml` / `--yaml`): its reader takes nested mappings for
configs and cannot read back a JSON string. NeMo checkpoints stay self-contained: the file is an
io artifact, copied into the checkpoint's `context/` on save and read from there on load.

Every architectural TransformerConfig field (sizes, per-layer heterogeneous JSON, RoPE scaling,
tied embeddings) is derived from the architecture in `__post_init__`; parallelism, precision
and training settings stay ordinary overrides. `nemo_config(arch or path)` builds one; an
architecture given as a `ModelConfig` is written to a file under the project's cache first.
"""

# No `from __future__ import annotations` here: NeMo-Run parses command-line and YAML values by
# the fields' annotations, and a postponed annotation is the string "str", which it rejects
# (UnknownTypeError on `model.config.arch_path=...`, `model.config.seq_length=...`).
import dataclasses
import difflib
import importlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch.nn.functional as F

from ..arch.config import ArchConfigError, ModelConfig, validate
from ..arch.mcore_json import to_mcore_json
from ..model.checkpoint import NATIVE_CONFIG, config_file, read_config, write_config
from ..utils.hashing import config_hash
from . import require_nemo

llm = require_nemo("nemo.collections.llm")

from megatron.core.models.common.embeddings import rope_utils as _rope_utils  # noqa: E402
from megatron.core.transformer.heterogeneous.heterogeneous_config import (  # noqa: E402
    HeterogeneousTransformerConfig,
)
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from nemo.collections.llm.gpt.model.base import GPTConfig  # noqa: E402
from nemo.collections.llm.gpt.model.llama import Llama31Config  # noqa: E402
from nemo.lightning.io.artifact import FileArtifact  # noqa: E402

from .spec import HAVE_TE, check_parallelism, ffn_width, puzzle_layer_spec  # noqa: E402

# Llama configs default to fused RoPE and persistent LayerNorm kernels, which megatron refuses
# without TE (at config time, or when building its torch norms); here both default to "on when
# available", evaluated where the config is built or loaded.
ROPE_FUSION_AVAILABLE = (
    _rope_utils.fused_apply_rotary_pos_emb is not None or _rope_utils.fused_apply_rotary_pos_emb_thd is not None
)

# Llama-family settings every Puzzle child shares; changing one is an error.
FIXED_FIELDS = {
    "normalization": "RMSNorm",
    "gated_linear_unit": True,
    "add_bias_linear": False,
    "add_qkv_bias": False,
    "position_embedding_type": "rope",
    "rotary_percent": 1.0,
    "rotary_interleaved": False,
    "qk_layernorm": False,
}


def _most_common(values, default):
    return Counter(values).most_common(1)[0][0] if values else default


def arch_fields(arch: ModelConfig) -> dict:
    """The TransformerConfig/GPTConfig/Llama31Config field values that `arch` determines.

    `num_query_groups` and `ffn_hidden_size` are representative values (the most common ones);
    each layer's own values come from the heterogeneous JSON, which sets them explicitly (so
    megatron's 256-rounding of `ffn_mult` never applies).
    """
    gqa = [b.attention.num_kv_heads for b in arch.blocks if b.attention.kind == "gqa"]
    widths = [w for w in (ffn_width(b.ffn) for b in arch.blocks) if w is not None]
    rs = arch.rope_scaling
    theta = arch.rope_theta
    return {
        "num_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_query_groups": _most_common(gqa, arch.num_attention_heads),
        "kv_channels": arch.kv_channels,
        "ffn_hidden_size": _most_common(widths, 4 * arch.hidden_size),
        "vocab_size": arch.vocab_size,
        "layernorm_epsilon": arch.rms_norm_eps,
        "rotary_base": int(theta) if float(theta).is_integer() else theta,
        "share_embeddings_and_output_weights": arch.tie_word_embeddings,
        "scale_factor": None if rs is None else rs.factor,
        "low_freq_factor": None if rs is None else rs.low_freq_factor,
        "high_freq_factor": None if rs is None else rs.high_freq_factor,
        "old_context_len": None if rs is None else rs.original_max_position_embeddings,
        "heterogeneous_layers_config_encoded_json": json.dumps(to_mcore_json(arch)),
    }


# Fields that `arch_fields` derives, or that only the arch may set: not valid overrides.
ARCH_FIELDS = frozenset(
    {
        "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
        "ffn_hidden_size", "vocab_size", "layernorm_epsilon", "rotary_base",
        "share_embeddings_and_output_weights", "scale_factor", "low_freq_factor", "high_freq_factor",
        "old_context_len", "heterogeneous_layers_config_encoded_json", "heterogeneous_layers_config_path",
        "arch_path", "activation_func", *FIXED_FIELDS,
    }
)  # fmt: skip


def _same(name: str, current, derived) -> bool:
    if name == "heterogeneous_layers_config_encoded_json":
        return json.loads(current) == json.loads(derived)
    return current == derived


@dataclass
class PuzzleChildConfig(Llama31Config, HeterogeneousTransformerConfig):
    """A Puzzle child (or a plain Llama parent) as a NeMo GPT config.

    `arch_path` (required) is the architecture's config file (`config.json` or
    `nemo_plugins_config.json`); the fields below default to None, meaning "derived from the
    architecture"; a value that contradicts it is an error. `seq_length` defaults to the arch's
    `max_position_embeddings`. Llama-3 RoPE scaling is applied as `Llama31Config` does, only when
    the arch has it (`scale_factor` is None otherwise).
    """

    # NeMo's io_dump copies the file into the checkpoint's context/ and points arch_path at it.
    __io_artifacts__ = [FileArtifact("arch_path")]

    arch_path: str = ""
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    kv_channels: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    vocab_size: Optional[int] = None
    layernorm_epsilon: Optional[float] = None
    rotary_base: Optional[Union[int, float]] = None
    share_embeddings_and_output_weights: Optional[bool] = None
    seq_length: Optional[int] = None
    scale_factor: Optional[float] = None
    low_freq_factor: Optional[float] = None
    high_freq_factor: Optional[float] = None
    old_context_len: Optional[int] = None
    heterogeneous_layers_config_path: Optional[str] = None
    heterogeneous_layers_config_encoded_json: Optional[str] = None
    apply_rope_fusion: bool = ROPE_FUSION_AVAILABLE
    persist_layer_norm: bool = HAVE_TE  # megatron's torch norms (no TE) refuse it
    transformer_layer_spec: Union[ModuleSpec, Callable] = puzzle_layer_spec

    def __post_init__(self):
        arch = self._read_arch()
        for name, value in arch_fields(arch).items():
            current = getattr(self, name)
            if current is None:
                setattr(self, name, value)
            elif not _same(name, current, value):
                raise ArchConfigError(
                    f"PuzzleChildConfig.{name}={current!r} contradicts arch_path={self.arch_path!r} (which gives "
                    f"{value!r}); architecture fields come from the arch: change the arch instead"
                )
        for name, value in FIXED_FIELDS.items():
            if getattr(self, name) != value:
                raise ArchConfigError(
                    f"PuzzleChildConfig.{name}={getattr(self, name)!r}: Puzzle children are Llama models ({name}={value!r})"
                )
        if self.activation_func is not F.silu:
            raise ArchConfigError(f"PuzzleChildConfig.activation_func={self.activation_func!r}: expected F.silu")
        if self.seq_length is None:
            self.seq_length = arch.max_position_embeddings
        check_parallelism(arch, self.tensor_model_parallel_size)
        super().__post_init__()

    def _read_arch(self) -> ModelConfig:
        expected = f"a model's config file (config.json or {NATIVE_CONFIG}); nemo_config(arch or directory) makes one"
        if not isinstance(self.arch_path, (str, os.PathLike)) or not str(self.arch_path):
            raise ArchConfigError(
                f"PuzzleChildConfig.arch_path={self.arch_path!r}: expected {expected} (a checkpoint made before "
                "arch_path replaced arch_json needs importing again)"
            )
        path = Path(self.arch_path)
        if path.is_dir():
            raise ArchConfigError(
                f"PuzzleChildConfig.arch_path={self.arch_path!r} is a directory: expected its config file, "
                f"{config_file(path)}"
            )
        if not path.is_file():
            raise ArchConfigError(f"PuzzleChildConfig.arch_path={self.arch_path!r}: no such file (expected {expected})")
        arch = read_config(path)
        self.__dict__["_arch"] = arch
        return arch

    @property
    def arch(self) -> ModelConfig:
        """The architecture read (and validated) from `arch_path` when the config was built."""
        return self.__dict__.get("_arch") or self._read_arch()

    def configure_model(self, tokenizer=None, pre_process=None, post_process=None, vp_stage=None):
        """Build the megatron-core GPTModel; Llama-3 RoPE scaling only when the arch has it."""
        if self.scale_factor is None:
            return GPTConfig.configure_model(self, tokenizer, pre_process, post_process, vp_stage)
        return super().configure_model(tokenizer, pre_process, post_process, vp_stage)


class PuzzleChildModel(llm.GPTModel):
    """NeMo GPT model of a Puzzle child; `config` is a `PuzzleChildConfig`.

    A subclass (rather than `llm.GPTModel` itself) so that checkpoints name this class and
    importers/exporters can be registered for Puzzle children.
    """


def arch_file(arch: ModelConfig) -> Path:
    """A config file holding `arch` (HF config.json where it fits, else the project schema), under
    `$NEMO_PLUGINS_CACHE/nemo_arch/<hash>/`: content-addressed, so one architecture is one file."""
    from ..data.tiny_world import cache_root

    validate(arch)
    directory = cache_root() / "nemo_arch" / config_hash({"arch": repr(arch), "passthrough": arch.passthrough})
    for name in ("config.json", NATIVE_CONFIG):
        if (directory / name).is_file() and read_config(directory / name) == arch:
            return directory / name
    tmp = directory.parent / f".{directory.name}.{os.getpid()}"
    path = write_config(arch, tmp)
    os.makedirs(directory, exist_ok=True)
    os.replace(path, directory / path.name)
    tmp.rmdir()
    return directory / path.name


def nemo_config(arch: Union[ModelConfig, str, os.PathLike], **overrides) -> PuzzleChildConfig:
    """`PuzzleChildConfig` for `arch` (a `ModelConfig`, a model directory or its config file), with
    TransformerConfig/GPTConfig `overrides` such as tensor_model_parallel_size,
    pipeline_model_parallel_size, seq_length, bf16, params_dtype.

    Unknown names and architecture fields (which come from `arch`) are errors naming the field.
    """
    path = arch_file(arch) if isinstance(arch, ModelConfig) else config_file(arch)
    fields = {f.name for f in dataclasses.fields(PuzzleChildConfig) if f.init}
    for name in overrides:
        if name not in fields:
            close = difflib.get_close_matches(name, sorted(fields), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ArchConfigError(
                f"nemo_config: {name!r} is not a field of PuzzleChildConfig (TransformerConfig/GPTConfig){hint}"
            )
        if name in ARCH_FIELDS:
            raise ArchConfigError(
                f"nemo_config: {name!r} is set by the architecture and cannot be overridden; change the arch instead"
            )
    return PuzzleChildConfig(arch_path=str(path), **overrides)


def arch_of(cfg) -> ModelConfig:
    """The `ModelConfig` of a `PuzzleChildConfig` (or of a model holding one as `.config`)."""
    cfg = getattr(cfg, "config", cfg)
    if not isinstance(cfg, PuzzleChildConfig):
        raise TypeError(f"arch_of: expected a PuzzleChildConfig or a model with one, got {type(cfg).__name__}")
    return cfg.arch


# Registers the HF importer/exporter on PuzzleChildModel: a NeMo checkpoint names this module,
# so loading one (e.g. in llm.export_ckpt) must make the connectors known too.
importlib.import_module(f"{__package__}.connectors")
