"""The tasks of collection (samples shards, teacher × shard, a teacher's manifest) and the order of its teachers,
shared by the flows `collect-soft-targets` (flows/collect.py) and `adapt-teacher` (flows/adapt.py), which collects
the vision teacher a grafted language teacher reads before fitting it.

Tasks receive the config as a plain dict and pass paths, never tensors.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.utilities import annotations

from data.samples import build_samples
from data.shards import digest
from distill.config import (
    ConfigError,
    cache_path,
    from_dict,
    shards_path,
    teacher_config,
    teacher_configs,
    to_container,
)
from teachers.collect import collect_shard, finalize_targets, targets_complete
from teachers.contract import Modality, check_teacher, reads
from teachers.graft import graft_vision
from teachers.registry import load_teacher


def graft_of(config: dict) -> str | None:
    """The vision teacher whose stored features the language teacher reads (a grafted teacher, teachers/graft.py):
    its `adapt.vision`, or the graft recorded in the adapters folder it is given; None for any other teacher."""
    lang = (config.get("teachers") or {}).get("language") or {}
    if lang.get("adapters"):
        return graft_vision(lang["adapters"])
    return (lang.get("adapt") or {}).get("vision")


def phases(config: dict) -> list[list[str]]:
    """The teachers of `config` in the order collection runs them: all at once, or, for a grafted language teacher,
    the vision teachers first (their shards are the graft's input), then the language teacher."""
    cfg = from_dict(config)
    names = [t.name for t in teacher_configs(cfg)]
    if graft_of(config) is None:
        return [names]
    lang = cfg.teachers.language.name
    return [[n for n in names if n != lang], [lang]]


def collect_options(cfg, tcfg) -> dict:
    """Everything besides the teacher itself that changes the bytes of its shards."""
    return {"batch_size": cfg.collect.batch_size, "compression": cfg.collect.compression,
            "top_k": tcfg.top_k, "max_tokens": tcfg.max_tokens, "image_size": tcfg.image_size,
            "dtype": tcfg.dtype}


def collect_teacher(cfg, name: str):
    """The teacher `name`, checked against its config slot, with its config and its shards' producer digest."""
    tcfg = teacher_config(cfg, name)
    teacher = load_teacher(tcfg, cache_path(cfg, "teachers"))
    slot = Modality.language if cfg.teachers.language is not None and name == cfg.teachers.language.name \
        else Modality.vision
    got = check_teacher(teacher)
    if got != slot:
        where = "teachers.language" if slot == Modality.language else "teachers.vision"
        raise ConfigError(f"config key '{where}' ({name}.kind={tcfg.kind}): a {got.value} "
                          f"teacher, but {where} takes {slot.value} teachers")
    known = [t.name for t in cfg.teachers.vision]
    for vision in reads(teacher):  # a grafted teacher reads a vision teacher's shards
        if vision not in known:
            raise ConfigError(f"config key 'teachers.language.adapters' ({name}): its graft reads vision teacher "
                              f"{vision!r}, which is not in teachers.vision ({known})")
    return tcfg, teacher, digest([teacher.identity(), collect_options(cfg, tcfg)])


class opaque(annotations.opaque):
    """Prefect's graph links a task to the argument itself, not to what it holds. Prefect 3.8's annotations come
    back from pickling (to a Dask worker) as a 1-tuple of the value: this one comes back whole."""

    def __reduce__(self):
        return type(self), (self.unwrap(),)


class quote(annotations.quote):
    """Prefect's graph links a task to nothing in the argument (whole after pickling, as `opaque`)."""

    __reduce__ = opaque.__reduce__


@task(name="build-samples", task_run_name="samples")
def build_samples_task(config: dict) -> dict:
    cfg = from_dict(config)
    return build_samples(to_container(cfg)["data"], shards_path(cfg, "samples"), cfg.seed, cfg.collect.progress)


@task(name="teacher-shard", task_run_name="{teacher_name}/{shard_file}")
def teacher_shard_task(config: dict, teacher_name: str, shard_file: str) -> dict:
    cfg = from_dict(config)
    tcfg, teacher, producer = collect_teacher(cfg, teacher_name)
    inputs = {n: shards_path(cfg, "targets", n) for n in reads(teacher)}
    return collect_shard(teacher, shards_path(cfg, "samples", shard_file), shards_path(cfg, "targets", teacher_name),
                         producer_digest=producer, batch_size=cfg.collect.batch_size,
                         compression=cfg.collect.compression, progress=cfg.collect.progress,
                         prefetch=cfg.collect.prefetch, inputs=inputs)


@task(name="finalize-targets", task_run_name="{teacher_name}/finalize")
def finalize_task(config: dict, teacher_name: str, samples: dict, entries: list[dict]) -> dict:
    cfg = from_dict(config)
    tcfg, teacher, producer = collect_teacher(cfg, teacher_name)
    return finalize_targets(teacher, shards_path(cfg, "targets", teacher_name), samples, entries,
                            config_digest=producer, collect_options=collect_options(cfg, tcfg))


def collect_group(config: dict, names: list[str], samples: dict) -> tuple[dict, dict]:
    """Every shard of the teachers `names`, then each one's manifest: (entries, manifests) by teacher."""
    cfg = from_dict(config)
    # Prefect's graph links a task to every argument that is, or holds, an object another task returned (by
    # identity, down to interned dict keys such as "seed"): the config and the samples go in `opaque` (the
    # object itself is matched, not its contents); a shard's file name, the very str the previous teacher's
    # entry for that shard returned, is quoted and wait_for names the samples; finalize gets the futures.
    files = [s["file"] for s in samples["shards"]]
    shard_task = teacher_shard_task.with_options(retries=cfg.collect.retries)
    futures = {n: [shard_task.submit(opaque(config), n, quote(f), wait_for=[opaque(samples)]) for f in files]
               for n in names}
    entries = {n: [f.result() for f in futures[n]] for n in names}
    manifests = {n: finalize_task(opaque(config), n, opaque(samples), futures[n]) for n in names}
    return entries, manifests


def vision_targets(config: dict, name: str, samples: dict) -> Path:
    """The target folder of vision teacher `name`, collected first when it is not finished by the same producer
    (a grafted teacher reads it)."""
    cfg = from_dict(config)
    folder = shards_path(cfg, "targets", name)
    if targets_complete(folder, collect_teacher(cfg, name)[2]) is None:
        collect_group(config, [name], samples)
    return folder
