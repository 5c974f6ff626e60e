"""Checks of a merged config that its types cannot express (distill.config.load_config runs them)."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from data.devices import check_device_name
from distill.config import PROJECT_ROOT, STUDENT_PRESETS, ConfigError, teacher_configs
from distill.schema import Config, Vocab
from teachers.registry import check_kind


def check(cfg: DictConfig) -> None:
    """Raise ConfigError for what the schema cannot say: unique names, ranges, paths, kinds, devices, key
    combinations, presets."""
    check_ranges(cfg, Config)
    teachers = teacher_configs(cfg)
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise ConfigError(f"config key 'teachers': teacher names must be unique, got {names}")
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
