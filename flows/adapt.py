"""Prefect flow `adapt-teacher`: teacher correction before collection (teachers/adapt.py, docs/teachers.md).

It builds (or reuses) the samples shards, fits the language teacher's cross-fitted LoRA adapters on the
train split (cached: a re-run with the same teacher, data and settings fits nothing), and logs an MLflow
run with the teacher's exact val perplexity before and after, per fold. It returns the config with
`teachers.language.adapters` set to the adapters' folder, which collection then loads.
"""

from __future__ import annotations

import copy
import time

import mlflow
from prefect import flow
from prefect.runtime import flow_run

from data.samples import build_samples
from data.shards import run_lock
from distill import tracking
from distill.config import ConfigError, cache_path, from_dict, shards_path, to_container
from flows.artifacts import link_mlflow_run
from teachers.adapt import adapt_teacher
from teachers.registry import adapt_config, load_teacher


def needs_adapt(config: dict) -> bool:
    """Whether the language teacher asks for correction and no adapters folder is given yet."""
    lang = (config.get("teachers") or {}).get("language") or {}
    return lang.get("adapt") is not None and not lang.get("adapters")


@flow(name="adapt-teacher", log_prints=True)
def adapt_teacher_flow(config: dict, parent_run_id: str | None = None) -> dict:
    cfg = from_dict(config)
    lang = cfg.teachers.language
    if lang is None or lang.adapt is None:
        raise ConfigError("config key 'teachers.language.adapt': not set; teacher correction needs a language "
                          "teacher with adapt settings (e.g. teachers.language.adapt={})")
    started = time.perf_counter()
    with run_lock(shards_path(cfg)):
        build_samples(to_container(cfg)["data"], shards_path(cfg, "samples"), cfg.seed, cfg.collect.progress)
        base = {**to_container(cfg)["teachers"]["language"], "adapt": None, "adapters": None}
        teacher = load_teacher(base, cache_path(cfg, "teachers"))
        adapt = adapt_config(to_container(cfg)["teachers"]["language"]["adapt"], f"teacher {lang.name!r}")
        result = adapt_teacher(teacher, shards_path(cfg, "samples"), adapt, cache_path(cfg), cfg.collect.progress)
    tags = {"adapt.folder": result["folder"], "adapt.cached": str(result["cached"]),
            **{f"adapt.fold{a['fold']}.digest": a["digest"] for a in result["adapters"]}}
    with tracking.stage_run(cfg, "adapt", parent_run_id, tags, flow_run.id) as run:
        metrics = {"adapt/wall_seconds": time.perf_counter() - started, "adapt/train_rows": result["train_rows"]}
        for a in result["adapters"]:
            metrics.update({f"adapt/fold{a['fold']}/{k}": a[k] for k in
                            ("val_perplexity_before", "val_perplexity_after", "steps", "best_step")})
        for k in ("val_perplexity_before", "val_perplexity_after"):
            metrics[f"adapt/{k}"] = sum(a[k] for a in result["adapters"]) / len(result["adapters"])
        mlflow.log_metrics(metrics)
        mlflow.log_dict({k: v for k, v in result.items() if k != "cached"}, "adapters.json")
        run_id = run.info.run_id
    link_mlflow_run(cfg, "adapt", run_id)
    print(f"teacher {lang.name!r} corrected ({'cached' if result['cached'] else 'fitted'}): val perplexity "
          f"{metrics['adapt/val_perplexity_before']:.2f} -> {metrics['adapt/val_perplexity_after']:.2f} over "
          f"{result['folds']} folds; adapters in {result['folder']} (MLflow run {run_id})")
    adapted = copy.deepcopy(config)
    adapted["teachers"]["language"]["adapters"] = result["folder"]
    return {"config": adapted, "adapters": result["folder"], "mlflow_run_id": run_id, "cached": result["cached"],
            "val_perplexity_before": metrics["adapt/val_perplexity_before"],
            "val_perplexity_after": metrics["adapt/val_perplexity_after"]}


def with_adapters(config: dict, parent_run_id: str | None = None) -> dict:
    """`config` with the language teacher's adapters folder set, running the adapt flow when it is needed."""
    return adapt_teacher_flow(config, parent_run_id)["config"] if needs_adapt(config) else config


def run_adapt(cfg) -> dict:
    return adapt_teacher_flow(to_container(cfg))
