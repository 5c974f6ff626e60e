"""Config loading and the CLI's one-line errors (exit code 2)."""

import pytest

from distill.config import ConfigError, flatten, load_config, to_container
from distill.env import PROJECT_ROOT
from flows.cli import main

TINY = "configs/tiny.yaml"


def test_tiny_and_default_configs_load_with_overrides():
    cfg = load_config(TINY, ["train.zero_stage=3", "student.mtp_depth=3", "collect.runner=dask"])
    assert cfg.train.zero_stage == 3 and cfg.student.mtp_depth == 3 and cfg.collect.runner.value == "dask"
    default = load_config("configs/default.yaml")
    assert default.teachers.language.gguf_file and default.output_dir and default.tracking.uri is None
    flat = flatten(to_container(default))
    assert flat["teachers.vision.effnet.image_size"] == 112 and "tracking.uri" in flat


@pytest.mark.parametrize("override, key", [
    (["train.zero_stag=2"], "train.zero_stag"),
    (["train.zero_stage=two"], "train.zero_stage"),
    (["collect.runner=spark"], "collect.runner"),
    (["data.shard_rows=[1]"], "data.shard_rows"),
    (["onpolicy.kd_weight=-0.5"], "onpolicy.kd_weight"),
    (["loss.generated_kd_weight=-1"], "loss.generated_kd_weight"),
])
def test_bad_keys_and_types_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TINY, override)


def test_cli_config_errors_are_one_line_and_exit_2(capsys, tmp_path):
    for argv in (["collect", "--config", TINY, "train.nope=1"],
                 ["collect", "--config", str(tmp_path / "missing.yaml")],
                 ["collect", "--config", TINY, "teachers.language.source=/no/such/teacher"],
                 ["collect", "--config", TINY, "train.zero_stage=7"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mmtp: error:") and "\n" not in err and "Traceback" not in err


def test_secret_looking_values_are_redacted():
    from distill.tracking import redact, redact_tree
    params = {"tracking.uri": "sqlite:///x.db", "sources.0.api_key": "abc", "hub.token": "t0k",
              "teachers.language.top_k": 64, "db.password": "pw"}
    out = redact(params)
    assert out["sources.0.api_key"] == out["hub.token"] == out["db.password"] == "***"
    assert out["teachers.language.top_k"] == 64 and out["tracking.uri"] == "sqlite:///x.db"
    assert redact_tree({"a": {"token": "x", "top_k": 3}}) == {"a": {"token": "***", "top_k": 3}}


def test_config_reference_is_generated_from_the_schema_and_current():
    from distill.config import render
    text = render()
    assert "| `train.zero_stage` | int | `2` | `[0, 3]` | DeepSpeed ZeRO stage 0-3 |" in text
    assert "| `trust_remote_code` | bool | `False` |  |" in text and "## data.sources.N" in text
    assert "| `top_k` | int | `64` | `>= 1` |" in text
    assert (PROJECT_ROOT / "docs" / "config.md").read_text() == text, "run `make docs` to regenerate docs/config.md"


# Every choice field: (override, key, allowed values the one-line error must list).
CHOICES = [
    ("loss.kd_kind=forward_kll", "loss.kd_kind", ["forward_kl", "reverse_kl", "jsd"]),
    ("loss.standardize=pca", "loss.standardize", ["phis", "zscore"]),
    ("loss.balance=equal", "loss.balance", ["static", "ema", "uncertainty", "gradnorm"]),
    ("collect.compression=gzip", "collect.compression", ["zstd", "lz4", "none"]),
    ("collect.runner=spark", "collect.runner", ["local", "dask"]),
    ("train.precision=fp8", "train.precision", ["auto", "fp32", "bf16"]),
    ("teachers.language.dtype=fp16", "teachers.language.dtype", ["float32", "bfloat16", "float16"]),
    ("teachers.vision.1.kind=hf_visoin", "teachers.vision.1.kind", ["hf_causal_lm", "hf_vision", "efficientnet_lite0",
                                                                  "package.module:Class"]),
    ("teachers.vision.0.kind=no_such_module_xyz:Teacher", "teachers.vision.0.kind", ["no_such_module_xyz"]),
    ("teachers.language.device=tpu", "teachers.language.device", ["auto", "cpu", "cuda", "cuda:N"]),
    ("evaluate.device=gpu", "evaluate.device", ["auto", "cpu", "cuda", "cuda:N"]),
    ("data.sources.0.kind=mnist", "data.sources.0.kind", ["digits", "scenes", "fashion_mnist", "hf_disk"]),
    ("student.preset=huge", "student.preset", ["base", "small", "tiny"]),
    ("data.sources.0.resample=bicubic", "data.sources.0.resample", ["nearest", "bilinear"]),
]


@pytest.mark.parametrize("override, key, allowed", CHOICES, ids=[c[1] for c in CHOICES])
def test_a_bad_choice_exits_2_at_once_naming_the_key_and_the_allowed_values(override, key, allowed, capsys,
                                                                             monkeypatch, tmp_path):
    import flows.collect
    monkeypatch.setattr(flows.collect, "run_collect", lambda *a, **k: pytest.fail("collection started"))
    # "at once": before any collection (above) and, in a fresh process, before importing torch (below)
    assert main(["collect", "--config", TINY, f"output_dir={tmp_path / 'out'}", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mmtp: error: config key '{key}'") and "\n" not in err, err
    assert all(value in err for value in allowed), err
    assert not (tmp_path / "out").exists()


def test_the_cli_reports_a_typo_without_importing_torch():
    import subprocess
    import sys
    code = ("import sys; from flows.cli import main; rc = main(['collect', '--config', 'configs/tiny.yaml', "
            "'loss.kd_kind=forward_kll']); assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == ("mmtp: error: config key 'loss.kd_kind': Invalid value 'forward_kll', "
                                   "expected one of [forward_kl, reverse_kl, jsd]")


def test_config_enums_are_the_registries():
    import torch

    from data.images import RESAMPLE
    from data.sources import SOURCES
    from data.standardize import MODES
    from distill.config import schema
    from distill.losses import BALANCERS
    from distill.losses.language import DIVERGENCES, _divergence
    from teachers.registry import DTYPES, TeacherConfig
    assert [e.value for e in schema.KDKind] == list(DIVERGENCES)
    assert [e.value for e in schema.Resample] == list(RESAMPLE)
    x = torch.zeros(1, 3)
    expected = r"unknown KD kind 'kl'; expected one of \('forward_kl', 'reverse_kl', 'jsd'\)"
    with pytest.raises(ValueError, match=expected):
        _divergence(x, x, x.bool(), "kl")  # no silent fallback to any kind
    assert [e.value for e in schema.Balance] == list(BALANCERS)
    assert {e.value for e in schema.Standardize} == set(MODES)
    assert [e.value for e in schema.SourceKind] == list(SOURCES)
    assert TeacherConfig.__dataclass_fields__["dtype"].default.value == DTYPES[0]


def test_print_config_prints_the_resolved_yaml_and_runs_nothing(capsys, monkeypatch, tmp_path):
    import yaml

    import flows.collect
    monkeypatch.setattr(flows.collect, "run_collect", lambda *a, **k: pytest.fail("collection started"))
    assert main(["collect", "--config", TINY, "--print-config", f"output_dir={tmp_path / 'out'}",
                 "train.lr=0.25", "teachers.vision.0.image_size=56"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_container(load_config(TINY, [f"output_dir={tmp_path / 'out'}", "train.lr=0.25",
                                                      "teachers.vision.0.image_size=56"]))
    assert printed["train"]["lr"] == 0.25 and printed["loss"]["kd_kind"] == "forward_kl"
    assert printed["teachers"]["vision"][0]["image_size"] == 56 and printed["collect"]["compression"] == "zstd"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["--help"], ["collect", "--help"], ["train", "--help"]])
def test_help_lists_the_top_level_config_keys(argv, capsys):
    from distill.config import Config, top_level_keys
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    out = capsys.readouterr().out
    keys = dict(top_level_keys())
    assert list(keys) == list(Config.__dataclass_fields__)
    assert keys["output_dir"] == "root of every output of a run" and keys["loss"].startswith("The dual-teacher")
    for key, meaning in keys.items():
        assert meaning and any(line.split() == [key, *meaning.split()] for line in out.splitlines()), key
    if argv != ["--help"]:
        assert "--print-config" in out


def test_from_dict_runs_the_same_checks_as_load_config():
    """Flows rebuild configs with from_dict: a dict that load_config would refuse is refused there too."""
    from distill.config import from_dict, to_container
    bad = to_container(load_config("configs/tiny.yaml"))
    bad["loss"]["chunk_size"] = -1
    with pytest.raises(ConfigError, match="loss.chunk_size"):
        from_dict(bad)
