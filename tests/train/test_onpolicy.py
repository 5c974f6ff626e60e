"""On-policy rounds (flows/onpolicy.py) on the tiny run: two rounds end to end, the mix of shards, and a loop
killed mid-round that resumes without recomputing finished shards."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from data.shards import load_manifest, read_shard
from tests.conftest import linked_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = (ROOT / "configs" / "tiny.yaml", ROOT / "configs" / "tiny_onpolicy.yaml")


def _trained(tiny_collected, root: Path, *overrides):
    from flows.train import run_train
    cfg = linked_config(tiny_collected, root, "train.max_steps=6", *overrides, configs=CONFIGS)
    run_train(cfg)
    return cfg


@pytest.mark.slow
def test_two_rounds_generate_score_train_and_track(tiny_collected, tmp_path):
    from flows.onpolicy import run_onpolicy
    cfg = _trained(tiny_collected, tmp_path)
    summary = run_onpolicy(cfg)
    root = Path(cfg.output_dir) / "onpolicy"
    lang = cfg.teachers.language.name
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for r, result in enumerate(summary["rounds"], start=1):
        folder = root / f"round-{r}"
        samples = load_manifest(folder / "samples")
        targets = load_manifest(folder / "targets" / lang)
        # continuations are marked with their origin and round, and scored under the target-shard contract
        assert samples["origin"] == "onpolicy" and samples["round"] == r and targets["origin"] == "onpolicy"
        assert targets["samples_config_digest"] == samples["config_digest"]
        table = read_shard(folder / "samples" / samples["shards"][0]["file"])
        assert all(i.endswith(f"@r{r}") for i in table.column("id").to_pylist())
        assert set(table.column("source").to_pylist()) == {"onpolicy"}
        assert result["rows_scored"] == samples["rows"] > 0 and result["teacher_forwards"] > 0
        # round r starts from round r-1's student and ends with its own
        train_cfg = json.loads((folder / "train_summary.json").read_text())
        assert train_cfg["steps"] == cfg.onpolicy.steps
        assert (folder / "student" / "model.safetensors").is_file()
        m = result["metrics"]
        assert np.isfinite(m["eval/onpolicy_kl"]) and m["eval/onpolicy_kl"] >= 0 and m["eval/onpolicy_positions"] > 0
        assert "eval/kl/main" in m
    # the rounds train onpolicy.trainable (merger, decoder, MTP): the vision tower and its heads stay as they were
    from safetensors.torch import load_file

    from distill.train import part_of
    before = load_file(Path(cfg.output_dir) / "student" / "model.safetensors")
    after = load_file(root / "round-1" / "student" / "model.safetensors")
    changed = {part_of(k) for k in before if not before[k].equal(after[k])}
    assert "decoder" in changed and not changed & {"vision", "heads"}
    # round 2 generated with round 1's student: different texts from the same prompts' seeds differ anyway, so
    # check the recorded student digest instead
    spec1 = load_manifest(root / "round-1" / "samples")["config"]["student_sha256"]
    spec2 = load_manifest(root / "round-2" / "samples")["config"]["student_sha256"]
    assert spec1 != spec2
    # MLflow: one onpolicy parent, one child run per round, each round's training run under its round
    client = mlflow.MlflowClient(cfg.tracking.uri)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.tags["mmtp.stage"] == "onpolicy"
    rounds = [client.get_run(r["mlflow_run_id"]) for r in summary["rounds"]]
    assert [r.data.tags["mlflow.parentRunId"] for r in rounds] == [parent.info.run_id] * 2
    assert [r.info.run_name for r in rounds] == ["round-1", "round-2"]
    train = client.get_run(summary["rounds"][0]["train_run_id"])
    assert train.data.tags["mlflow.parentRunId"] == rounds[0].info.run_id
    curve = client.get_metric_history(parent.info.run_id, "eval/onpolicy_kl")
    assert sorted({p.step for p in curve}) == [0, 1, 2]


@pytest.mark.slow
def test_offline_only_rounds_need_no_teacher(tiny_collected, tmp_path):
    from flows.onpolicy import run_onpolicy
    cfg = _trained(tiny_collected, tmp_path, "onpolicy.mix=0", "onpolicy.rounds=1", "onpolicy.eval_prompts=0")
    summary = run_onpolicy(cfg)
    assert summary["rounds"][0]["teacher_forwards"] == 0 and summary["rounds"][0]["rows_scored"] == 0
    assert not (Path(cfg.output_dir) / "onpolicy" / "round-1" / "samples").exists()


def test_rounds_need_a_trained_student(tiny_collected, tmp_path):
    from flows.onpolicy import run_onpolicy
    cfg = linked_config(tiny_collected, tmp_path, configs=CONFIGS)
    with pytest.raises(FileNotFoundError, match="no trained student"):
        run_onpolicy(cfg)


@pytest.mark.slow
def test_killed_loop_resumes_without_recomputing_finished_shards(tiny_collected, tmp_path):
    from prefect.settings import PREFECT_API_URL
    cfg = _trained(tiny_collected, tmp_path, "onpolicy.steps=30", "train.checkpoint_every=2")
    root = Path(cfg.output_dir) / "onpolicy"
    args = [sys.executable, "-m", "flows.cli", "onpolicy", *[a for c in CONFIGS for a in ("--config", str(c))],
            f"output_dir={cfg.output_dir}", f"cache_dir={cfg.cache_dir}", f"tracking.uri={cfg.tracking.uri}",
            "onpolicy.steps=30", "train.checkpoint_every=2", "train.progress=false", "collect.progress=false"]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value() or ""}
    log = tmp_path / "first.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    targets = root / "round-1" / "targets" / cfg.teachers.language.name / "manifest.json"
    checkpoints = root / "round-1" / "checkpoints"
    deadline = time.time() + 300
    # kill in round 1's training: its continuations are scored and at least one checkpoint is written
    while not (targets.is_file() and checkpoints.is_dir() and any(checkpoints.glob("*/*"))):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "round 1 never reached training"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "round-1" / "round.json").exists()
    samples_manifest = (root / "round-1" / "samples" / "manifest.json").read_bytes()

    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first = json.loads((root / "round-1" / "round.json").read_text())
    assert (root / "round-1" / "samples" / "manifest.json").read_bytes() == samples_manifest  # not regenerated
    assert first["teacher_forwards"] == 0 and first["shards_reused"] >= 1  # scored shards reused
    assert json.loads((root / "round-2" / "round.json").read_text())["teacher_forwards"] > 0
    state = json.loads((root / "state.json").read_text())
    client = mlflow.MlflowClient(cfg.tracking.uri)
    # the resumed round continues its MLflow run: one round-1 run under the parent
    runs = client.search_runs([client.get_run(state["parent_run_id"]).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{state['parent_run_id']}'")
    assert sorted(r.info.run_name for r in runs) == ["round-1", "round-2"]


@pytest.mark.parametrize("override, key", [("train.mix_shards=[x]", "train.mix_shards"),
                                           ("onpolicy.mix=1.0", "onpolicy.mix"),
                                           ("onpolicy.temperature=0", "onpolicy.temperature"),
                                           ("onpolicy.kd_kind=kl", "onpolicy.kd_kind")])
def test_bad_onpolicy_keys_are_named(override, key):
    from distill.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(list(CONFIGS), [override])


def test_init_from_must_match_the_run(tiny_collected, tmp_path):
    from flows.train import run_train
    cfg = _trained(tiny_collected, tmp_path)
    (tmp_path / "other").mkdir()
    other = linked_config(tiny_collected, tmp_path / "other", "train.max_steps=2", "student.mtp_depth=1",
                          f"train.init_from={cfg.output_dir}/student", configs=CONFIGS)
    with pytest.raises(ValueError, match="mtp_depth=2"):
        run_train(other)


def test_a_round_keeps_the_runs_drafter_stage(tmp_path):
    from distill.config import load_config
    from distill.train import resolve_stages, round_config
    plain = round_config(load_config(list(CONFIGS)), tmp_path / "r1", tmp_path / "student", None)
    assert [(s.name, s.terms) for s in resolve_stages(plain, True)] == [("onpolicy", ("language",))]
    # onpolicy.kd_kind on the continuations; the offline rows take onpolicy.offline_kd_kind (null: the same)
    assert plain.loss.kd_kind == plain.loss.generated_kd_kind == plain.onpolicy.kd_kind
    split = load_config(list(CONFIGS), ["onpolicy.kd_kind=reverse_kl", "onpolicy.offline_kd_kind=forward_kl"])
    split = round_config(split, tmp_path / "r1", tmp_path / "student", None)
    assert (split.loss.kd_kind, split.loss.generated_kd_kind) == ("forward_kl", "reverse_kl")
    assert plain.loss.generated_kd_weight is None  # one KD mean, unless onpolicy.kd_weight says otherwise
    added = round_config(load_config(list(CONFIGS), ["onpolicy.kd_weight=0.5"]), tmp_path / "r1", tmp_path / "s", None)
    assert added.loss.generated_kd_weight == 0.5
    drafter = "{name: drafters, steps: 7, losses: [drafter], trainable: [mtp], micro_batch_size: 4}"
    cfg = load_config(list(CONFIGS), [f"train.stages=[{{name: joint, steps: 5}}, {drafter}]"])
    stages = resolve_stages(round_config(cfg, tmp_path / "r1", tmp_path / "student", tmp_path / "r1"), True)
    assert [(s.name, s.steps, s.terms, s.parts) for s in stages] == [
        ("onpolicy", cfg.onpolicy.steps, ("language",), tuple(p.value for p in cfg.onpolicy.trainable)),
        ("drafters", 7, ("drafter",), ("mtp",))]
