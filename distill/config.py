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
            cfg = OmegaConf.merge(cfg, load_yaml(Path(one)))
        for override in overrides:
            key, sep, value = override.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {override!r} is not of the form key=value")
            try:  # `teachers.vision.0.image_size=112` reaches into lists too
                OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=True)
            except (TypeError, ValueError, IndexError, yaml.YAMLError) as e:
                raise ConfigError(f"config key '{key}': {str(e).splitlines()[0]}") from None
        OmegaConf.resolve(cfg)
        resolve_paths(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    return check_config(cfg)


def load_yaml(path: Path) -> DictConfig:
    """One config file as a mapping; ConfigError for a folder, a missing file, a YAML syntax error (with its line
    and column) or a file that is not a mapping of keys."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a YAML file such as configs/default.yaml")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
        opened = f" ({context} at line {start.line + 1}, column {start.column + 1})" if context and start else ""
        raise ConfigError(f"{path}{where}: YAML syntax error: {getattr(e, 'problem', None) or e}{opened}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: a config file must be a mapping of keys (key: value), not a "
                          f"{type(loaded).__name__.removesuffix('Config').lower()}")
    return loaded


def _absolute(path: str | None, looks_local=None) -> str | None:
    """`path` made absolute against the working directory. With `looks_local`, only a path that exists or passes
    it, so that a hub id (`org/name`) or an MLflow run id is left as it is. URIs are left alone."""
    if path is None or "://" in path or ":" in path.split("/")[0]:
        return path
    p = Path(path).expanduser()
    if looks_local is not None and not p.exists() and not looks_local(path):
        return path
    return str(p.resolve())


def resolve_paths(cfg: DictConfig) -> None:
    """Make every path of `cfg` absolute once, at load, against the folder the command runs in, so that a
    relative `output_dir` names the same folder in every stage and child process."""
    cfg.output_dir = _absolute(cfg.output_dir)
    cfg.shards_dir = _absolute(cfg.shards_dir)
    cfg.cache_dir = _absolute(cfg.cache_dir)
    cfg.train.init_from = _absolute(cfg.train.init_from)
    cfg.train.hostfile = _absolute(cfg.train.hostfile)
    cfg.train.mix_shards = [_absolute(p) for p in cfg.train.mix_shards]
    for key in ("student", "baseline"):  # a folder, or an MLflow run id
        cfg.evaluate[key] = _absolute(cfg.evaluate[key], lambda p: "/" in p)
    if cfg.student.tokenizer != "captions":
        cfg.student.tokenizer = _absolute(cfg.student.tokenizer)
    if cfg.tracking.uri and cfg.tracking.uri.startswith("sqlite:///") and not cfg.tracking.uri.startswith(
            "sqlite:////"):
        cfg.tracking.uri = "sqlite:///" + _absolute(cfg.tracking.uri.removeprefix("sqlite:///"))
    for source in cfg.data.sources:
        for key in ("path", "data_files", "data_dir", "root"):
            source[key] = _absolute(source[key])
    for t in teacher_configs(cfg):
        t.source = _absolute(t.source, lambda p: p.startswith(("/", "./", "../", "~")))  # else a hub id
        t.adapters = _absolute(t.adapters)


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
    """{'a': {'b': 1}} -> {'a.b': 1}. List items are keyed by `name` when every item has a distinct one (teachers,
    stages), else by index (data sources, whose `name` is optional), so no two settings share a key."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        items = list(d.items())
    else:
        names = [x.get("name") if isinstance(x, dict) else None for x in d]
        named = None not in names and len(set(names)) == len(names)
        items = [(names[i] if named else i, x) for i, x in enumerate(d)]
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, dict | list) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
