"""Frozen teachers that turn batches of samples into soft-target rows.

    from teachers import load_teacher
    teacher = load_teacher(cfg, cache_dir)   # cfg: TeacherConfig, a mapping or an object with its fields

Kinds: the built-in names in `BUILTIN_KINDS` (modules imported on first use), names registered with
`register_teacher`, or a dotted path `package.module:Class`. Every teacher implements
`LanguageTeacher` or `VisionTeacher` (teachers/contract.py, docs/teachers.md).
"""
from .contract import LanguageTeacher, Modality, VisionTeacher, declared_modality
from .registry import (
    BUILTIN_KINDS,
    DEFAULT_CACHE_DIR,
    TEACHER_KINDS,
    TeacherConfig,
    TeacherSourceError,
    clear_teacher_cache,
    config_digest,
    known_kinds,
    load_teacher,
    register_teacher,
    teacher_class,
    teacher_config,
)


def peek_vocab_size(cfg, cache_dir=None) -> int:
    """A language teacher's vocab size from its config alone (no weights loaded)."""
    tc = teacher_config(cfg)
    cls = teacher_class(tc.kind)
    modality = declared_modality(cls)
    if modality != Modality.language:
        raise ValueError(f"teacher {tc.name!r}: kind {tc.kind!r} is a {modality.value} teacher, not a language one")
    return cls.peek_vocab_size(tc, cache_dir or DEFAULT_CACHE_DIR)


__all__ = [
    "BUILTIN_KINDS", "DEFAULT_CACHE_DIR", "LanguageTeacher", "Modality", "VisionTeacher", "TEACHER_KINDS",
    "TeacherConfig", "TeacherSourceError", "clear_teacher_cache",
    "config_digest", "known_kinds", "load_teacher", "peek_vocab_size", "register_teacher",
    "teacher_class", "teacher_config",
]
