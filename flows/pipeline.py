"""Prefect flow `distill-pipeline`: collect-soft-targets → distill-student as subflows, under one
parent MLflow run whose children are the stage runs. Stages pass paths and run ids, never tensors.
"""

from __future__ import annotations

import json

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from data.shards import run_lock
from distill import tracking
from distill.config import from_dict, output_path, to_container
from flows.collect import collect_soft_targets
from flows.train import distill_student


@flow(name="distill-pipeline", log_prints=True)
def distill_pipeline(config: dict) -> dict:
    cfg = from_dict(config)
    with run_lock(output_path(cfg)), tracking.stage_run(cfg, "pipeline") as parent:
        parent_id = parent.info.run_id
        collected = collect_soft_targets(config, parent_id)
        train_run = distill_student(config, parent_id)
        summary = json.loads(output_path(cfg, "train_summary.json").read_text())
        mlflow.log_metrics({"train/final_loss": summary["final_loss"], "train/steps": summary["steps"]})
    result = {"mlflow_run_id": parent_id, "collect_run_id": collected["mlflow_run_id"], "train_run_id": train_run,
              "student_dir": summary["student_dir"], "final_loss": summary["final_loss"], "steps": summary["steps"],
              "tracking_uri": tracking.tracking_uri(cfg)}
    create_markdown_artifact(key="distill-pipeline", markdown=report(cfg, result),
                             description=f"pipeline run {flow_run.id}")
    print(report(cfg, result))
    return result


def report(cfg, result: dict) -> str:
    rows = [("student", f"{cfg.student.preset} preset, MTP depth {cfg.student.mtp_depth}, ZeRO {cfg.train.zero_stage}"),
            ("teachers", ", ".join([cfg.teachers.language.name] + [t.name for t in cfg.teachers.vision])),
            ("steps / final loss", f"{result['steps']} / {result['final_loss']:.4f}"),
            ("student folder", result["student_dir"]),
            ("MLflow parent run", result["mlflow_run_id"]),
            ("open the UI", f"mmtp ui --config <this config>  (tracking: {result['tracking_uri']})")]
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def run_pipeline(cfg) -> dict:
    return distill_pipeline(to_container(cfg))
