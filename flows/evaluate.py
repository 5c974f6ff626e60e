"""Prefect flow `evaluate-student`: metrics of a student (folder or MLflow run id) on the test split,
optionally against a baseline student; logs to MLflow and writes eval_report.md."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow
from prefect.runtime import flow_run

from distill import tracking
from distill.config import from_dict, shards_path, teacher_configs, to_container
from distill.eval import evaluate_run, resolve_student
from distill.export import publish_student
from flows.artifacts import link_mlflow_run, metrics_table


@flow(name="evaluate-student", log_prints=True)
def evaluate_student(config: dict, parent_run_id: str | None = None) -> dict:
    cfg = from_dict(config)
    names = [t.name for t in teacher_configs(cfg)]
    with tracking.stage_run(cfg, "evaluate", parent_run_id, flow_run_id=flow_run.id) as run:
        result = evaluate_run(cfg, {n: shards_path(cfg, "targets", n) for n in names})
        mlflow.log_metrics(result["metrics"])
        if result["mtp_timing"]:  # where mtp/speedup was timed, for the compare view
            mlflow.set_tag("mtp_timing", result["mtp_timing"])
        if result["baseline"]:
            mlflow.log_metrics({f"baseline/{k}": v for k, v in result["baseline"].items()})
        for path in result["plots"]:
            mlflow.log_artifact(str(path), artifact_path="plots")
        mlflow.log_artifact(str(result["report"]))
        registered = publish_student(cfg, resolve_student(cfg.evaluate.student, cfg), result["metrics"],
                                     result["baseline"])
    link_mlflow_run(cfg, "evaluate", run.info.run_id)
    metrics_table(result["metrics"], result["baseline"])
    print(Path(result["report"]).read_text())
    return {"mlflow_run_id": run.info.run_id, "report": str(result["report"]), "metrics": result["metrics"],
            "baseline": result["baseline"], "registered_model": registered}


def run_evaluate(cfg, parent_run_id: str | None = None) -> dict:
    return evaluate_student(to_container(cfg), parent_run_id)
