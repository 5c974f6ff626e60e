"""Checks of a merged config that its types cannot express (distill.config.load_config runs them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from data.devices import check_device_name
from distill.config import PROJECT_ROOT, STUDENT_PRESETS, ConfigError, teacher_configs
from distill.schema import Vocab
from teachers.registry import check_kind


def check(cfg: DictConfig) -> None:
    """Raise ConfigError for what the schema cannot say: unique names, ranges, paths, kinds, devices, key
    combinations, presets."""
    teachers = teacher_configs(cfg)
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise ConfigError(f"config key 'teachers': teacher names must be unique, got {names}")
    if cfg.train.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key 'train.zero_stage': must be 0, 1, 2 or 3, got {cfg.train.zero_stage}")
    if not 0 <= cfg.data.val_fraction + cfg.data.test_fraction < 1:
        raise ConfigError("config keys 'data.val_fraction' + 'data.test_fraction' must be in [0, 1)")
    stages = [s.name for s in cfg.train.stages]
    if len(set(stages)) != len(stages):
        raise ConfigError(f"config key 'train.stages': stage names must be unique, got {stages}")
    for i, stage in enumerate(cfg.train.stages):
        if stage.steps < 1 or not stage.losses or not stage.trainable:
            raise ConfigError(f"config key 'train.stages.{i}' ({stage.name}): needs steps >= 1 and at least "
                              "one loss and one trainable part")
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
    if cfg.loss.drafter_prompt_tokens < 1:
        raise ConfigError("config key 'loss.drafter_prompt_tokens': must be >= 1, got "
                          f"{cfg.loss.drafter_prompt_tokens}")
    if not 0.0 <= cfg.loss.label_smoothing < 1.0:
        raise ConfigError(f"config key 'loss.label_smoothing': must be in [0, 1) (0 = plain CE), got "
                          f"{cfg.loss.label_smoothing}")
    if not 0.0 <= cfg.loss.kd_gate_nats < float("inf"):
        raise ConfigError(f"config key 'loss.kd_gate_nats': must be a finite number of nats >= 0, got "
                          f"{cfg.loss.kd_gate_nats}")
    if cfg.loss.chunk_size < 0:
        raise ConfigError(f"config key 'loss.chunk_size': must be >= 0 (0 = off), got {cfg.loss.chunk_size}")
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
    if not 0.0 <= cfg.train.mix_fraction < 1.0 or not 0.0 <= cfg.onpolicy.mix < 1.0:
        raise ConfigError("config keys 'train.mix_fraction' and 'onpolicy.mix' must be in [0, 1)")
    if cfg.onpolicy.ce_weight is not None and not 0.0 <= cfg.onpolicy.ce_weight <= 1.0:
        raise ConfigError(f"config key 'onpolicy.ce_weight': must be in [0, 1], got {cfg.onpolicy.ce_weight}")
    for key, value in (("loss.generated_kd_weight", cfg.loss.generated_kd_weight),
                       ("onpolicy.kd_weight", cfg.onpolicy.kd_weight)):
        if value is not None and not value >= 0:
            raise ConfigError(f"config key '{key}': must be >= 0 or null, got {value}")
    if cfg.onpolicy.temperature <= 0 or cfg.onpolicy.prompt_tokens < 1 or cfg.onpolicy.max_new_tokens < 1:
        raise ConfigError("config keys 'onpolicy.temperature', 'onpolicy.prompt_tokens', 'onpolicy.max_new_tokens' "
                          "must be positive")
    if not (STUDENT_PRESETS / f"{cfg.student.preset}.yaml").is_file():
        known = sorted(p.stem for p in STUDENT_PRESETS.glob("*.yaml"))
        raise ConfigError(f"config key 'student.preset': {cfg.student.preset!r} is not a preset; expected one of "
                          f"{known} (files in {STUDENT_PRESETS.relative_to(PROJECT_ROOT)})")


def _teacher_keys(cfg: DictConfig) -> list[tuple[str, Any]]:
    language = [("teachers.language", cfg.teachers.language)] if cfg.teachers.language else []
    return language + [(f"teachers.vision.{i}", t) for i, t in enumerate(cfg.teachers.vision)]


def _looks_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~"))
