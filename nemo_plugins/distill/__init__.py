"""Recovery distillation: KD from the parent (teacher) into a compressed child (student), or
continued pre-training, on a resumable Lightning loop."""

from .losses import RecoveryLossConfig, hidden_cosine_loss, kd_kl_loss, next_token_mask, recovery_loss
from .recovery import RecoveryConfig, evaluate_recovery, run_recovery

__all__ = [
    "RecoveryConfig",
    "RecoveryLossConfig",
    "evaluate_recovery",
    "hidden_cosine_loss",
    "kd_kl_loss",
    "next_token_mask",
    "recovery_loss",
    "run_recovery",
]
