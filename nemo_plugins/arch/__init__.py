"""Architecture description: per-layer block configs, JSON I/O and accounting."""

from .accounting import count_params, report
from .config import (
    ATTENTION_LINEAR,
    ATTENTION_NO_OP,
    FFN_LINEAR,
    FFN_NO_OP,
    ArchConfigError,
    AttentionConfig,
    BlockConfig,
    FFNConfig,
    ModelConfig,
    RopeScaling,
    from_dict,
    gqa,
    homogeneous,
    parallel,
    swiglu,
    to_dict,
    validate,
)
from .hf_json import from_hf_config, to_hf_config
from .mcore_json import from_mcore_json, to_mcore_json

__all__ = [
    "ATTENTION_LINEAR", "ATTENTION_NO_OP", "FFN_LINEAR", "FFN_NO_OP", "ArchConfigError",
    "AttentionConfig", "BlockConfig", "FFNConfig", "ModelConfig", "RopeScaling", "count_params",
    "from_dict", "from_hf_config", "from_mcore_json", "gqa", "homogeneous", "parallel", "report",
    "swiglu", "to_dict", "to_hf_config", "to_mcore_json", "validate",
]  # fmt: skip
