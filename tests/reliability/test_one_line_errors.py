"""Faults that end in one line: bad config files and values (exit 2 before any work), a vocabulary mismatch
(exit 2), OS errors of the run's files (exit 1, naming the file and the fix), and paths resolved at load."""

import errno
import os
import re
from pathlib import Path

import pytest

from distill.config import ConfigError, load_config
from flows.cli import exit_code, main, one_line

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
XTOKEN = TINY.with_name("tiny_xtoken.yaml")


def _one_error_line(capfd) -> str:
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mmtp: error: "), err
    return last


def _no_work(monkeypatch):
    import flows.collect
    import flows.pipeline
    for module, name in ((flows.collect, "run_collect"), (flows.pipeline, "run_pipeline")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("work started"))


@pytest.mark.parametrize("text, expected", [
    ("output_dir: x\ntrain:\n  lr: [1, 2\n", r"bad\.yaml:4:1: YAML syntax error: .*line 3, column 7"),
    ("train: {lr: 1\n", r"bad\.yaml:2:1: YAML syntax error"),
    ("- a\n- b\n", r"bad\.yaml: a config file must be a mapping of keys \(key: value\), not a list"),
], ids=["unclosed-list", "unclosed-mapping", "a-list"])
def test_bad_config_files_exit_2_in_one_line(text, expected, tmp_path, capfd, monkeypatch):
    _no_work(monkeypatch)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main(["pipeline", "--config", str(bad)]) == 2
    assert re.search(expected, _one_error_line(capfd))


def test_a_folder_given_as_the_config_file_is_named_as_a_folder(tmp_path, capfd, monkeypatch):
    _no_work(monkeypatch)
    assert main(["collect", "--config", str(tmp_path)]) == 2
    assert f"config file {tmp_path} is a folder" in _one_error_line(capfd)


RANGES = [("train.max_steps=-5", "train.max_steps': must be >= 1, got -5"),
          ("loss.temperature=0", "loss.temperature': must be > 0, got 0.0"),
          ("train.lr=-1", "train.lr': must be > 0, got -1.0"),
          ("train.lr=.nan", "train.lr': must be > 0, got nan"),
          ("loss.ce_weight=1.5", "loss.ce_weight': must be in [0, 1], got 1.5"),
          ("train.stages.0.steps=0", "train.stages.0.steps': must be >= 1, got 0"),
          ("data.sources.1.n=0", "data.sources.1.n': must be >= 1, got 0"),
          ("teachers.language.top_k=0", "teachers.language.top_k': must be >= 1, got 0"),
          ("teachers.vision.0.image_size=-1", "teachers.vision.0.image_size': must be >= 1, got -1"),
          ("teachers.language.adapt={folds: 1}", "teachers.language.adapt.folds': must be >= 2, got 1")]


@pytest.mark.parametrize("override, message", RANGES, ids=[r[0].split("=")[0] for r in RANGES])
def test_values_out_of_their_range_exit_2_before_any_work(override, message, capfd, monkeypatch, tmp_path):
    _no_work(monkeypatch)
    stages = "train.stages=[{name: joint, steps: 3}]"
    assert main(["pipeline", "--config", str(TINY), f"output_dir={tmp_path}", stages, override]) == 2
    assert _one_error_line(capfd) == f"mmtp: error: config key '{message}"


def test_the_defaults_are_in_range_and_an_edge_value_passes():
    load_config([TINY], ["loss.ce_weight=1", "loss.label_smoothing=0", "train.zero_stage=0"])
    with pytest.raises(ConfigError, match="must be in \\[0, 1\\), got 1.0"):
        load_config([TINY], ["loss.label_smoothing=1"])


@pytest.mark.parametrize("command", ["pipeline", "train", "onpolicy", "adapt"])
def test_an_overlay_alone_has_no_language_teacher_and_is_refused_at_load(command, capfd, monkeypatch):
    _no_work(monkeypatch)
    assert main([command, "--config", str(XTOKEN)]) == 2
    line = _one_error_line(capfd)
    assert f"`mmtp {command}` needs a language teacher" in line and "--config configs/tiny.yaml" in line
    assert main([command, "--config", str(XTOKEN), "--print-config"]) == 0  # printing it is still fine


def test_vocab_mismatch_exits_2_in_one_line_without_a_prefect_traceback(prefect_harness, tmp_path, cache_dir, capfd):
    argv = ["collect", "--config", str(TINY), f"output_dir={tmp_path / 'out'}", f"cache_dir={cache_dir}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "student.vocab_size=123"]
    assert main(argv) == 2
    line = _one_error_line(capfd)
    assert "student.vocab_size=123" in line


def test_a_full_disk_ends_in_one_line_naming_the_file_and_leaves_no_partial_file(prefect_harness, tmp_path,
                                                                                   cache_dir, capfd, monkeypatch):
    """A real collect whose first shard write finds the disk full (pyarrow's error has no errno nor file)."""
    import data.shards

    def full(fd):
        raise OSError("IOError: No space left on device")
    monkeypatch.setattr(data.shards.os, "fsync", full)
    out = tmp_path / "out"
    argv = ["collect", "--config", str(TINY), f"output_dir={out}", f"cache_dir={cache_dir}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(argv) == 1
    line = _one_error_line(capfd)
    assert f"{out}/samples/shard-00000.arrow: No space left on device; free space on that disk" in line
    assert not [p for p in out.rglob("*") if p.is_file() and ".tmp-" in p.name]
    assert not list(out.rglob("*.arrow"))


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_os_errors_of_the_run_files_end_in_one_line_with_the_fix(code, tmp_path, capfd, monkeypatch):
    import flows.collect

    def fail(cfg, *a, **k):
        raise OSError(code, os.strerror(code), str(Path(cfg.output_dir) / "samples"))
    monkeypatch.setattr(flows.collect, "run_collect", fail)
    assert main(["collect", "--config", str(TINY), f"output_dir={tmp_path}"]) == 1
    line = _one_error_line(capfd)
    assert line.startswith(f"mmtp: error: {tmp_path}/samples: {os.strerror(code)}; ")
    assert ("output_dir" in line) and ("re-run" in line or "writable" in line or "read-only" in line)


def test_exit_codes_sort_errors_and_keep_tracebacks_for_bugs():
    from teachers.collect import VocabMismatchError
    assert exit_code(ConfigError("x")) == 2 and exit_code(VocabMismatchError("x")) == 2
    assert exit_code(OSError(errno.ENOSPC, "No space left on device")) == 1
    assert exit_code(OSError(errno.ECONNREFUSED, "refused")) is None and exit_code(KeyError("bug")) is None
    assert one_line(OSError(errno.ENOSPC, "No space left on device")).startswith("a file: No space")


def test_relative_paths_are_resolved_at_load_against_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config([TINY], ["output_dir=out", "shards_dir=./shards", "train.init_from=student",
                               "evaluate.student=run/student", "evaluate.baseline=" + "0123abcd" * 4,
                               "tracking.uri=sqlite:///m.db", "teachers.language.source=org/model"])
    assert cfg.output_dir == str(tmp_path / "out") and cfg.shards_dir == str(tmp_path / "shards")
    assert cfg.train.init_from == str(tmp_path / "student") and cfg.evaluate.student == str(tmp_path / "run/student")
    assert cfg.evaluate.baseline == "0123abcd" * 4  # an MLflow run id stays one
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/m.db" and cfg.teachers.language.source == "org/model"


@pytest.mark.slow
def test_pipeline_from_another_folder_with_a_relative_output_dir(tiny_collected, tmp_path, monkeypatch, capfd):
    """The whole pipeline, run from a folder that is not the project, with `output_dir=./run`: every stage and the
    MTP-timing child process use that folder, and nothing is written in the project."""
    collected, _ = tiny_collected
    monkeypatch.chdir(tmp_path)
    argv = ["pipeline", "--config", str(TINY), "output_dir=./run", f"shards_dir={collected.output_dir}",
            f"cache_dir={collected.cache_dir}", "tracking.uri=sqlite:///mlflow.db", "train.max_steps=4",
            "train.progress=false", "evaluate.probe=false", "evaluate.mtp_prompts=2"]
    assert main(argv) == 0, capfd.readouterr().err[-3000:]
    run = tmp_path / "run"
    assert (run / "student" / "config.json").is_file() and (tmp_path / "mlflow.db").is_file()
    assert "perplexity" in (run / "eval" / "eval_report.md").read_text()
    assert not (TINY.parents[1] / "run").exists()
