"""The `model.reinforce.grpo` block of an Aligner GRPO config, parsed into the core's settings.

Its keys are the core's names (`rl.grpo_loss.GRPOLossConfig` and `rl.grpo.GRPOConfig`): clip_low,
clip_high, kl_beta, aggregation, drop_zero_variance (the loss) and leave_one_out, normalize_std
(the advantages). Imports only the core, so a config can be checked without Aligner.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from ..rl.grpo_loss import GRPOLossConfig

CONFIG_PATH = "model.reinforce.grpo"
ADVANTAGE_KEYS = ("leave_one_out", "normalize_std")
LOSS_KEYS = tuple(f.name for f in fields(GRPOLossConfig))


@dataclass
class GRPOSettings:
    """The loss settings and how advantages are formed from each prompt group's rewards."""

    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)
    leave_one_out: bool = False
    normalize_std: bool = True

    @property
    def needs_reference(self) -> bool:
        """True when the loss has a KL term, so the trainer must compute reference log-probs."""
        return self.loss.kl_beta > 0

    @classmethod
    def from_mapping(cls, block: Mapping | None, where: str = CONFIG_PATH) -> GRPOSettings:
        """Settings from a `grpo:` mapping (OmegaConf or dict; None or missing keys take the core's
        defaults). Unknown keys and bad values fail naming `where.<key>`."""
        block = dict(block or {})
        unknown = sorted(set(block) - set(LOSS_KEYS) - set(ADVANTAGE_KEYS))
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown key; expected one of {', '.join(LOSS_KEYS + ADVANTAGE_KEYS)}")
        for key in ADVANTAGE_KEYS:
            if key in block and not isinstance(block[key], bool):
                raise ValueError(f"{where}.{key}={block[key]!r}: expected true or false")
        try:
            loss = GRPOLossConfig(**{k: block[k] for k in LOSS_KEYS if k in block})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}.{e}") from None
        return cls(loss, **{k: block[k] for k in ADVANTAGE_KEYS if k in block})

    @classmethod
    def from_model_cfg(cls, model_cfg) -> GRPOSettings:
        """Settings from an Aligner model config (`model_cfg.reinforce.grpo`)."""
        reinforce = model_cfg.get("reinforce") if hasattr(model_cfg, "get") else None
        if reinforce is None:
            raise ValueError("model.reinforce: missing; a GRPO actor needs Aligner's reinforce block")
        return cls.from_mapping(reinforce.get("grpo"))
