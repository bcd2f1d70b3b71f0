"""Typed stage configs: a YAML file under conf/ merged onto a dataclass schema, then
`key=value` overrides. Unknown keys and values of the wrong type are rejected with a message
naming the key; each dataclass's own checks (`__post_init__`) then validate the values."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# The embedded default (tiny world on CPU): the pipeline, then each later stage's settings.
_STAGE_CONFS = ("pipeline", "puzzle", "fusion", "recovery", "sft", "grpo", "rloo", "reward_model", "rpo")
DEFAULT_CONFIGS = tuple(CONF_DIR / stage / "tiny.yaml" for stage in _STAGE_CONFS)


class ConfigError(ValueError):
    """A config file or override that does not fit the stage's schema."""


def preset_path(name: str) -> Path:
    """conf/pipeline/NAME.yaml, a preset merged on top of DEFAULT_CONFIGS."""
    path = CONF_DIR / "pipeline" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "pipeline").glob("*.yaml"))
        raise ConfigError(f"--preset {name}: no {path} (presets: {', '.join(known)})")
    return path


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).split("\n")[0]
    if isinstance(e, ConfigKeyError):
        return f"unknown key {key!r}" if key else msg
    return f"{key}: {msg}" if key else msg


def _raise_for_override(cfg, overrides: Sequence[str]) -> None:
    """Merge the overrides one at a time onto `cfg` and raise for the first that fails, naming
    it (a merge of them all names neither the override nor, for a section, its key)."""
    for override in overrides:
        key, _, value = override.partition("=")
        try:
            OmegaConf.merge(cfg, OmegaConf.from_dotlist([override]))
        except OmegaConfBaseException as e:
            node = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
            if isinstance(node, DictConfig):
                fields = ", ".join(f"{key}.{k}" for k in list(node.keys())[:4])
                raise ConfigError(f"override {override!r}: {key} is a section, not a value; set its fields "
                                  f"({fields}, ...)") from None  # fmt: skip
            raise ConfigError(f"override {override!r}: {_describe(e)}") from None


def load_config(
    schema: type[T],
    yaml_paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Schema defaults <- each YAML file in order <- `key=value` overrides, as a `schema` instance."""
    if yaml_paths is None:
        yaml_paths = []
    elif isinstance(yaml_paths, (str, os.PathLike)):
        yaml_paths = [yaml_paths]
    layers: list[tuple[str, object]] = []
    for yaml_path in yaml_paths:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            layers.append((str(path), OmegaConf.load(path)))
        except Exception as e:  # YAML syntax errors come in many types
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r}: expected key=value (e.g. parent.steps=100)")
    try:
        layers.append(("overrides", OmegaConf.from_dotlist(list(overrides))))
    except OmegaConfBaseException as e:
        raise ConfigError(f"overrides: {_describe(e)}") from None
    cfg = OmegaConf.structured(schema)
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            if source == "overrides":
                _raise_for_override(cfg, overrides)
            raise ConfigError(f"{source}: {_describe(e)}") from None
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None
    except ValueError as e:
        raise ConfigError(_rooted_at_failing_section(cfg, str(e))) from None


def _rooted_at_failing_section(cfg, message: str) -> str:
    """`message` ("<section>.<key>=...") with its section replaced by the top-level section that
    failed to build. Sections share settings classes (the RL loops share `rl.config`'s, whose
    messages name `grpo.`), so an error in `rpo.rewards` must not name `grpo.rewards`."""
    head, dot, rest = message.partition(".")
    if not dot or not head.isidentifier():
        return message
    for section in [head, *(k for k in cfg if k != head)]:
        node = cfg.get(section) if section in cfg else None
        if not OmegaConf.is_config(node):
            continue
        try:
            OmegaConf.to_object(node)
        except ValueError:
            return message if section == head else f"{section}.{rest}"
        except OmegaConfBaseException:
            continue
    return message


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
