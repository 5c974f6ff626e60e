"""Session-wide test set-up: offline env, one Prefect test harness, the tiny config."""

import os
import tempfile
from pathlib import Path

# Before anything imports prefect, mlflow or transformers: the tests' own settings, then the project's
# defaults (distill/env.py) for the rest.
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="mmtp-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_SESSION_TMP / "prefect"))
os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "false"  # tests that read run logs back turn it on
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("MLFLOW_TRACKING_URI", None)

from distill.env import apply_env_defaults  # noqa: E402

apply_env_defaults()

import prefect.main  # noqa: E402, F401  (sets up its console log handlers on the real stderr, not a test's captured one)
import pytest  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY = PROJECT_ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (starting one costs 10-20 s)."""
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Tiny random teachers are materialised here once per session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny_cfg(tmp_path, cache_dir):
    """A factory: the tiny config rooted in this test's tmp_path, plus overrides."""
    from distill.config import load_config

    def make(*overrides, root: Path = tmp_path):
        return load_config(TINY, [f"output_dir={root / 'out'}", f"cache_dir={cache_dir}",
                                  f"tracking.uri=sqlite:///{root / 'mlflow.db'}", *overrides])
    return make


@pytest.fixture(scope="session")
def tiny_collected(prefect_harness, tmp_path_factory, cache_dir):
    """The tiny config's samples and target shards, collected once per session by the real flow."""
    from distill.config import load_config
    from flows.collect import run_collect
    root = tmp_path_factory.mktemp("collected")
    cfg = load_config(TINY, [f"output_dir={root / 'out'}", f"cache_dir={cache_dir}",
                             f"tracking.uri=sqlite:///{root / 'mlflow.db'}"])
    return cfg, run_collect(cfg)


def linked_config(tiny_collected, root: Path, *overrides, configs=(TINY,)):
    """A training config whose output_dir (under `root`) links the session's tiny shards."""
    from distill.config import load_config
    src = Path(tiny_collected[0].output_dir)
    out = root / "run"
    out.mkdir(exist_ok=True)
    for name in ("samples", "targets"):
        if not (out / name).exists():
            (out / name).symlink_to(src / name, target_is_directory=True)
    return load_config(list(configs), [f"output_dir={out}", f"cache_dir={tiny_collected[0].cache_dir}",
                                       f"tracking.uri=sqlite:///{root / 'mlflow.db'}", "train.progress=false",
                                       *overrides])


@pytest.fixture
def train_cfg(tiny_collected, tmp_path):
    """A factory: a training config whose output_dir links the session's tiny shards."""
    return lambda *overrides: linked_config(tiny_collected, tmp_path, *overrides)
