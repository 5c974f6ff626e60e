"""Config loading and the CLI's one-line errors (exit code 2)."""

import pytest

from distill.config import PROJECT_ROOT, ConfigError, flatten, load_config, to_container
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
    from distill.configref import render
    text = render()
    assert "| `train.zero_stage` | int | `2` | DeepSpeed ZeRO stage 0-3 |" in text
    assert "| `trust_remote_code` | bool | `False` |" in text and "## data.sources.N" in text
    assert (PROJECT_ROOT / "docs" / "config.md").read_text() == text, "run `make docs` to regenerate docs/config.md"
