"""The tiny pipeline end to end, in-process on the embedded Prefect server: one parent MLflow run
with a child per stage, each linked from its Prefect flow run, the eval metrics as a Prefect table, a
loadable student, and a re-run that reuses the shards and resumes."""

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from transformers import AutoModel

import student  # noqa: F401


def _artifacts(flow_run_ids) -> dict:
    """{flow run id: {artifact key: artifact}} of these flow runs, read through the Prefect client."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=list(flow_run_ids))))
    out = {}
    for a in found:
        out.setdefault(str(a.flow_run_id), {})[a.key] = a
    return out


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(prefect_harness, tiny_cfg):
    from flows.pipeline import run_pipeline
    cfg = tiny_cfg("train.max_steps=4", "train.checkpoint_every=2", "evaluate.mtp_prompts=2")
    result = run_pipeline(cfg)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    client = MlflowClient()
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.tags["mmtp.stage"] == "pipeline" and parent.data.metrics["train/steps"] == 4
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'")
    stages = {c.data.tags["mmtp.stage"]: c for c in children}
    assert set(stages) == {"collect", "train", "evaluate"}
    assert all(c.data.tags.get("prefect.flow_run_id") for c in children)
    assert stages["collect"].data.tags["prefect.flow_run_id"] != stages["train"].data.tags["prefect.flow_run_id"]
    assert "eval/agreement/main" in parent.data.metrics and "mtp/tokens_per_forward" in parent.data.metrics
    assert Path(result["report"]).read_text().startswith("# Evaluation report")
    AutoModel.from_pretrained(result["student_dir"])
    assert result["train_run_id"] == stages["train"].info.run_id
    assert result["steps"] == 4 and Path(result["student_dir"]).is_dir()

    # The Prefect UI: each stage's flow run links its MLflow run; the evaluate run has the metrics table.
    artifacts = _artifacts([run.data.tags["prefect.flow_run_id"] for run in [parent, *children]])
    for run in [parent, *children]:
        stage = run.data.tags["mmtp.stage"]
        assert artifacts[run.data.tags["prefect.flow_run_id"]][f"mlflow-{stage}-run"].data.endswith(
            f"/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id})")
    table = json.loads(artifacts[stages["evaluate"].data.tags["prefect.flow_run_id"]]["eval-metrics"].data)
    shown = {row["metric"]: row["student"] for row in table}
    assert set(result["headline"]) <= set(shown) and "eval/agreement/main" in shown
    assert shown == pytest.approx({k: stages["evaluate"].data.metrics[k] for k in shown}, rel=5e-4)  # 4 digits

    again = run_pipeline(tiny_cfg("train.max_steps=6", "train.checkpoint_every=2", "train.resume=true",
                                  "evaluate.probe=false", "evaluate.mtp_prompts=0"))
    collect = client.get_run(again["collect_run_id"])
    assert collect.data.metrics["collect/lm/teacher_forwards"] == 0  # shards reused
    assert again["train_run_id"] == result["train_run_id"]  # the resume continues the training run
    train = client.get_metric_history(again["train_run_id"], "loss/total")
    assert [m.step for m in train] == [1, 2, 3, 4, 5, 6]  # resumed from the step-4 checkpoint
    assert Path(cfg.output_dir, "train_summary.json").exists()


@pytest.mark.slow
def test_a_failing_stage_fails_the_pipeline_run_too(prefect_harness, tiny_cfg):
    from flows.pipeline import run_pipeline
    cfg = tiny_cfg("train.micro_batch_size=100000")  # more than the training rows: training refuses to start
    with pytest.raises(Exception, match="fewer than one step"):
        run_pipeline(cfg)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    status = {r.data.tags["mmtp.stage"]: r.info.status for r in runs}
    assert status == {"pipeline": "FAILED", "collect": "FINISHED"}
