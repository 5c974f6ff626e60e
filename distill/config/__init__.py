"""The run configuration: the typed schema (schema), loading, overrides and checks (load), and the
generated reference of every key (reference: `python -m distill.config.reference > docs/config.md`)."""

from distill.faces import face

EXPORTS = {
    "load": ("ConfigError", "STUDENT_PRESETS", "NEEDS_LANGUAGE_TEACHER", "load_config", "load_yaml", "from_dict",
             "check_config", "check_command", "check_ranges", "in_range", "resolve_paths", "teacher_configs",
             "teacher_config", "to_container", "output_path", "shards_path", "cache_path", "flatten"),
    "schema": ("Config", "DataConfig", "TeachersConfig", "CollectConfig", "StudentConfig", "LossConfig",
               "StageConfig", "TrainConfig", "EvalConfig", "OnPolicyConfig", "TrackingConfig", "SourceConfig",
               "KDKind", "KDGate", "Vocab", "Standardize", "Balance", "Precision", "Runner", "Compression", "Part"),
    "reference": ("top_level_keys", "field_comments", "render"),
}
__all__ = [name for names in EXPORTS.values() for name in names]
__getattr__, __dir__ = face(__name__, EXPORTS)
