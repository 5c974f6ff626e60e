"""Two tiny pipeline runs logged to a real `mlflow server` on loopback, compared through its REST
API the way the UI's compare view sees them: params differ only where the configs differ, and
every run has the same metric keys."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from distill.config import flatten, to_container
from distill.tracking import redact


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "mlflow server did not start in 120 s"
                time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def _runs(base: str, experiment_id: str) -> list[dict]:
    return _api(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id], "max_results": 100})["runs"]


def _tags(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


@pytest.mark.slow
def test_two_pipeline_runs_compare_on_a_real_mlflow_server(prefect_harness, tiny_cfg, tmp_path, mlflow_server):
    from flows.pipeline import run_pipeline
    common = [f"tracking.uri={mlflow_server}", "train.max_steps=3", "evaluate.probe=false",
              "evaluate.mtp_prompts=2"]
    cfgs = {balance: tiny_cfg(*common, f"loss.balance={balance}", root=tmp_path / balance)
            for balance in ("static", "uncertainty")}
    results = {balance: run_pipeline(cfg) for balance, cfg in cfgs.items()}

    experiment = _api(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=mmtp-distill")
    runs = {r["info"]["run_id"]: r for r in _runs(mlflow_server, experiment["experiment"]["experiment_id"])}
    family = {}
    for balance, result in results.items():
        parent = runs[result["mlflow_run_id"]]
        children = [r for r in runs.values() if _tags(r).get("mlflow.parentRunId") == result["mlflow_run_id"]]
        assert sorted(_tags(c)["mmtp.stage"] for c in children) == ["collect", "evaluate", "train"]
        family[balance] = {"pipeline": parent, **{_tags(c)["mmtp.stage"]: c for c in children}}

    flat = {b: redact({k: "" if v is None else str(v) for k, v in flatten(to_container(c)).items()})
            for b, c in cfgs.items()}
    config_diff = {k for k in flat["static"] if flat["static"][k] != flat["uncertainty"].get(k)}
    assert config_diff == {"loss.balance", "output_dir"}
    for stage in ("pipeline", "collect", "train", "evaluate"):
        params = {b: {p["key"]: p["value"] for p in family[b][stage]["data"]["params"]} for b in family}
        assert params["static"].keys() == params["uncertainty"].keys(), stage  # stable param names
        differing = {k for k in params["static"] if params["static"][k] != params["uncertainty"][k]}
        assert differing == config_diff, stage
        metrics = {b: {m["key"] for m in family[b][stage]["data"]["metrics"]} for b in family}
        assert metrics["static"] == metrics["uncertainty"], (stage, metrics["static"] ^ metrics["uncertainty"])
        assert metrics["static"], stage
    assert Path(results["static"]["student_dir"]).is_dir()

    # Each evaluate run logged the student as an MLflow model, registered under the experiment's name.
    model = _api(mlflow_server, "/api/2.0/mlflow/registered-models/get?name=mmtp-distill")["registered_model"]
    aliases = {a["alias"]: a["version"] for a in model.get("aliases", [])}
    assert aliases["candidate"] == "2"  # the newest version (no baseline configured: no champion)
    versions = _api(mlflow_server, "/api/2.0/mlflow/model-versions/search?filter=name%3D%27mmtp-distill%27")
    assert sorted(v["run_id"] for v in versions["model_versions"]) == sorted(
        family[b]["evaluate"]["info"]["run_id"] for b in family)


def _tiny_student(tmp_path):
    """A tiny exported student, finished as the training export finishes it (processor, tokenizer)."""
    import torch

    import student
    from student.portable import make_portable
    from teachers.tiny import make_tiny_tokenizer
    make_tiny_tokenizer(["a red circle", "three blue squares"] * 20, vocab_size=256).save_pretrained(tmp_path / "tok")
    torch.manual_seed(0)
    config = student.load_preset("tiny", initializer_range=0.2, bos_token_id=2, eos_token_id=3)
    model = student.CogViTMTPForDistillation(config).eval()
    model.save_pretrained(tmp_path / "student")
    make_portable(tmp_path / "student", 28, tmp_path / "tok")
    return model, tmp_path / "student"


@pytest.mark.slow
def test_student_registered_with_aliases_on_a_real_mlflow_server(tiny_cfg, tmp_path, mlflow_server):
    import io

    import mlflow
    import torch
    from PIL import Image

    from distill import tracking
    from distill.export import input_example, publish_student
    cfg = tiny_cfg(f"tracking.uri={mlflow_server}", "tracking.experiment=registry-test",
                   "tracking.registered_model=captioner", "tracking.champion_metric=eval/kl/main")
    model, folder = _tiny_student(tmp_path)
    tracking.setup(cfg)
    published, run_ids = [], []
    # v1 beats the baseline on the champion metric (KL: lower is better), v2 does not.
    for kl in (0.5, 0.9):
        with mlflow.start_run() as run:
            metrics = {"eval/kl/main": kl, "eval/agreement/main": 0.6}
            mlflow.log_metrics(metrics)
            published.append(publish_student(cfg, folder, metrics, {"eval/kl/main": 0.7, "eval/agreement/main": 0.5}))
            run_ids.append(run.info.run_id)
    assert [p["version"] for p in published] == ["1", "2"]
    assert [p["aliases"] for p in published] == [["candidate", "champion"], ["candidate"]]

    registered = _api(mlflow_server, "/api/2.0/mlflow/registered-models/get?name=captioner")["registered_model"]
    assert {a["alias"]: a["version"] for a in registered["aliases"]} == {"candidate": "2", "champion": "1"}
    for p, run_id in zip(published, run_ids, strict=True):
        logged = mlflow.get_logged_model(p["model_id"])
        assert logged.source_run_id == run_id
        assert {m.key: m.value for m in logged.metrics}["eval/kl/main"] in (0.5, 0.9)
    info = mlflow.models.get_model_info("models:/captioner@champion")
    assert info.signature.inputs.input_names() == ["image", "prompt"]
    assert {p.name for p in info.signature.params.params} == {"max_new_tokens", "num_beams", "do_sample",
                                                               "mtp_speculative"}
    assert info.saved_input_example_info is not None

    # The registered model predicts captions, the same as the student decoded in this process.
    pyfunc = mlflow.pyfunc.load_model("models:/captioner@champion")
    example = input_example(28)
    got = pyfunc.predict(example, params={"max_new_tokens": 6})
    processor = __import__("student").CogViTMTPProcessor.from_pretrained(folder)
    inputs = processor(images=Image.open(io.BytesIO(example["image"][0])))
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=6)
    assert list(got["caption"]) == processor.batch_decode(tokens[:, 1:], skip_special_tokens=True)
    assert got["caption"][0]  # a non-empty caption, so the comparison means something
    spec = pyfunc.predict(example, params={"max_new_tokens": 6, "mtp_speculative": True})
    assert list(spec["caption"]) == list(got["caption"])
    card = (folder / "README.md").read_text()
    assert "# captioner:" in card and "| eval/kl/main | 0.9000 | 0.7000 | **no** |" in card
