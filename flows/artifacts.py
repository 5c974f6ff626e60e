"""What the Prefect UI shows beside a flow run: each stage's MLflow run as a link artifact and the eval
metrics as a table artifact. Called inside flows: an artifact belongs to the run that creates it."""

from __future__ import annotations

from prefect.artifacts import create_link_artifact, create_table_artifact

from distill.tracking import run_url, ui_command


def link_mlflow_run(cfg, stage: str, run_id: str) -> None:
    command = ui_command(cfg)
    serve = f" The store is local: serve it first with `{command}`." if command else ""
    create_link_artifact(run_url(cfg, run_id), link_text=f"MLflow {stage} run {run_id}", key=f"mlflow-{stage}-run",
                         description=f"The {stage} stage's MLflow run: params, metrics, artifacts.{serve}")


def _rounded(value):
    return float(f"{value:.4g}") if isinstance(value, float) else value


def metrics_table(metrics: dict, baseline: dict | None) -> None:
    """One row a metric: the student's value and, when evaluated, the CE-only baseline's (4 significant digits)."""
    rows = [{"metric": k, "student": _rounded(v), **({"baseline": _rounded(baseline.get(k))} if baseline else {})}
            for k, v in sorted(metrics.items())]
    create_table_artifact(rows, key="eval-metrics", description="The evaluated student's metrics on the test split.")
