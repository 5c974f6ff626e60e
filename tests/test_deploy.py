"""Scheduled deployments (`mmtp deploy`, flows/deploy.py): what they are built with, and one real
round trip: a Prefect server on loopback, registration, a served run of the tiny pipeline."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from distill.config import ConfigError, load_config, to_container
from flows.cli import main
from flows.deploy import CRON_COLLECT, CRON_DISTILL, build_deployments, resolve

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_deployments_carry_the_resolved_config_and_cron_schedules():
    cfg = load_config(TINY, ["train.max_steps=7"])
    collect, pipeline = build_deployments(cfg)
    assert [(d.flow_name, d.name) for d in (collect, pipeline)] == [
        ("scheduled-collect", "nightly-collect"), ("scheduled-pipeline", "weekly-distill")]
    assert [(d.schedules[0].schedule.cron, d.schedules[0].schedule.timezone) for d in (collect, pipeline)] == [
        (CRON_COLLECT, "UTC"), (CRON_DISTILL, "UTC")]
    assert pipeline.entrypoint == "flows.deploy.scheduled_pipeline"
    params = json.loads(json.dumps(pipeline.parameters))
    assert params == {"config": to_container(cfg), "overrides": []} and params["config"]["train"]["max_steps"] == 7
    assert not build_deployments(cfg, cron_collect="")[0].schedules


def test_run_overrides_apply_like_cli_overrides():
    config = to_container(load_config(TINY))
    cfg = resolve(config, ["train.max_steps=3", "teachers.vision.0.image_size=56"])
    assert cfg.train.max_steps == 3 and cfg.teachers.vision[0].image_size == 56 and cfg.seed == config["seed"]
    with pytest.raises(ConfigError, match=r"train\.max_stepz"):
        resolve(config, ["train.max_stepz=3"])


def test_bad_cron_is_a_one_line_config_error(capsys):
    assert main(["deploy", "--config", str(TINY), "--register-only", "--cron-distill", "every sunday"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmtp: error: --cron-distill 'every sunday'") and "\n" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list, env: dict, log: Path) -> subprocess.Popen:
    # Own process group: the server's uvicorn and the served flow-run processes go with it.
    return subprocess.Popen(args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # also any child left behind by a clean exit
    except ProcessLookupError:
        pass
    proc.wait()


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def _env(tmp_path: Path, name: str, **extra) -> dict:
    home = tmp_path / name
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


@pytest.mark.slow
def test_served_pipeline_deployment_runs_on_a_real_prefect_server(tmp_path, cache_dir, capsys):
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    out = tmp_path / "out"
    overrides = [f"output_dir={out}", f"cache_dir={cache_dir}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 "train.max_steps=2", "train.progress=false", "evaluate.probe=false", "evaluate.mtp_prompts=0"]
    crons = ["--cron-collect", "0 0 1 1 *", "--cron-distill", "0 12 1 1 *"]  # far from any test run
    deploy_args = ["deploy", "--config", str(TINY), *overrides, *crons]
    procs = []
    started = time.time()
    try:
        procs.append(_start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)],
                            _env(tmp_path, "prefect-server", PREFECT_SERVER_UI_ENABLED="false"), server_log))
        while True:
            assert procs[0].poll() is None, _tail(server_log)
            try:
                urllib.request.urlopen(api + "/health", timeout=2)
                break
            except OSError:
                assert time.time() - started < 120, "prefect server did not start in 120 s\n" + _tail(server_log)
                time.sleep(0.5)
        server_s = time.time() - started

        # Registration in this process, pointed at the server only inside this block: a session's
        # prefect_test_harness (if any) gets its settings back afterwards.
        with temporary_settings(updates={PREFECT_API_URL: api}):
            assert main([*deploy_args, "--register-only"]) == 0
            assert "scheduled-pipeline/weekly-distill: cron '0 12 1 1 *' (UTC)" in capsys.readouterr().out
            with get_client(sync_client=True) as client:
                collect = client.read_deployment_by_name("scheduled-collect/nightly-collect")
                pipeline = client.read_deployment_by_name("scheduled-pipeline/weekly-distill")
            assert [s.schedule.cron for s in collect.schedules] == ["0 0 1 1 *"]
            assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in pipeline.schedules] == [
                ("0 12 1 1 *", "UTC", True)]
            expected = to_container(load_config(TINY, overrides))
            assert collect.parameters == pipeline.parameters == {"config": expected, "overrides": []}

            procs.append(_start([sys.executable, "-m", "flows.cli", *deploy_args],
                                _env(tmp_path, "prefect-serve", PREFECT_API_URL=api,
                                     PREFECT_RUNNER_POLL_FREQUENCY="2", PYTHONUNBUFFERED="1"), serve_log))
            run = run_deployment("scheduled-pipeline/weekly-distill", timeout=0,
                                 parameters={"overrides": ["train.max_steps=3"]})
            with get_client(sync_client=True) as client:
                while not (run := client.read_flow_run(run.id)).state.is_final():
                    assert procs[1].poll() is None, "serve process died\n" + _tail(serve_log)
                    assert time.time() - started < 420, f"run still {run.state.name}\n" + _tail(serve_log)
                    time.sleep(2)
        run_s = time.time() - started - server_s
    finally:
        for proc in reversed(procs):  # the serve process first: it pauses its schedules on the way out
            _stop(proc)

    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n" + _tail(serve_log)
    assert run.parameters == {"config": expected, "overrides": ["train.max_steps=3"]}
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3  # the run's override beat the deployment's train.max_steps=2
    assert (out / "student" / "config.json").is_file() and (out / "samples" / "manifest.json").is_file()
    print(f"prefect server up in {server_s:.0f} s; registration, serve and the pipeline run {run_s:.0f} s")
