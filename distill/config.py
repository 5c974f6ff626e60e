"""Loading a run configuration: YAML files in configs/ merged onto the dataclasses of distill/schema.py, then
omegaconf `key=value` overrides. Unknown keys, wrong types, unknown choices and missing files raise
`ConfigError` with one line naming the key (and, for a choice, the allowed values); the CLI turns that
into exit code 2. Loading never imports torch, so a typo is reported in well under a second.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distill.schema import Config

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STUDENT_PRESETS = PROJECT_ROOT / "configs" / "student"  # student.preset names a <preset>.yaml here


class ConfigError(ValueError):
    """A config problem, reported as one readable line."""


def _one_line(e: OmegaConfBaseException) -> str:
    msg = str(e).splitlines()[0].strip()
    key = getattr(e, "full_key", None)
    return f"config key '{key}': {msg}" if key and key not in msg else msg


def check_config(cfg: DictConfig) -> DictConfig:
    """`cfg` after the checks its types cannot express (distill/config_check.py); ConfigError if one fails."""
    from distill.config_check import check  # it imports this module: imported on first use
    try:
        check(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    return cfg


def load_config(path: str | Path | dict | list | None = None, overrides: list[str] | tuple = ()) -> DictConfig:
    """Merge YAML files or config dicts (later ones win) and `key=value` overrides onto the schema, and
    validate them. A dict is a config as `to_container` gives it (a deployment's parameter)."""
    try:
        cfg = OmegaConf.structured(Config)
        for one in [] if path is None else path if isinstance(path, list | tuple) else [path]:
            if isinstance(one, dict):
                cfg = OmegaConf.merge(cfg, one)
                continue
            one = Path(one)
            if not one.is_file():
                raise ConfigError(f"config file not found: {one}")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(one))
        for override in overrides:
            key, sep, value = override.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {override!r} is not of the form key=value")
            try:  # `teachers.vision.0.image_size=112` reaches into lists too
                OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=True)
            except (TypeError, ValueError, IndexError, yaml.YAMLError) as e:
                raise ConfigError(f"config key '{key}': {str(e).splitlines()[0]}") from None
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    return check_config(cfg)


def from_dict(d: dict) -> DictConfig:
    """Rebuild a validated config from `to_container` output (how flows pass configs to tasks): the schema's
    types and the same checks as `load_config`."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), d)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    return check_config(cfg)


def teacher_configs(cfg: DictConfig) -> list:
    return ([cfg.teachers.language] if cfg.teachers.language else []) + list(cfg.teachers.vision)


def teacher_config(cfg: DictConfig, name: str):
    for t in teacher_configs(cfg):
        if t.name == name:
            return t
    raise ConfigError(f"config key 'teachers': no teacher named {name!r}")


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def output_path(cfg: DictConfig, *parts: str) -> Path:
    return Path(cfg.output_dir).expanduser().joinpath(*parts)


def shards_path(cfg: DictConfig, *parts: str) -> Path:
    return Path(cfg.shards_dir or cfg.output_dir).expanduser().joinpath(*parts)


def cache_path(cfg: DictConfig, *parts: str) -> Path:
    return Path(os.path.expanduser(cfg.cache_dir)).joinpath(*parts)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; list items are keyed by index, or by `name` when they have one."""
    out: dict[str, Any] = {}
    items = d.items() if isinstance(d, dict) else (
        (x.get("name", i) if isinstance(x, dict) else i, x) for i, x in enumerate(d))
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, dict | list) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
