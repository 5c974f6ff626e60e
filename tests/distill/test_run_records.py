"""What the MLflow UI shows of a run, read back from a real sqlite store: every setting under its own param key
(none lost to a collision, none hidden as a false secret), names, the experiment kind, start times, the Prefect
link, the way to open the store, and KILLED runs on a stop."""

import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from distill import tracking
from distill.config import flatten, load_config, to_container
from distill.env import PROJECT_ROOT

CONFIGS = sorted((PROJECT_ROOT / "configs").glob("*.yaml"))


def _leaves(obj) -> int:
    if isinstance(obj, dict) and obj:
        return sum(_leaves(v) for v in obj.values())
    if isinstance(obj, list) and obj:
        return sum(_leaves(v) for v in obj)
    return 1


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_flattens_without_a_collision(path):
    container = to_container(load_config([path]))
    flat = flatten(container)
    assert len(flat) == _leaves(container)  # each setting its own key: nothing overwritten
    assert not [k for k in flat if ".None." in k or k.endswith(".None")]


def test_two_unnamed_sources_keep_their_own_params_and_teachers_are_keyed_by_name():
    flat = flatten(to_container(load_config([PROJECT_ROOT / "configs" / "tiny.yaml"])))
    assert flat["data.sources.0.kind"] != flat["data.sources.1.kind"]
    assert "teachers.language.max_tokens" in flat and "teachers.vision.vit.image_size" in flat
    assert flatten([{"name": "a", "x": 1}, {"name": "a", "x": 2}]) == {"0.name": "a", "0.x": 1, "1.name": "a", "1.x": 2}


def test_secrets_are_redacted_by_an_explicit_list_and_token_counts_stay_visible():
    params = {"teachers.language.max_tokens": 64, "loss.drafter_prompt_tokens": 3, "evaluate.mtp_new_tokens": 24,
              "onpolicy.max_new_tokens": 24, "hub.token": "t", "x.api_key": "k", "x.access_token": "a",
              "db.password": "p", "s3.secret_key": "s", "gcp.credentials": "c", "x.hf_token": "h"}
    out = tracking.redact(params)
    assert [k for k, v in out.items() if v == tracking.REDACTED] == ["hub.token", "x.api_key", "x.access_token",
                                                                      "db.password", "s3.secret_key",
                                                                      "gcp.credentials", "x.hf_token"]


@pytest.fixture
def cfg(tmp_path):
    def make(*overrides):
        return load_config([PROJECT_ROOT / "configs" / "tiny.yaml"],
                           [f"output_dir={tmp_path / 'default'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
                            *overrides])
    return make


def test_runs_are_named_from_the_config_and_params_show_what_differs(cfg, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    a, b = cfg("teachers.language.max_tokens=32"), cfg("teachers.language.max_tokens=48", "tracking.run_name=mine")
    ids = []
    for c in (a, b):
        with tracking.stage_run(c, "pipeline", flow_run_id="f-1") as parent:
            with tracking.stage_run(c, "collect", parent.info.run_id) as child:
                ids.append((parent.info.run_id, child.info.run_id))
    client = MlflowClient(a.tracking.uri)
    (pa, ca), (pb, _) = ids
    run_a, run_b = client.get_run(pa), client.get_run(pb)
    assert run_a.info.run_name.startswith("default-kd-") and len(run_a.info.run_name) == len("default-kd-") + 4
    assert run_b.info.run_name == "mine" and client.get_run(ca).info.run_name == "collect"
    differ = {k for k in run_a.data.params if run_a.data.params[k] != run_b.data.params.get(k)}
    assert differ == {"teachers.language.max_tokens", "tracking.run_name"}
    assert run_a.data.params["teachers.language.max_tokens"] == "32"
    assert "prefect.flow_run_url" not in run_a.data.tags  # no Prefect server known: nothing to link to
    exp = client.get_experiment(run_a.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_older_experiment_gets_its_kind_and_a_standalone_ce_stage_is_named_so(cfg, tmp_path):
    c = cfg("loss.ce_weight=1")
    mlflow.set_tracking_uri(c.tracking.uri)
    mlflow.create_experiment(c.tracking.experiment)  # as made before the kind tag
    with tracking.stage_run(c, "train") as run:
        pass
    client = MlflowClient(c.tracking.uri)
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    name = client.get_run(run.info.run_id).info.run_name
    assert name.startswith("default-ce-") and name.endswith("-train")


def test_a_run_opened_after_its_work_is_back_dated_and_links_to_the_prefect_run(cfg, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    c = cfg()
    started = time.time() - 120
    with tracking.stage_run(c, "collect", flow_run_id="abc", started=started) as run:
        mlflow.log_metric("collect/rows", 3)
    got = MlflowClient(c.tracking.uri).get_run(run.info.run_id)
    assert abs(got.info.start_time / 1000 - started) < 1 and got.info.end_time / 1000 - started >= 119
    assert got.data.params["teachers.language.top_k"] == "16" and got.info.status == "FINISHED"
    url = "http://127.0.0.1:4200/runs/flow-run/abc"
    assert got.data.tags["prefect.flow_run_url"] == url and url in got.data.tags["mlflow.note.content"]


def test_a_stop_ends_the_runs_killed_and_only_them(cfg):
    from data.stop import Stopped
    c = cfg()
    tracking.setup(c)
    with mlflow.start_run(run_name="outer") as outer:
        with pytest.raises(Stopped):
            with tracking.stage_run(c, "pipeline") as parent:
                with tracking.stage_run(c, "train", parent.info.run_id) as child:
                    raise Stopped()
        assert mlflow.active_run().info.run_id == outer.info.run_id  # not ended by someone else's stop
    client = MlflowClient(c.tracking.uri)
    assert client.get_run(parent.info.run_id).info.status == client.get_run(child.info.run_id).info.status == "KILLED"
    assert client.get_run(outer.info.run_id).info.status == "FINISHED"


def test_the_ui_hint_names_the_command_that_serves_this_store(cfg, tmp_path):
    c = cfg()
    with tracking.stage_run(c, "evaluate") as run:
        pass
    hint = tracking.ui_hint(c, run.info.run_id)
    assert f"mmtp ui tracking.uri=sqlite:///{tmp_path / 'm.db'} --port 5000" in hint
    assert hint.startswith(f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}")
    server = cfg("tracking.uri=http://127.0.0.1:5999")
    assert tracking.ui_command(server) is None
    assert Path(c.tracking.uri.removeprefix("sqlite:///")).is_file()
