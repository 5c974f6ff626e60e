"""Teacher kinds, teacher configs, where a teacher's files come from, and the per-process cache.

A teacher `kind` is a built-in name (BUILTIN_KINDS), a name registered with `register_teacher`, or a
dotted path `package.module:Class` to any class that implements the contract in teachers/contract.py
(docs/teachers.md):

    class MyTeacher:
        modality = Modality.vision
        def __init__(self, cfg: TeacherConfig, cache_dir: Path): ...

    teacher = load_teacher(cfg, cache_dir)   # built once per process per (config, cache_dir)
"""
import dataclasses
import importlib
import importlib.util
import logging
import threading
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path

from data.devices import check_device_name
from data.identity import json_sha256
from data.targets import LogprobEncoding
from data.teacher_config import (  # noqa: F401  (re-exported: the teachers' names for them)
    ADAPT_FIELDS,
    BUILTIN_KINDS,
    DEFAULT_INSTRUCTION,
    DTYPES,
    FIELDS,
    TEACHER_KINDS,
    AdaptConfig,
    Dtype,
    PromptFormat,
    TeacherConfig,
    adapt_settings,
    kind_class,
    known_kinds,
)

from .contract import declared_modality

log = logging.getLogger(__name__)
DEFAULT_CACHE_DIR = Path("~/.cache/mmtp-distill/teachers").expanduser()


class TeacherSourceError(OSError):
    """A teacher's source cannot be found or reached."""


def check_kind(kind: str) -> None:
    """A built-in or registered name passes as is (no import); a dotted path must import to a teacher class."""
    if kind not in TEACHER_KINDS and kind not in BUILTIN_KINDS:
        teacher_class(kind)


def teacher_class(kind: str) -> type:
    """The class of a kind (data.teacher_config.kind_class); one not registered (`register_teacher` checked those)
    is checked to declare its modality."""
    cls = kind_class(kind)
    if kind not in TEACHER_KINDS:
        declared_modality(cls)
    return cls


def _get(cfg, key, default=None):
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _plain(value):
    """Enums to their values, mappings to dicts and sequences to lists (omegaconf nodes included)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    return value


def teacher_config(cfg) -> TeacherConfig:
    """Normalise a mapping (dict, omegaconf DictConfig) or an object with attributes, and validate it."""
    if isinstance(cfg, TeacherConfig):
        return cfg
    if isinstance(cfg, Mapping):
        unknown = sorted(set(cfg) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown teacher config key(s) {unknown}; known keys: {list(FIELDS)}")
    values = {k: _get(cfg, k) for k in FIELDS if _get(cfg, k) is not None}
    values = {k: _plain(v) for k, v in values.items()}
    for key in ("name", "kind"):
        if not isinstance(values.get(key), str) or not values[key]:
            raise ValueError(f"teacher config needs a non-empty string {key!r}, got {values.get(key)!r}")
    tc = TeacherConfig(**values)
    where = f"teacher {tc.name!r}"
    for key in ("source", "device", "gguf_file", "revision", "instruction", "prefix", "adapters"):
        value = getattr(tc, key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: {key} must be a string, got {value!r}")
    if not isinstance(tc.options, dict):
        raise ValueError(f"{where}: options must be a mapping, got {tc.options!r}")
    try:
        check_kind(tc.kind)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}") from None
    try:  # the name only: the config may be checked on a machine without the GPU it will run on
        check_device_name(tc.device)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if tc.dtype not in DTYPES:
        raise ValueError(f"{where}: dtype {tc.dtype!r} is not one of {DTYPES}")
    tc.dtype = Dtype(tc.dtype).value  # a plain str, as in every manifest and digest
    if tc.logprob_encoding not in {e.value for e in LogprobEncoding}:
        raise ValueError(f"{where}: logprob_encoding {tc.logprob_encoding!r} is not one of "
                         f"{[e.value for e in LogprobEncoding]}")
    tc.logprob_encoding = LogprobEncoding(tc.logprob_encoding).value
    if tc.prompt_format not in {f.value for f in PromptFormat}:
        raise ValueError(f"{where}: prompt_format {tc.prompt_format!r} is not one of {[f.value for f in PromptFormat]}")
    tc.prompt_format = PromptFormat(tc.prompt_format).value
    temps = tc.tail_temperatures
    if (not isinstance(temps, list) or len(set(temps)) != len(temps)
            or not all(isinstance(t, int | float) and not isinstance(t, bool) and 0 < t < float("inf") and t != 1
                       for t in temps)):
        raise ValueError(f"{where}: tail_temperatures must be distinct positive numbers other than 1, got {temps!r}")
    tc.tail_temperatures = [float(t) for t in temps]
    for key, low in (("top_k", 1), ("image_size", 1), ("max_tokens", 2)):
        _check_int(tc, key, low, where)
    if tc.adapt is not None:
        tc.adapt = adapt_config(tc.adapt, where)
    return tc


def _check_int(obj, key: str, low: int, where: str) -> None:
    value = getattr(obj, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{where}: {key} must be an integer >= {low}, got {value!r}")


def adapt_config(value, where: str) -> AdaptConfig:
    """An AdaptConfig from a mapping (unknown keys and bad values refused, naming the key)."""
    if isinstance(value, AdaptConfig):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: adapt must be a mapping or null, got {value!r}")
    unknown = sorted(set(value) - set(ADAPT_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown adapt key(s) {unknown}; known keys: {list(ADAPT_FIELDS)}")
    adapt = AdaptConfig(**{k: _plain(v) for k, v in value.items() if v is not None or k == "layers"})
    for key, low in (("folds", 2), ("rank", 1), ("batch_size", 1), ("max_steps", 1), ("eval_every", 1),
                     ("patience", 1), ("val_rows", 1), ("image_tokens", 1)):
        _check_int(adapt, key, low, f"{where}: adapt")
    if adapt.layers is not None:
        _check_int(adapt, "layers", 1, f"{where}: adapt")
    for key in ("alpha", "lr"):
        if not isinstance(getattr(adapt, key), int | float) or not getattr(adapt, key) > 0:
            raise ValueError(f"{where}: adapt.{key} must be a positive number, got {getattr(adapt, key)!r}")
    if not 0 <= adapt.dropout < 1:
        raise ValueError(f"{where}: adapt.dropout must be in [0, 1), got {adapt.dropout!r}")
    if adapt.vision is not None and (not isinstance(adapt.vision, str) or not adapt.vision):
        raise ValueError(f"{where}: adapt.vision must be the name of a vision teacher or null, got {adapt.vision!r}")
    if not adapt.target_modules or not all(isinstance(m, str) for m in adapt.target_modules):
        raise ValueError(f"{where}: adapt.target_modules must be a non-empty list of module names")
    return adapt


def config_digest(cfg) -> str:
    return json_sha256(dataclasses.asdict(teacher_config(cfg)))


def register_teacher(kind: str):
    """Class decorator: make `kind` loadable by `load_teacher`. The class must declare its `modality`."""

    def wrap(cls):
        declared_modality(cls)
        if TEACHER_KINDS.get(kind, cls) is not cls:
            raise ValueError(f"teacher kind {kind!r} is already registered by {TEACHER_KINDS[kind]}")
        TEACHER_KINDS[kind] = cls
        return cls

    return wrap


_LOADED: dict[str, object] = {}
_LOCK = threading.Lock()


def load_teacher(cfg, cache_dir=None):
    """Build the teacher for `cfg` once per process; later calls with an equal config return the same object.

    The lock is held while loading, so threads asking for the same teacher wait for one load.
    """
    tc = teacher_config(cfg)
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser().resolve()
    key = json_sha256([config_digest(tc), str(cache_dir)])
    with _LOCK:
        teacher = _LOADED.get(key)
        if teacher is None:
            if tc.trust_remote_code:
                log.warning("teacher %r: trust_remote_code=True runs Python code shipped with %r", tc.name, tc.source)
            teacher = _LOADED[key] = teacher_class(tc.kind)(tc, cache_dir)
    return teacher


def clear_teacher_cache():
    with _LOCK:
        _LOADED.clear()


def resolve_source(tc: TeacherConfig, cache_dir) -> tuple[str, bool]:
    """Where to load a teacher from: (local folder or file, True) or (hub id, False).

    - "pkg:<package>": the installed package's folder (found without importing the package);
    - "tiny-random:<arch>": a tiny random model folder, materialised once under cache_dir/tiny;
    - an existing path; anything else that looks like "owner/name" is taken as a hub id.
    """
    source = tc.source
    where = f"teacher {tc.name!r}"
    if source.startswith("pkg:"):
        package = source[len("pkg:"):]
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            raise TeacherSourceError(f"{where}: source {source!r}: no installed Python package {package!r}")
        return str(Path(list(spec.submodule_search_locations)[0]).resolve()), True
    if source.startswith("tiny-random:"):
        from .tiny import ensure_tiny_teacher

        return str(ensure_tiny_teacher(source[len("tiny-random:"):], cache_dir)), True
    path = Path(source).expanduser()
    if source and path.exists():
        return str(path.resolve()), True
    looks_like_path = not source or source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_like_path:
        raise TeacherSourceError(f"{where}: source {source!r} does not exist")
    return source, False


def offline_error(tc: TeacherConfig, err: Exception) -> TeacherSourceError:
    return TeacherSourceError(
        f"teacher {tc.name!r}: cannot load hub id {tc.source!r}: it is not a local folder and the hub "
        f"could not be reached (this machine is offline). Give a local folder, a 'pkg:<package>' "
        f"or a 'tiny-random:<arch>' source instead. ({type(err).__name__}: {str(err).splitlines()[0]})"
    )


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
