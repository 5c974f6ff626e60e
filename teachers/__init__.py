"""Frozen teachers that turn batches of samples into soft-target arrays.

    from teachers import load_teacher
    teacher = load_teacher(cfg, cache_dir)   # cfg: TeacherConfig, a mapping or an object with its fields

Kinds: "hf_causal_lm" (teachers.language), "hf_vision" (teachers.vision),
"efficientnet_lite0" (teachers.efficientnet). Their modules import on first use.
"""
from .registry import (
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
    from .language import peek_vocab_size as peek

    return peek(cfg, cache_dir or DEFAULT_CACHE_DIR)


__all__ = [
    "DEFAULT_CACHE_DIR", "TEACHER_KINDS", "TeacherConfig", "TeacherSourceError", "clear_teacher_cache",
    "config_digest", "known_kinds", "load_teacher", "peek_vocab_size", "register_teacher",
    "teacher_class", "teacher_config",
]
