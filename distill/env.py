"""Environment defaults, the one place they are written: applied by the CLI (`mmtp`), the flows, the
tests' conftest, the bench scripts and each training rank, before Prefect, MLflow or torch is imported.

A value the user already set wins, so a user's PREFECT_API_URL or MLFLOW_TRACKING_URI is respected.
"""

import os
import signal
import sys
import threading
from pathlib import Path

from data.stop import request_stop, watch_signals

PROJECT_ROOT = Path(__file__).resolve().parents[1]

DEFAULTS = {
    "PREFECT_HOME": str(PROJECT_ROOT / ".cache" / "prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_API_HOST": "127.0.0.1",
    # The embedded server needs more than Prefect's 20 s default on a busy 2-core machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # The library packages' log records (a skipped row, a trust_remote_code teacher) also go to the Prefect
    # flow or task run they happen in, so they show in the Prefect UI; outside any run they only print.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "data,teachers,student,distill",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "mmtp-distill" / "torch_extensions"),
    "TOKENIZERS_PARALLELISM": "false",
    # MKL's strict conditional numerical reproducibility: results no longer depend on memory alignment,
    # so a teacher writes the same shard bytes in any process (a Dask worker, a re-run, a resumed run).
    "MKL_CBWR": "AUTO,STRICT",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def apply_env_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    # Prefect does not create its home, and its sqlite database cannot open in a missing folder.
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    exit_on_sigterm()


def exit_on_sigterm() -> None:
    """Make SIGTERM (`kill`, a scheduler's stop) exit like Ctrl-C does, through the process's exit handlers:
    Prefect stops the temporary server it started (else a uvicorn process outlives the run) and MLflow ends
    its run. Only where SIGTERM still has its default action, and only from the main thread (Python's rule).
    The stop is also requested process-wide (data/stop.py, even while Prefect's handler owns SIGTERM), so that
    a loop in a worker thread (a teacher's shard) ends at its next batch instead of holding the exit."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_signal)
        watch_signals()


def _exit_on_signal(signum, frame) -> None:
    request_stop(signum)
    sys.exit(128 + signum)
