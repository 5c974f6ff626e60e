"""Prefect flow `collect-soft-targets`: samples shards, then teacher × shard tasks, then manifests (the tasks are in
flows/targets.py). With a grafted language teacher: the vision teachers' shards, the adapt-teacher flow, then the
language teacher's shards.

Thin by design: the work lives in data/ and teachers/. Tasks receive the config as a plain dict
and pass paths, never tensors.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import mlflow
from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from data.quality import collection_metrics
from data.shards import clean_temp_files, run_lock
from distill import tracking
from distill.config import Runner, cache_path, from_dict, output_path, shards_path, teacher_configs, to_container
from flows.adapt import with_adapters
from flows.artifacts import link_mlflow_run
from flows.targets import build_samples_task, collect_group, graft_of, opaque, phases
from teachers.collect import check_vocab
from teachers.contract import Modality


@flow(name="collect-soft-targets", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def collect_soft_targets(config: dict, parent_run_id: str | None = None) -> dict:
    """Write samples shards and every teacher's target shards under `output_dir`; log to MLflow. With
    `teachers.language.adapt` set, the teacher is corrected first (flow adapt-teacher, cached); a grafted teacher
    (adapt.vision) after the vision teachers' shards, which it reads, and before its own. The summary's `config`
    names the adapters folder collection used."""
    grafted = graft_of(config) is not None
    config = config if grafted else with_adapters(config, parent_run_id)
    cfg = from_dict(config)
    started = time.perf_counter()
    with run_lock(shards_path(cfg)):
        # Under the lock no other writer exists: temp files here are orphans of a killed run.
        targets = [shards_path(cfg, "targets", t.name) for t in teacher_configs(cfg)]
        for folder in [shards_path(cfg, "samples"), *targets]:
            clean_temp_files(folder)
        if cfg.teachers.language is not None:
            check_vocab(cfg.teachers.language, cfg.student.vocab_size, cache_path(cfg, "teachers"))
        samples = build_samples_task(opaque(config))
        entries, manifests = {}, {}
        for i, names in enumerate(phases(config)):
            if i:  # the grafted teacher reads the vision shards just finished: fit it (or find it cached) now
                config = with_adapters(config, parent_run_id)
            done = collect_group(config, names, samples)
            entries, manifests = entries | done[0], manifests | done[1]
        run_id = log_collection(cfg, samples, manifests, entries, parent_run_id, time.perf_counter() - started)
    link_mlflow_run(cfg, "collect", run_id)
    names = [t.name for t in teacher_configs(cfg)]
    summary = {"samples_dir": str(shards_path(cfg, "samples")), "mlflow_run_id": run_id,
               "targets": {n: str(shards_path(cfg, "targets", n)) for n in names},
               "forwards": {n: sum(e["forwards"] for e in entries[n]) for n in names},
               "shards_reused": {n: sum(e["skipped"] for e in entries[n]) for n in names}, "config": config}
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

