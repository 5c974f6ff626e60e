"""What the Prefect UI shows of a run, read back through the Prefect client: the stage's MLflow run as a
link artifact, task runs named <teacher>/<shard>, and the library packages' warnings in the run's logs."""

import json

from mlflow.tracking import MlflowClient


def test_collect_run_shows_its_mlflow_run_task_names_and_library_warnings(prefect_harness, tiny_cfg):
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    from flows.collect import run_collect

    # One vision teacher that trusts remote code: loading it logs a warning from teachers.registry.
    vit = {"name": "vit", "kind": "hf_vision", "source": "tiny-random:vit", "image_size": 28,
           "trust_remote_code": True}
    cfg = tiny_cfg("teachers.language=null", f"teachers.vision=[{json.dumps(vit)}]",
                   "data.sources=[{kind: digits, limit: 32}]", "data.shard_rows=16")
    with temporary_settings(updates={PREFECT_LOGGING_TO_API_ENABLED: True}):
        summary = run_collect(cfg)
        APILogHandler().flush()
    mlflow_run = MlflowClient(cfg.tracking.uri).get_run(summary["mlflow_run_id"])
    span = (mlflow_run.info.end_time - mlflow_run.info.start_time) / 1000  # the run spans the collection
    assert span >= mlflow_run.data.metrics["collect/wall_seconds"] - 0.01
    flow_run_id = mlflow_run.data.tags["prefect.flow_run_id"]

    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    assert {"vit/shard-00000.arrow", "vit/shard-00001.arrow", "vit/finalize"} <= {t.name for t in tasks}
    links = [a for a in artifacts if a.key == "mlflow-collect-run"]
    url = f"http://127.0.0.1:5000/#/experiments/{mlflow_run.info.experiment_id}/runs/{mlflow_run.info.run_id}"
    assert len(links) == 1 and f"]({url})" in links[0].data  # `mmtp ui` serves a local store there
    warned = [g for g in logs if g.name == "teachers.registry" and "trust_remote_code=True" in g.message]
    shard_tasks = {t.id for t in tasks if t.name.startswith("vit/shard-")}
    assert len(warned) == 1 and warned[0].level == 30 and warned[0].task_run_id in shard_tasks
