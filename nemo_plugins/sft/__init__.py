"""Reasoning-toggle SFT: the resumable training loop, the toggle evaluation and the stage."""

from .stage import SFTStageConfig, run_sft_stage
from .toggle_eval import evaluate_toggle
from .train import SFTConfig, run_sft

__all__ = ["SFTConfig", "SFTStageConfig", "evaluate_toggle", "run_sft", "run_sft_stage"]
