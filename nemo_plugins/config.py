"""Typed stage configs: a YAML file under conf/ merged onto a dataclass schema, then
`key=value` overrides. Unknown keys and values of the wrong type are rejected with a message
naming the key; each dataclass's own checks (`__post_init__`) then validate the values."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# The embedded default (tiny world on CPU): the pipeline, then each later stage's settings.
DEFAULT_CONFIGS = tuple(CONF_DIR / stage / "tiny.yaml" for stage in ("pipeline", "puzzle", "fusion", "recovery", "sft", "grpo"))


class ConfigError(ValueError):
    """A config file or override that does not fit the stage's schema."""


def preset_path(name: str) -> Path:
    """conf/pipeline/NAME.yaml, a preset merged on top of DEFAULT_CONFIGS."""
    path = CONF_DIR / "pipeline" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "pipeline").glob("*.yaml"))
        raise ConfigError(f"--preset {name}: no {path} (presets: {', '.join(known)})")
    return path
