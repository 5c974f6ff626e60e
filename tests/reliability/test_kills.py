"""SIGKILL the real `mmtp collect` and `mmtp train` processes at seeded points, then resume.

A kill "mid-write" or "mid-save" is made exact by freezing the process group with SIGSTOP,
checking on disk that the temp file (or the unmarked checkpoint) is still there, and only then
sending SIGKILL; when the write finished in between, the group is resumed and the hunt goes on.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.shards import load_manifest, stray_temp_files
from distill.train.engine import MARKER, complete_tags

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
TRAIN = ["train.max_steps=8", "train.checkpoint_every=1", "train.keep_checkpoints=2"]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    from prefect.settings import PREFECT_API_URL
    # The child inherits any process-group variables of an earlier in-process run; it must make its own.
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value() or ""}
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc


def _died(proc: subprocess.Popen) -> str:
    return f"the process ended (code {proc.returncode}) before the kill point:\n" + proc.log.read_text()[-3000:]


def _cli_args(command: str, cfg, *extra: str) -> list[str]:
    return [command, "--config", str(TINY), f"output_dir={cfg.output_dir}", f"cache_dir={cfg.cache_dir}",
            f"tracking.uri={cfg.tracking.uri}", *extra]


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    assert state != "Z", "the process exited before the kill point"
    return state == "T"


def _wait(proc: subprocess.Popen, condition, timeout: float = 240, poll: float = 0.02) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, _died(proc)
        assert time.time() < deadline, "the kill point never came"
        time.sleep(poll)


def _kill(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, _died(proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 240) -> None:
    """SIGKILL the process group at a moment when `condition()` holds, checked while it is frozen."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, _died(proc)
        if condition():
            os.killpg(proc.pid, signal.SIGSTOP)
            while not _stopped(proc.pid):  # a frozen process writes nothing more
                time.sleep(0.001)
            if condition():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return
            os.killpg(proc.pid, signal.SIGCONT)
    _kill(proc)
    pytest.fail("the kill point never came")


# ------------------------------------------------------------------ collection


def _folders(out: Path) -> list[Path]:
    return [out / "samples", *sorted((out / "targets").glob("*"))]


def _finished(out: Path) -> dict[Path, tuple[bytes, int]]:
    """Files a resumed run must reuse as they are: target shards with their sidecar, and samples
    shards once the samples manifest exists (before that a re-run rebuilds them all)."""
    files = [p for s in out.glob("targets/*/shard-*.json") for p in (s, s.with_suffix(".arrow"))]
    if (out / "samples" / "manifest.json").exists():
        files += list((out / "samples").glob("shard-*.arrow"))
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def _arrow_temp_files(out: Path) -> list[Path]:
    """Target shards being written (`data.shards.atomic_path` names them `.shard-NNNNN.arrow.tmp-PID`)."""
    return [Path(d.path) for folder in _folders(out)[1:] for d in os.scandir(folder)
            if d.name.startswith(".shard-") and ".arrow.tmp-" in d.name]


@pytest.mark.slow
@pytest.mark.parametrize("seed, mid_write, sigterm", [(0, False, False), (1, False, False), (2, True, False),
                                                     (3, False, True)])
def test_killed_collection_resumes_to_the_uninterrupted_shards(prefect_harness, tiny_collected, tiny_cfg,
                                                               seed, mid_write, sigterm):
    from flows.collect import run_collect
    rng = random.Random(seed)
    cfg = tiny_cfg()  # the same tiny config as `tiny_collected`, in this test's folder
    out = Path(cfg.output_dir)
    n_sidecars = rng.randint(1, 6) if mid_write else rng.randint(1, 7)  # of 9 target shards
    delay = 0.0 if mid_write else rng.uniform(0.0, 0.3)
    proc = _start(_cli_args("collect", cfg), out.parent / "collect.log")
    _wait(proc, lambda: len(list(out.glob("targets/*/shard-*.json"))) >= n_sidecars)
    if mid_write:
        _kill_when(proc, lambda: bool(_arrow_temp_files(out)))
        assert _arrow_temp_files(out), "the kill did not land while a shard was being written"
    elif sigterm:  # a polite stop: the process must be gone within 10 s, leaving no partial shard
        time.sleep(delay)
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert time.time() - sent <= 10, f"collection still ran {time.time() - sent:.1f} s after SIGTERM"
        assert not _arrow_temp_files(out)
    else:
        time.sleep(delay)
        _kill(proc)
    finished = _finished(out)
    assert finished or mid_write, "the kill came before any shard finished"

    summary = run_collect(cfg)

    for path, (data, mtime) in finished.items():  # nothing complete before the kill was rewritten
        assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime, path
    ref_out = Path(tiny_collected[0].output_dir)
    for folder in _folders(out):
        ref = ref_out / folder.relative_to(out)
        m, ref_m = load_manifest(folder), load_manifest(ref)
        on_disk = sorted(p.name for p in folder.glob("shard-*.arrow"))
        assert on_disk == sorted(s["file"] for s in m["shards"]) == sorted(p.name for p in ref.glob("shard-*.arrow"))
        assert not stray_temp_files(folder) and not list(folder.glob(".*"))
        for name in on_disk:
            assert (folder / name).read_bytes() == (ref / name).read_bytes(), folder / name
        assert m["shards"] == ref_m["shards"]  # sha256, rows and id range of every shard
        assert m["rows"] == ref_m["rows"]
    samples = load_manifest(summary["samples_dir"])
    ref_samples = load_manifest(ref_out / "samples")
    # no row lost beyond the counted skips: the same rows seen, skipped and kept as uninterrupted
    assert (samples["rows_seen"], samples["rows_skipped"], samples["rows"]) == \
        (ref_samples["rows_seen"], ref_samples["rows_skipped"], ref_samples["rows"]) == (144, {}, 144)
    assert not (out / ".mmtp.lock").exists()


# -------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def reference_losses(tiny_collected, tmp_path_factory):
    """loss/total per step of an uninterrupted in-process run of the same training config."""
    from distill.config import load_config
    from distill.train import DistillRecipe
    root = tmp_path_factory.mktemp("uninterrupted")
    src = Path(tiny_collected[0].output_dir)
    for name in ("samples", "targets"):
        (root / "run" / name).parent.mkdir(exist_ok=True)
        (root / "run" / name).symlink_to(src / name, target_is_directory=True)
    cfg = load_config(TINY, [f"output_dir={root / 'run'}", f"cache_dir={tiny_collected[0].cache_dir}",
                             f"tracking.uri=sqlite:///{root / 'mlflow.db'}", "train.progress=false", *TRAIN])
    recipe = DistillRecipe(cfg)
    recipe.setup()
    recipe.train()
    return {h["step"]: h["loss/total"] for h in recipe.history}


def _step(tag: str) -> int:
    return int(tag.removeprefix("step-"))


def _tags(ckpt: Path) -> tuple[list[str], list[str]]:
    """(complete tags, tags without a marker), oldest first."""
    done = complete_tags(ckpt)
    every = sorted(p.name for p in ckpt.glob("step-*")) if ckpt.is_dir() else []
    return done, [t for t in every if t not in done]


def _between_saves(ckpt: Path, after: int):
    def condition():
        done, partial = _tags(ckpt)
        return bool(done) and _step(done[-1]) >= after and not partial
    return condition


def _mid_save(ckpt: Path, after: int):
    def condition():  # the newest folder holds files but no marker yet (an older one may be mid-deletion)
        done, partial = _tags(ckpt)
        return (bool(done and partial) and _step(done[-1]) >= after and partial[-1] > done[-1]
                and any((ckpt / partial[-1]).glob("*.pt")))
    return condition


@pytest.mark.slow
@pytest.mark.parametrize("seed, during_save", [(5, False), (3, True)])
def test_killed_training_resumes_from_the_last_complete_checkpoint(train_cfg, reference_losses, monkeypatch,
                                                                   seed, during_save):
    import mlflow
    from mlflow.tracking import MlflowClient

    import distill.train.engine as engine
    from flows.train import run_train
    cfg = train_cfg(*TRAIN)
    out, ckpt = Path(cfg.output_dir), Path(cfg.output_dir) / "checkpoints"
    after = random.Random(seed).randint(1, 5)  # of 8 steps, each checkpointed
    proc = _start(_cli_args("train", cfg, "train.progress=false", *TRAIN), out.parent / "train.log")
    _kill_when(proc, (_mid_save if during_save else _between_saves)(ckpt, after))
    done, partial = _tags(ckpt)
    if during_save:
        assert partial and partial[-1] > done[-1], "the kill did not land during a checkpoint save"
        assert not (ckpt / partial[-1] / MARKER).exists() and any((ckpt / partial[-1]).glob("*.pt"))
    else:
        assert not partial, "the kill landed during a save"
    assert 0 < _step(done[-1]) < 8  # killed part-way
    assert not (out / "train_summary.json").exists()

    loaded, verify = [], engine.verify_checkpoint

    def spy(tag_dir):  # load_latest verifies exactly the tag it then loads
        loaded.append(Path(tag_dir).name)
        verify(tag_dir)
    monkeypatch.setattr(engine, "verify_checkpoint", spy)
    run_id = run_train(train_cfg(*TRAIN, "train.resume=true"))["mlflow_run_id"]

    assert loaded == [done[-1]]  # the last complete checkpoint, never the half-written one
    mlflow.set_tracking_uri(cfg.tracking.uri)
    history = MlflowClient().get_metric_history(run_id, "loss/total")
    resumed = {m.step: m.value for m in history}
    assert sorted(resumed) == list(range(1, 9))  # the resume continued the same MLflow run
    # The checkpoint was written by another process: equal to float32 rounding, not always to the last bit
    # (the in-process resume tests in tests/train are bit-exact).
    assert resumed == pytest.approx({s: reference_losses[s] for s in resumed}, rel=1e-6, abs=0)
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 8
    assert complete_tags(ckpt)[-1] == "step-00000008" and not _tags(ckpt)[1]
    assert not (out / ".mmtp.lock").exists()


@pytest.mark.slow
def test_sigterm_stops_training_within_10s_with_no_partial_checkpoint(train_cfg):
    import mlflow
    from mlflow.tracking import MlflowClient

    from distill.train import DistillRecipe
    args = ["train.max_steps=400", "train.checkpoint_every=100"]
    cfg = train_cfg(*args)
    out, ckpt = Path(cfg.output_dir), Path(cfg.output_dir) / "checkpoints"
    proc = _start(_cli_args("train", cfg, "train.progress=false", "train.log_every=1", *args), out.parent / "term.log")
    db = cfg.tracking.uri.removeprefix("sqlite:///")
    deadline = time.time() + 240
    while time.time() < deadline and not _logged_steps(db):  # training is in its loop
        assert proc.poll() is None, _died(proc)
        time.sleep(0.2)
    time.sleep(1.0)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=30)
    assert time.time() - sent <= 10, f"still running {time.time() - sent:.1f} s after SIGTERM"
    assert code == 143, proc.log.read_text()[-2000:]  # a stop, not a failure: 128 + SIGTERM, no traceback
    assert "stopped by a signal after step" in proc.log.read_text() and "Traceback" not in proc.log.read_text()
    done, partial = _tags(ckpt)
    assert done and not partial  # the stop checkpointed its last step; nothing half-written
    stopped_at = _step(done[-1])
    assert 0 < stopped_at < 400
    mlflow.set_tracking_uri(cfg.tracking.uri)
    client = MlflowClient()
    run_id = _train_run(client, cfg)
    assert client.get_run(run_id).info.status == "KILLED"

    recipe = DistillRecipe(train_cfg("train.max_steps=" + str(stopped_at + 2), "train.checkpoint_every=100",
                                     "train.resume=true"))
    recipe.setup()
    summary = recipe.train()
    assert [h["step"] for h in recipe.history] == [stopped_at + 1, stopped_at + 2]
    assert summary["mlflow_run_id"] == run_id and client.get_run(run_id).info.status == "FINISHED"


def _logged_steps(db: str) -> int:
    import sqlite3
    if not Path(db).exists():
        return 0
    try:
        with sqlite3.connect(db) as c:
            return c.execute("select count(*) from metrics where key = 'loss/total'").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def _train_run(client, cfg) -> str:
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                              "tags.`mmtp.stage` = 'train'")
    assert len(runs) == 1
    return runs[0].info.run_id
