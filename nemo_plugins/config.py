"""Typed stage configs: a YAML file under conf/ merged onto a dataclass schema, then
`key=value` overrides. Unknown keys and values of the wrong type are rejected with a message
naming the key; each dataclass's own checks (`__post_init__`) then validate the values."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A config file or override that does not fit the stage's schema."""


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).split("\n")[0]
    if isinstance(e, ConfigKeyError):
        return f"unknown key {key!r}" if key else msg
    return f"{key}: {msg}" if key else msg


def load_config(schema: type[T], yaml_path: str | os.PathLike | None = None, overrides: list[str] = ()) -> T:
    """Schema defaults <- YAML file <- `key=value` overrides, as an instance of `schema`."""
    base = OmegaConf.structured(schema)
    layers = []
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as e:  # YAML syntax errors come in many types
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r}: expected key=value (e.g. parent.steps=100)")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"overrides: {_describe(e)}") from None
    where = {0: str(yaml_path)} if yaml_path else {}
    cfg = base
    for i, layer in enumerate(layers):
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            source = where.get(i, "overrides") if yaml_path else "overrides"
            raise ConfigError(f"{source}: {_describe(e)}") from None
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None
    except ValueError as e:
        raise ConfigError(str(e)) from None


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
