"""FFN Fusion (arXiv 2503.18908): find runs of FFNs with no attention between them, measure how
much each depends on the earlier ones, and fuse low-dependency windows into one wide FFN."""

from .analysis import analyze, dependency_matrix, find_ffn_runs
from .fuse import (
    FusionResult,
    fuse_model,
    fuse_run,
    fusion_report,
    run_fusion,
    save_fused,
    select_runs,
)

__all__ = [
    "FusionResult", "analyze", "dependency_matrix", "find_ffn_runs", "fuse_model", "fuse_run",
    "fusion_report", "run_fusion", "save_fused", "select_runs",
]  # fmt: skip
