"""The evaluated student as an MLflow model in the Model Registry.

`publish_student`, called inside the evaluate run: rewrites the folder's model card with the evaluation
table, logs the folder as a pyfunc model (distill/export/student_pyfunc.py, with signature and input example) whose
LoggedModel carries the evaluation metrics, registers it under `tracking.registered_model` (default: the
experiment name), and sets the aliases: `candidate` on every new version, `champion` when it beats the
baseline on `tracking.champion_metric` (in that metric's direction, as in the evaluation report).
"""

from __future__ import annotations

import io
import json
import logging
from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from distill.eval.report import better
from distill.export.card import write_card

log = logging.getLogger(__name__)
PYFUNC = Path(__file__).with_name("student_pyfunc.py")
MODEL_NAME = "student_model"  # the LoggedModel's name in the run (the plain folder stays the `student` artifact)
CANDIDATE, CHAMPION = "candidate", "champion"
REQUIREMENTS = ("torch", "transformers", "peft", "pillow", "pandas", "safetensors", "mlflow")


def registered_name(cfg) -> str:
    return cfg.tracking.registered_model or cfg.tracking.experiment


def signature() -> ModelSignature:
    inputs = Schema([ColSpec("binary", "image"), ColSpec("string", "prompt", required=False)])
    params = ParamSchema([ParamSpec("max_new_tokens", "long", 32), ParamSpec("num_beams", "long", 1),
                          ParamSpec("do_sample", "boolean", False), ParamSpec("mtp_speculative", "boolean", False)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string", "caption")]), params=params)


def input_example(image_size: int) -> pd.DataFrame:
    buf = io.BytesIO()
    Image.new("RGB", (image_size, image_size), (128, 128, 128)).save(buf, format="PNG")
    return pd.DataFrame({"image": [buf.getvalue()], "prompt": [""]})


def is_champion(cfg, metrics: dict, baseline: dict | None) -> bool:
    key = cfg.tracking.champion_metric
    return bool(baseline) and key in metrics and key in baseline and better(key, metrics[key], baseline[key])


def publish_student(cfg, folder, metrics: dict, baseline: dict | None = None) -> dict | None:
    """Log and register the student in `folder` from the active (evaluate) run; see the module docstring.
    Log `metrics` in the run first: MLflow links the run's metrics to the LoggedModel. Returns {"name", "version",
    "model_uri", "model_id", "aliases"}."""
    folder = Path(folder)
    if mlflow.active_run() is None:
        raise RuntimeError("publish_student runs inside the evaluate run (mlflow.active_run() is None)")
    if not (folder / "preprocessor_config.json").is_file():  # exported before students were portable
        log.warning("%s has no image processor (an older export): not logged as an MLflow model", folder)
        return None
    name = registered_name(cfg)
    write_card(cfg, folder, metrics, baseline, name)
    image_size = json.loads((folder / "preprocessor_config.json").read_text())["size"]["height"]
    info = mlflow.pyfunc.log_model(
        name=MODEL_NAME, python_model=str(PYFUNC), artifacts={"student": str(folder)}, signature=signature(),
        input_example=input_example(image_size), registered_model_name=name,
        pip_requirements=[f"{p}=={version(p)}" for p in REQUIREMENTS],
        tags={"mmtp.champion_metric": cfg.tracking.champion_metric})
    client = MlflowClient()
    registered = str(info.registered_model_version)
    aliases = [CANDIDATE]
    client.set_registered_model_alias(name, CANDIDATE, registered)
    if is_champion(cfg, metrics, baseline):
        client.set_registered_model_alias(name, CHAMPION, registered)
        aliases.append(CHAMPION)
    key = cfg.tracking.champion_metric
    if key in metrics:
        client.set_model_version_tag(name, registered, key, str(metrics[key]))
    return {"name": name, "version": registered, "model_uri": f"models:/{name}/{registered}",
            "model_id": info.model_id, "aliases": aliases}
