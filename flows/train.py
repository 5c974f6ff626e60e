"""Prefect flow `distill-student`: train the student on the collected shards; returns the training summary
(steps, final loss, student folder, MLflow run id)."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from data.shards import run_lock
from distill.config import from_dict, output_path, to_container
from distill.train import run_training
from flows.artifacts import link_mlflow_run


@flow(name="distill-student", log_prints=True)
def distill_student(config: dict, parent_run_id: str | None = None) -> dict:
    cfg = from_dict(config)
    with run_lock(output_path(cfg)):
        summary = run_training(cfg, parent_run_id, flow_run.id)
    link_mlflow_run(cfg, "train", summary["mlflow_run_id"])
    print(f"trained {summary['steps']} steps (final loss {summary['final_loss']:.4f}, "
          f"{summary['skipped_steps']} skipped); student in {summary['student_dir']}; "
          f"MLflow run {summary['mlflow_run_id']}")
    return summary


def run_train(cfg, parent_run_id: str | None = None) -> dict:
    return distill_student(to_container(cfg), parent_run_id)
