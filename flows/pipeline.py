"""Prefect flow `distill-pipeline`: [adapt-teacher →] collect-soft-targets → distill-student → evaluate-student as
subflows (a grafted teacher's adapt-teacher runs inside collection, after the vision teachers' shards), under one
parent MLflow run whose children are the stage runs. Stages pass paths and run ids, never tensors. The parent run
carries the headline metrics.
"""

from __future__ import annotations

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from data.shards import run_lock
from distill import tracking
from distill.config import from_dict, output_path, teacher_configs, to_container
from flows.adapt import with_adapters
from flows.artifacts import link_mlflow_run
from flows.collect import collect_soft_targets
from flows.evaluate import evaluate_student
from flows.targets import graft_of
from flows.train import distill_student

HEADLINE = ("eval/agreement/main", "eval/kl/main", "eval/perplexity", "eval/grounded_acc", "eval/grounding_gap",
            "eval/probe/student", "mtp/tokens_per_forward", "mtp/speedup")


@flow(name="distill-pipeline", log_prints=True)
def distill_pipeline(config: dict) -> dict:
    cfg = from_dict(config)
    with run_lock(output_path(cfg)), tracking.stage_run(cfg, "pipeline", flow_run_id=flow_run.id) as parent:
        parent_id = parent.info.run_id
        if graft_of(config) is None:  # teacher correction first, when teachers.language.adapt is set
            config = with_adapters(config, parent_id)
        collected = collect_soft_targets(config, parent_id)  # a graft: vision shards -> adapt -> language shards
        config = collected["config"]
        # The stages pass data through the output folder: wait_for draws those edges in Prefect's graph.
        summary = distill_student(config, parent_id, wait_for=[collected])
        evaluated = evaluate_student(config, parent_id, wait_for=[collected, summary])
        headline = {k: v for k, v in evaluated["metrics"].items() if k in HEADLINE}
        mlflow.log_metrics({"train/final_loss": summary["final_loss"], "train/steps": summary["steps"], **headline})
    result = {"mlflow_run_id": parent_id, "collect_run_id": collected["mlflow_run_id"],
              "train_run_id": summary["mlflow_run_id"], "evaluate_run_id": evaluated["mlflow_run_id"],
              "student_dir": summary["student_dir"], "final_loss": summary["final_loss"], "steps": summary["steps"],
              "headline": headline,
              "baseline": {k: v for k, v in (evaluated.get("baseline") or {}).items() if k in HEADLINE},
              "report": evaluated["report"], "tracking_uri": tracking.tracking_uri(cfg)}
    link_mlflow_run(cfg, "pipeline", parent_id)
    text = report(cfg, result)
    create_markdown_artifact(key="distill-pipeline", markdown=text, description=f"pipeline run {flow_run.id}")
    print(text)
    return result


def report(cfg, result: dict) -> str:
    rows = [("student", f"{cfg.student.preset} preset, MTP depth {cfg.student.mtp_depth}, ZeRO {cfg.train.zero_stage}"),
            ("teachers", ", ".join(t.name for t in teacher_configs(cfg))),
            ("steps / final loss", f"{result['steps']} / {result['final_loss']:.4f}"),
            *[(k, f"{v:.4f}" + (f"  (CE-only baseline {result['baseline'][k]:.4f})" if k in result["baseline"] else ""))
              for k, v in sorted(result["headline"].items())],
            ("eval report", result["report"]),
            ("student folder", result["student_dir"]),
            ("MLflow parent run", result["mlflow_run_id"]),
            ("open in the MLflow UI", tracking.ui_hint(cfg, result["mlflow_run_id"]))]
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def run_pipeline(cfg) -> dict:
    return distill_pipeline(to_container(cfg))
