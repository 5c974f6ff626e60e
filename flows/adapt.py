"""Prefect flow `adapt-teacher`: teacher correction before collection (teachers/adapt.py, docs/teachers.md).

It builds (or reuses) the samples shards, fits the language teacher's cross-fitted LoRA adapters on the
train split (cached: a re-run with the same teacher, data and settings fits nothing), and logs an MLflow
run with the teacher's exact val perplexity before and after, per fold, overall and at grounded words. It returns
the config with `teachers.language.adapters` set to the adapters' folder, which collection then loads.

A grafted teacher (`adapt.vision`, teachers/graft.py) reads the vision teacher's finished target shards: the flow
collects them first when they are not there (flows/targets.py), then fits the LoRA and projectors.
"""

from __future__ import annotations

import copy
import time

import mlflow
from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from data.samples import build_samples
from data.shards import run_lock
from distill import tracking
from distill.config import ConfigError, cache_path, from_dict, shards_path, to_container
from flows.artifacts import link_mlflow_run
from flows.targets import vision_targets
from teachers.adapt import adapt_teacher
from teachers.graft import graft_teacher
from teachers.registry import adapt_config, load_teacher


def needs_adapt(config: dict) -> bool:
    """Whether the language teacher asks for correction and no adapters folder is given yet."""
    lang = (config.get("teachers") or {}).get("language") or {}
    return lang.get("adapt") is not None and not lang.get("adapters")


@flow(name="adapt-teacher", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def adapt_teacher_flow(config: dict, parent_run_id: str | None = None) -> dict:
    cfg = from_dict(config)
    lang = cfg.teachers.language
    if lang is None or lang.adapt is None:
        raise ConfigError("config key 'teachers.language.adapt': not set; teacher correction needs a language "
                          "teacher with adapt settings (e.g. teachers.language.adapt={})")
    started = time.perf_counter()
    with run_lock(shards_path(cfg)):
        samples = build_samples(to_container(cfg)["data"], shards_path(cfg, "samples"), cfg.seed, cfg.collect.progress)
        base = {**to_container(cfg)["teachers"]["language"], "adapt": None, "adapters": None}
        teacher = load_teacher(base, cache_path(cfg, "teachers"))
        adapt = adapt_config(to_container(cfg)["teachers"]["language"]["adapt"], f"teacher {lang.name!r}")
        if adapt.vision is None:
            result = adapt_teacher(teacher, shards_path(cfg, "samples"), adapt, cache_path(cfg), cfg.collect.progress)
        else:  # grafted: the vision teacher's finished shards are its input (collected here when missing)
            vision = vision_targets(config, adapt.vision, samples)
            result = graft_teacher(teacher, shards_path(cfg, "samples"), vision, adapt, cache_path(cfg),
                                   cfg.collect.progress)
    run_id, metrics = log_adapt(cfg, result, parent_run_id, time.perf_counter() - started)
    kind = f"grafted on {adapt.vision!r}" if adapt.vision else "corrected"
    print(f"teacher {lang.name!r} {kind} ({'cached' if result['cached'] else 'fitted'}): val perplexity "
          f"{metrics['adapt/val_perplexity_before']:.2f} -> {metrics['adapt/val_perplexity_after']:.2f} over "
          f"{result['folds']} folds; adapters in {result['folder']} (MLflow run {run_id})")
    adapted = copy.deepcopy(config)
    adapted["teachers"]["language"]["adapters"] = result["folder"]
    return {"config": adapted, "adapters": result["folder"], "mlflow_run_id": run_id, "cached": result["cached"],
            "val_perplexity_before": metrics["adapt/val_perplexity_before"],
            "val_perplexity_after": metrics["adapt/val_perplexity_after"]}


def log_adapt(cfg, result: dict, parent_run_id: str | None, wall_seconds: float) -> tuple[str, dict]:
    """The adapt stage's MLflow run: per fold and as their means, the exact val perplexity before and after (and at
    grounded words and the others, and for a graft at its first step: `…_start`), the steps; the folder, the
    digests and the graft's vision teacher as tags."""
    folds = result["adapters"]
    tags = {"adapt.folder": result["folder"], "adapt.cached": str(result["cached"]),
            **{f"adapt.fold{a['fold']}.digest": a["digest"] for a in folds},
            **{f"adapt.fold{a['fold']}.projector_digest": a["projector_digest"] for a in folds
               if "projector_digest" in a},
            **{f"adapt.graft.{k}": str(v) for k, v in (result.get("graft") or {}).items() if k != "projector"}}
    figures = [k for k in folds[0] if k.startswith("val_perplexity") and all(k in a for a in folds)]
    metrics = {"adapt/wall_seconds": wall_seconds, "adapt/train_rows": result["train_rows"]}
    for a in folds:
        metrics.update({f"adapt/fold{a['fold']}/{k}": a[k] for k in (*figures, "steps", "best_step")})
    metrics.update({f"adapt/{k}": sum(a[k] for a in folds) / len(folds) for k in figures})
    with tracking.stage_run(cfg, "adapt", parent_run_id, tags, flow_run.id) as run:
        mlflow.log_metrics(metrics)
        mlflow.log_dict({k: v for k, v in result.items() if k != "cached"}, "adapters.json")
        run_id = run.info.run_id
    link_mlflow_run(cfg, "adapt", run_id)
    return run_id, metrics


def with_adapters(config: dict, parent_run_id: str | None = None) -> dict:
    """`config` with the language teacher's adapters folder set, running the adapt flow when it is needed."""
    return adapt_teacher_flow(config, parent_run_id)["config"] if needs_adapt(config) else config


def run_adapt(cfg) -> dict:
    return adapt_teacher_flow(to_container(cfg))
