"""Loading a run configuration: YAML files in configs/ merged onto the dataclasses of distill/config/schema.py, then
omegaconf `key=value` overrides. Unknown keys, wrong types, unknown choices and missing files raise
`ConfigError` with one line naming the key (and, for a choice, the allowed values); the CLI turns that
into exit code 2. Loading never imports torch, so a typo is reported in well under a second.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.devices import check_device_name
from data.teacher_config import check_kind
from distill.config.schema import Config, Vocab
from distill.env import PROJECT_ROOT

STUDENT_PRESETS = PROJECT_ROOT / "configs" / "student"  # student.preset names a <preset>.yaml here


class ConfigError(ValueError):
    """A config problem, reported as one readable line."""


def _one_line(e: OmegaConfBaseException) -> str:
    msg = str(e).splitlines()[0].strip()
    key = getattr(e, "full_key", None)
    return f"config key '{key}': {msg}" if key and key not in msg else msg


def check_config(cfg: DictConfig) -> DictConfig:
    """`cfg` after the checks its types cannot express (`check`, below); ConfigError if one fails."""
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


# Checks of a merged config that its types cannot express (load_config and from_dict run them).
def check(cfg: DictConfig) -> None:
    """Raise ConfigError for what the schema cannot say: unique names, ranges, paths, kinds, devices, key
    combinations, presets."""
    check_ranges(cfg, Config)
    teachers = teacher_configs(cfg)
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise ConfigError(f"config key 'teachers': teacher names must be unique, got {names}")
    check_graft(cfg)
    if not 0 <= cfg.data.val_fraction + cfg.data.test_fraction < 1:
        raise ConfigError("config keys 'data.val_fraction' + 'data.test_fraction' must be in [0, 1)")
    stages = [s.name for s in cfg.train.stages]
    if len(set(stages)) != len(stages):
        raise ConfigError(f"config key 'train.stages': stage names must be unique, got {stages}")
    for i, stage in enumerate(cfg.train.stages):
        if not stage.losses or not stage.trainable:
            raise ConfigError(f"config key 'train.stages.{i}' ({stage.name}): needs at least one loss and one "
                              "trainable part")
    for key, t in _teacher_keys(cfg):
        if _looks_local(t.source) and not Path(t.source).expanduser().exists():
            raise ConfigError(f"config key '{key}.source' ({t.name}): path does not exist: {t.source}")
        for field_name, check in (("kind", check_kind), ("device", check_device_name)):
            try:
                check(t[field_name])
            except (ValueError, TypeError) as e:
                raise ConfigError(f"config key '{key}.{field_name}' ({t.name}): {e}") from None
    try:
        check_device_name(cfg.evaluate.device)
    except ValueError as e:
        raise ConfigError(f"config key 'evaluate.device': {e}") from None
    s = cfg.student
    if s.tokenizer is not None and s.vocab == Vocab.trimmed:
        raise ConfigError("config key 'student.tokenizer': a student tokenizer has its own vocabulary; set it or "
                          "student.vocab=trimmed (which trims the teacher's), not both")
    if s.vocab_size is not None and (s.vocab == Vocab.trimmed or s.tokenizer is not None):
        raise ConfigError("config key 'student.vocab_size': student.tokenizer or student.vocab=trimmed sets the "
                          f"vocabulary; leave student.vocab_size null (it is {s.vocab_size})")
    if cfg.train.mix_shards and cfg.loss.vision and cfg.teachers.vision:
        raise ConfigError("config key 'train.mix_shards': mixed-in shards carry language targets only; set "
                          "loss.vision=false")
    if not (STUDENT_PRESETS / f"{cfg.student.preset}.yaml").is_file():
        known = sorted(p.stem for p in STUDENT_PRESETS.glob("*.yaml"))
        raise ConfigError(f"config key 'student.preset': {cfg.student.preset!r} is not a preset; expected one of "
                          f"{known} (files in {STUDENT_PRESETS.relative_to(PROJECT_ROOT)})")


def check_graft(cfg: DictConfig) -> None:
    """A grafted language teacher reads the stored features of a vision teacher of this config, which collection
    runs first. Only the language teacher reads another teacher's rows and vision teachers read none, so the one
    possible cycle is the language teacher naming itself, and that name is not a vision teacher's either."""
    lang = cfg.teachers.language
    vision = lang.adapt.vision if lang is not None and lang.adapt is not None else None
    known = [t.name for t in cfg.teachers.vision]
    if vision is not None and vision not in known:
        raise ConfigError(f"config key 'teachers.language.adapt.vision' ({lang.name}): {vision!r} is not a vision "
                          f"teacher of this config; expected one of {known} (the names in teachers.vision)")


# The commands that train or correct the student's language side: each needs a language teacher.
NEEDS_LANGUAGE_TEACHER = ("adapt", "train", "pipeline", "onpolicy")


def check_command(cfg: DictConfig, command: str) -> None:
    """ConfigError, before any work, for a config that `mmtp <command>` cannot run to its end."""
    if command in NEEDS_LANGUAGE_TEACHER and cfg.teachers.language is None:
        raise ConfigError(f"config key 'teachers.language': `mmtp {command}` needs a language teacher and this "
                          "config has none (an overlay such as configs/tiny_xtoken.yaml goes after its base: "
                          "--config configs/tiny.yaml --config configs/tiny_xtoken.yaml)")
    if command == "collect" and not teacher_configs(cfg):
        raise ConfigError("config key 'teachers': `mmtp collect` needs at least one teacher and this config has none")


def in_range(value, spec: str) -> bool:
    """`value` within a field's range: ">= 1", "> 0", "[0, 1)", "(0, 1]", ... A float must also be finite."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if spec.startswith((">=", ">")):
        bound = float(spec.lstrip(">= "))
        return value >= bound if spec.startswith(">=") else value > bound
    left, lo, hi, right = re.fullmatch(r"([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])", spec).groups()
    return ((value >= float(lo)) if left == "[" else (value > float(lo))) and \
        ((value <= float(hi)) if right == "]" else (value < float(hi)))


def check_ranges(node, cls: type, prefix: str = "") -> None:
    """ConfigError for the first value outside its field's declared range (`metadata["range"]`), walking the
    nested sections, teachers and list entries (stages, sources) of the schema."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value, key = node.get(f.name), prefix + f.name
        spec = f.metadata.get("range")
        if spec and value is not None and not in_range(value, spec):
            raise ConfigError(f"config key '{key}': must be {'' if spec[0] == '>' else 'in '}{spec}, got {value}")
        nested = [t for t in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(t)]
        if value is None or not nested:
            continue
        if typing.get_origin(hints[f.name]) is list:
            for i, item in enumerate(value):
                check_ranges(item, nested[0], f"{key}.{i}.")
        else:
            check_ranges(value, nested[0], f"{key}.")


def _teacher_keys(cfg: DictConfig) -> list[tuple[str, Any]]:
    language = [("teachers.language", cfg.teachers.language)] if cfg.teachers.language else []
    return language + [(f"teachers.vision.{i}", t) for i, t in enumerate(cfg.teachers.vision)]


def _looks_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~"))
