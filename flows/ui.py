"""`mmtp ui`: the MLflow web UI on 127.0.0.1 over this project's tracking store, stopped with its command.

The server (`mlflow ui`, uvicorn with worker processes) runs in its own process group; when `mmtp ui` ends,
by SIGTERM, Ctrl-C or otherwise, the whole group gets SIGTERM, then SIGKILL after a grace period, so no
worker outlives it holding the port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

GRACE_S = 10.0


def ui_command(cfg, port: int) -> list[str]:
    from distill.tracking import tracking_uri
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(cfg),
            "--host", "127.0.0.1", "--port", str(port)]


def run_ui(cfg, port: int) -> int:
    """Serve the MLflow UI until it exits or a signal comes; the server's exit code, or 128 + signum."""
    got, child = [], None

    def on_signal(signum, frame):
        got.append(signum)
        raise KeyboardInterrupt  # leaves child.wait() at once

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"MLflow UI on http://127.0.0.1:{port}  (Ctrl-C stops it)", flush=True)
        child = subprocess.Popen(ui_command(cfg, port), start_new_session=True)
        code = child.wait()
    except KeyboardInterrupt:
        code = 128 + (got[0] if got else signal.SIGINT)
    finally:
        for sig in previous:  # a second signal must not cut the server's stop short
            signal.signal(sig, signal.SIG_IGN)
        if child is not None:
            stop_group(child)
        for sig, old in previous.items():
            signal.signal(sig, old)
    return code


def stop_group(child: subprocess.Popen, grace: float = GRACE_S) -> None:
    """SIGTERM the child's process group; SIGKILL what is left of it after `grace` seconds."""
    _killpg(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _group_alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    _killpg(child.pid, signal.SIGKILL)
    child.wait()


def _group_alive(child: subprocess.Popen) -> bool:
    child.poll()  # reap the leader, else its zombie keeps the group
    try:
        os.killpg(child.pid, 0)
        return True
    except ProcessLookupError:
        return False


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
