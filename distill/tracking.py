"""MLflow tracking shared by every stage: URI resolution, runs with stable tags, config params
(secrets redacted), shard manifests as dataset inputs."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import tempfile
import uuid
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import get_registered_sources
from mlflow.data.meta_dataset import MetaDataset
from omegaconf import DictConfig, OmegaConf

from distill.config.load import PROJECT_ROOT, flatten, to_container

log = logging.getLogger(__name__)
# A param whose last key is one of these secret-looking names (or ends in `_<name>`) is logged as ***. An explicit
# list: `max_tokens` or `prompt_tokens` are settings, not secrets.
SECRET_NAMES = ("password", "passwd", "secret", "secret_key", "api_key", "apikey", "access_key", "access_token",
                "auth_token", "token", "credentials", "credential", "private_key")
SECRET_KEY = re.compile(rf"(^|_)({'|'.join(SECRET_NAMES)})$", re.I)
REDACTED = "***"
UI_PORT = 5000  # `mmtp ui`'s default --port
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow 3 opens it on the training runs


def tracking_uri(cfg: DictConfig) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a sqlite store in the project folder."""
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def ui_command(cfg: DictConfig) -> str | None:
    """The command that serves this run's store in the MLflow UI, or None for a tracking server (open its URL)."""
    uri = tracking_uri(cfg)
    return None if uri.startswith(("http://", "https://")) else f"mmtp ui tracking.uri={uri} --port {UI_PORT}"


def run_url(cfg: DictConfig, run_id: str) -> str:
    """The run's page in the MLflow UI: the tracking server's for an http(s) URI, else that of `ui_command`."""
    uri = tracking_uri(cfg)
    base = uri.rstrip("/") if ui_command(cfg) is None else f"http://127.0.0.1:{UI_PORT}"
    experiment_id = mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def ui_hint(cfg: DictConfig, run_id: str) -> str:
    """Where to see a run: its URL, and the command that serves it first when the store is local."""
    command = ui_command(cfg)
    return run_url(cfg, run_id) + (f"  (serve it first: {command})" if command else "")


def prefect_run_url(flow_run_id) -> str | None:
    """The Prefect UI page of a flow run when a Prefect server is known ($PREFECT_API_URL; the temporary server of a
    run without one is gone when the run ends, so there is nothing to link to)."""
    api = os.environ.get("PREFECT_API_URL")
    if not flow_run_id or not api:
        return None
    ui = os.environ.get("PREFECT_UI_URL") or api.rstrip("/").removesuffix("/api")
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}"


def run_name(cfg: DictConfig, stage: str, parent_run_id: str | None) -> str:
    """A stage run under a parent is named by its stage; a top-level run by `tracking.run_name`, else by the output
    folder, the arm (kd, or ce for a CE-only config) and a short id, e.g. `default-kd-3f2a` (`-train` and so on
    for a stage run on its own)."""
    if parent_run_id:
        return stage
    if cfg.tracking.run_name:
        return cfg.tracking.run_name + ("" if stage == "pipeline" else f"-{stage}")
    arm = "ce" if cfg.loss.ce_weight >= 1 else "kd"
    return f"{Path(cfg.output_dir).name}-{arm}-{uuid.uuid4().hex[:4]}" + ("" if stage == "pipeline" else f"-{stage}")


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
        mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location, tags=EXPERIMENT_KIND)
        exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if not exp.tags.get("mlflow.experimentKind"):  # an older experiment: MLflow 3 would open it in GenAI mode
        mlflow.MlflowClient(uri).set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
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
              flow_run_id: str | None = None, run_id: str | None = None, started: float | None = None):
    """An MLflow run for one stage, a child of `parent_run_id` when given, with params and config, named by
    `run_name`. `flow_run_id` (the Prefect flow run that called it, passed in by the flow) becomes a tag, and a link
    in the run's description when a Prefect server is known. `run_id` reopens that run instead (a resumed stage
    continues its run). `started` (time.time()) back-dates the run's start to when its work began, for a run opened
    once the work is done. The run ends FAILED on an exception, KILLED on a stop by a signal."""
    all_tags = {"mmtp.stage": stage, "mmtp.git_commit": git_commit(), **(tags or {})}
    if flow_run_id:
        all_tags["prefect.flow_run_id"] = str(flow_run_id)
        if url := prefect_run_url(flow_run_id):
            all_tags.update({"prefect.flow_run_url": url, "mlflow.note.content": f"Prefect flow run: [{url}]({url})"})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    experiment_id = setup(cfg)
    nested = mlflow.active_run() is not None
    fresh = run_id is None
    if fresh and started is not None:
        run_id = mlflow.MlflowClient(tracking_uri(cfg)).create_run(
            experiment_id, start_time=int(started * 1000), tags=all_tags,
            run_name=run_name(cfg, stage, parent_run_id)).info.run_id
    if run_id:
        with mlflow.start_run(run_id=run_id, nested=nested) as run, _killed_on_stop(run):
            if fresh:
                log_config(cfg)
            yield run
        return
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name(cfg, stage, parent_run_id), tags=all_tags,
                          nested=nested) as run, _killed_on_stop(run):
        log_config(cfg)
        yield run


@contextlib.contextmanager
def _killed_on_stop(run):
    """End `run` KILLED, not FAILED, when a signal stops the process (SIGTERM, Ctrl-C)."""
    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run.info.run_id:
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
