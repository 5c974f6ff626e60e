"""Prefect flow `collect-soft-targets`: samples shards, then teacher × shard tasks, then manifests.

Thin by design: the work lives in data/ and teachers/. Tasks receive the config as a plain dict
and pass paths, never tensors.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import mlflow
from prefect import flow, task
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities import annotations

from data.quality import collection_metrics
from data.samples import build_samples
from data.shards import clean_temp_files, digest, run_lock
from distill import tracking
from distill.config import (
    ConfigError,
    Runner,
    cache_path,
    from_dict,
    output_path,
    shards_path,
    teacher_config,
    teacher_configs,
    to_container,
)
from flows.adapt import with_adapters
from flows.artifacts import link_mlflow_run
from teachers.collect import check_vocab, collect_shard, finalize_targets
from teachers.contract import Modality, check_teacher
from teachers.registry import load_teacher


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
    return collect_shard(teacher, shards_path(cfg, "samples", shard_file), shards_path(cfg, "targets", teacher_name),
                         producer_digest=producer, batch_size=cfg.collect.batch_size,
                         compression=cfg.collect.compression, progress=cfg.collect.progress,
                         prefetch=cfg.collect.prefetch)


@task(name="finalize-targets", task_run_name="{teacher_name}/finalize")
def finalize_task(config: dict, teacher_name: str, samples: dict, entries: list[dict]) -> dict:
    cfg = from_dict(config)
    tcfg, teacher, producer = collect_teacher(cfg, teacher_name)
    return finalize_targets(teacher, shards_path(cfg, "targets", teacher_name), samples, entries,
                            config_digest=producer, collect_options=collect_options(cfg, tcfg))


@flow(name="collect-soft-targets", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def collect_soft_targets(config: dict, parent_run_id: str | None = None) -> dict:
    """Write samples shards and every teacher's target shards under `output_dir`; log to MLflow. With
    `teachers.language.adapt` set, the teacher is corrected first (flow adapt-teacher, cached)."""
    config = with_adapters(config, parent_run_id)
    cfg = from_dict(config)
    started = time.perf_counter()
    with run_lock(shards_path(cfg)):
        # Under the lock no other writer exists: temp files here are orphans of a killed run.
        targets = [shards_path(cfg, "targets", t.name) for t in teacher_configs(cfg)]
        for folder in [shards_path(cfg, "samples"), *targets]:
            clean_temp_files(folder)
        if cfg.teachers.language is not None:
            check_vocab(cfg.teachers.language, cfg.student.vocab_size, cache_path(cfg, "teachers"))
        # Prefect's graph links a task to every argument that is, or holds, an object another task returned (by
        # identity, down to interned dict keys such as "seed"): the config and the samples go in `opaque` (the
        # object itself is matched, not its contents); a shard's file name, the very str the previous teacher's
        # entry for that shard returned, is quoted and wait_for names the samples; finalize gets the futures.
        samples = build_samples_task(opaque(config))
        names, files = [t.name for t in teacher_configs(cfg)], [s["file"] for s in samples["shards"]]
        shard_task = teacher_shard_task.with_options(retries=cfg.collect.retries)
        futures = {n: [shard_task.submit(opaque(config), n, quote(f), wait_for=[opaque(samples)]) for f in files]
                   for n in names}
        entries = {n: [f.result() for f in futures[n]] for n in names}
        manifests = {n: finalize_task(opaque(config), n, opaque(samples), futures[n]) for n in names}
        run_id = log_collection(cfg, samples, manifests, entries, parent_run_id, time.perf_counter() - started)
    link_mlflow_run(cfg, "collect", run_id)
    summary = {"samples_dir": str(shards_path(cfg, "samples")), "mlflow_run_id": run_id,
               "targets": {n: str(shards_path(cfg, "targets", n)) for n in names},
               "forwards": {n: sum(e["forwards"] for e in entries[n]) for n in names},
               "shards_reused": {n: sum(e["skipped"] for e in entries[n]) for n in names}}
    print(f"collected {samples['rows']} samples × {len(names)} teachers into {output_path(cfg)} "
          f"(MLflow run {run_id}; shards reused: {summary['shards_reused']})")
    return summary


def log_collection(cfg, samples: dict, manifests: dict, entries: dict, parent_run_id: str | None,
                   wall_seconds: float) -> str:
    """The collect stage's MLflow run, opened once the shards are final and back-dated to the collection's start,
    so that its duration is the stage's (`collect/wall_seconds`)."""
    tags = {f"teacher.{n}.{k}": str(m["producer"].get(k)) for n, m in manifests.items()
            for k in ("kind", "source", "weights_digest")}
    quality = teacher_quality(cfg, manifests)
    started = time.time() - wall_seconds
    with tracking.stage_run(cfg, "collect", parent_run_id, tags, flow_run.id, started=started) as run:
        tracking.log_manifest_input(shards_path(cfg, "samples"), samples, "samples", "collect")
        metrics = {"collect/wall_seconds": wall_seconds, "collect/rows": samples["rows"],
                   "collect/rows_seen": samples["rows_seen"],
                   "collect/rows_skipped": sum(samples["rows_skipped"].values())}
        metrics.update({f"collect/rows_skipped/{k}": v for k, v in samples["rows_skipped"].items()})
        metrics.update({f"collect/rows_fixed/{k}": v for k, v in samples["rows_fixed"].items()})
        for name, manifest in manifests.items():
            tracking.log_manifest_input(shards_path(cfg, "targets", name), manifest, f"targets/{name}", "collect")
            done = [e for e in entries[name] if not e["skipped"]]
            seconds = sum(e["seconds"] for e in done)
            metrics[f"collect/{name}/shards_reused"] = len(entries[name]) - len(done)
            metrics[f"collect/{name}/teacher_forwards"] = sum(e["forwards"] for e in done)
            if seconds > 0:
                metrics[f"collect/{name}/samples_per_s"] = sum(e["rows"] for e in done) / seconds
                if manifest["modality"] == Modality.language:
                    metrics[f"collect/{name}/tokens_per_s"] = sum(e["tokens"] for e in done) / seconds
            if manifest["modality"] == Modality.language:
                metrics[f"collect/{name}/bytes_per_token"] = manifest["bytes_per_token"]
                metrics[f"collect/{name}/truncated_captions"] = manifest["truncated_captions"]
        mlflow.log_metrics({**metrics, **quality})
        for d in [shards_path(cfg, "samples")] + [shards_path(cfg, "targets", n) for n in manifests]:
            mlflow.log_artifact(str(Path(d) / "manifest.json"), artifact_path=f"manifests/{Path(d).name}")
        return run.info.run_id


def teacher_quality(cfg, manifests: dict) -> dict[str, float]:
    """The language teacher's exact figures on the val captions and a unigram of the train captions'
    (data/quality.py; it warns when the teacher is the worse of the two)."""
    return {k: v for name, m in manifests.items() if m["modality"] == Modality.language
            for k, v in collection_metrics(name, shards_path(cfg, "samples"), shards_path(cfg, "targets", name),
                                           m["producer"]["vocab_size"]).items()}


def run_collect(cfg, parent_run_id: str | None = None) -> dict:
    """Run the flow with the task runner the config asks for (local threads or a Dask cluster)."""
    flow_ = collect_soft_targets
    if cfg.collect.runner == Runner.dask:
        from prefect_dask import DaskTaskRunner
        # Each worker process gets its share of the cores (torch reads OMP_NUM_THREADS at import);
        # Prefect's settings (PREFECT_API_URL included) travel to the workers with each task; without an
        # API URL every worker process starts its own temporary server, so set one (docs/scaling.md).
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // cfg.collect.dask_workers))
        runner = (DaskTaskRunner(address=cfg.collect.dask_address) if cfg.collect.dask_address else
                  DaskTaskRunner(cluster_kwargs={"n_workers": cfg.collect.dask_workers, "threads_per_worker": 1,
                                                 "processes": True, "env": {"OMP_NUM_THREADS": threads}}))
        flow_ = flow_.with_options(task_runner=runner)
    return flow_(to_container(cfg), parent_run_id)

