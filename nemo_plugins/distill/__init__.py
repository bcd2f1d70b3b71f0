"""Recovery distillation: KD from the parent (teacher) into a compressed child (student), or
continued pre-training, on a resumable Lightning loop."""

from .losses import RecoveryLossConfig, recovery_loss
from .recovery import RecoveryConfig, run_recovery

__all__ = [
    "RecoveryConfig",
    "RecoveryLossConfig",
    "recovery_loss",
    "run_recovery",
]
