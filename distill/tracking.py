"""MLflow tracking shared by every stage: URI resolution, runs with stable tags, config params
(secrets redacted), shard manifests as dataset inputs."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import tempfile
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import get_registered_sources
from mlflow.data.meta_dataset import MetaDataset
from omegaconf import DictConfig, OmegaConf

from distill.config import PROJECT_ROOT, flatten, to_container

log = logging.getLogger(__name__)
SECRET_KEY = re.compile(r"(token|password|passwd|secret|api_?key|access_?key|private_?key|credential)s?$", re.I)
REDACTED = "***"
LOCAL_UI = "http://127.0.0.1:5000"  # where `mmtp ui` serves a local store (its default --port)


def tracking_uri(cfg: DictConfig) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a sqlite store in the project folder."""
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def run_url(cfg: DictConfig, run_id: str) -> str:
    """The run's page in the MLflow UI: the tracking server's for an http(s) URI, else `mmtp ui`'s."""
    uri = tracking_uri(cfg)
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    experiment_id = mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def setup(cfg: DictConfig) -> str:
    """Point MLflow at the configured store and make the configured experiment the active one."""
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        # Local stores keep artifacts beside the database rather than under the current directory.
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").resolve().as_uri()
        mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)
    return mlflow.set_experiment(cfg.tracking.experiment).experiment_id


def redact(params: dict) -> dict:
    return {k: (REDACTED if SECRET_KEY.search(k.split(".")[-1]) and v not in (None, "") else v)
            for k, v in params.items()}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def stage_run(cfg: DictConfig, stage: str, parent_run_id: str | None = None, tags: dict | None = None,
              flow_run_id: str | None = None, run_id: str | None = None):
    """An MLflow run for one stage, a child of `parent_run_id` when given, with params and config.
    `flow_run_id` (the Prefect flow run that called it, passed in by the flow) becomes a tag. `run_id`
    reopens that run instead (a resumed stage continues its run). The run ends FAILED on an exception, KILLED on a
    stop by a signal."""
    all_tags = {"mmtp.stage": stage, "mmtp.git_commit": git_commit(), **(tags or {})}
    if flow_run_id:
        all_tags["prefect.flow_run_id"] = str(flow_run_id)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    experiment_id = setup(cfg)
    nested = mlflow.active_run() is not None
    if run_id:
        with mlflow.start_run(run_id=run_id, nested=nested) as run, _killed_on_stop():
            yield run
        return
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=all_tags, nested=nested) as run, \
            _killed_on_stop():
        log_config(cfg)
        yield run


@contextlib.contextmanager
def _killed_on_stop():
    """End the innermost MLflow run KILLED when a signal stops the process (SIGTERM, Ctrl-C), not FAILED."""
    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        mlflow.end_run(status="KILLED")
        raise


def log_config(cfg: DictConfig) -> None:
    container = to_container(cfg)
    params = redact({k: ("" if v is None else str(v)[:500]) for k, v in flatten(container).items()})
    mlflow.log_params(params)
    redacted = redact_tree(container)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(OmegaConf.to_yaml(OmegaConf.create(redacted)))
        mlflow.log_artifact(str(path))


def redact_tree(obj):
    if isinstance(obj, dict):
        return {k: REDACTED if SECRET_KEY.search(str(k)) and v not in (None, "") else redact_tree(v)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_tree(v) for v in obj]
    return obj


def log_manifest_input(manifest_dir: str | Path, manifest: dict, name: str, context: str) -> None:
    """Record a shard set as an MLflow dataset input, identified by its manifest's shard digests."""
    from data.shards import digest
    # MLflow registers its local-file source twice, and resolving a path warns about the tie.
    local = next(s for s in get_registered_sources() if s.__name__ == "LocalArtifactDatasetSource")
    dataset = MetaDataset(source=local(str(Path(manifest_dir).resolve())), name=name,
                          digest=digest([s["sha256"] for s in manifest["shards"]])[:16])
    mlflow.log_input(dataset, context=context, tags={"rows": str(manifest["rows"]),
                                                     "kind": manifest["kind"]})
