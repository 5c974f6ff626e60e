"""The output-folder lock under contention, re-entry, refusal and takeover; the modes of the files we write."""

import fcntl
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from safetensors.numpy import save_file

from data.shards import LOCK_FILE, ShardError, atomic_path, run_lock, write_shard

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

# Takes the lock in a loop for argv[2] seconds; while holding it, creates a marker that only one holder may create
# at a time. Prints {"held": n, "overlaps": n}. (With 4 of these, the O_EXCL lock this replaced overlapped ~5400
# times in 10 s; this one without its inode check, ~760.)
_CONTENDER = """
import json, os, random, sys, time
from data.shards import ShardError, run_lock
folder = sys.argv[1]
marker = os.path.join(folder, "holder")
end = time.time() + float(sys.argv[2])
held = overlaps = 0
while time.time() < end:
    try:
        with run_lock(folder):
            held += 1
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                overlaps += 1
                continue
            time.sleep(random.uniform(0, 0.002))
            os.unlink(marker)
    except ShardError:
        pass
print(json.dumps({"held": held, "overlaps": overlaps}))
"""


def test_four_processes_never_hold_the_lock_together(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _CONTENDER, str(tmp_path), "10"], stdout=subprocess.PIPE,
                              text=True, env=ENV, cwd=ROOT) for _ in range(4)]
    results = [json.loads(p.stdout.read()) for p in procs]
    assert all(p.wait() == 0 for p in procs)
    print("acquisitions in 10 s:", sum(r["held"] for r in results), [r["held"] for r in results])
    assert sum(r["overlaps"] for r in results) == 0
    assert all(r["held"] >= 5 for r in results), results


def _held_elsewhere(lock: Path) -> bool:
    """Whether some open file, this process's included, holds the flock on `lock`."""
    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_lock_is_reentrant_within_a_process_and_its_threads(tmp_path):
    refused = []

    def stage():
        try:
            with run_lock(tmp_path):
                pass
        except ShardError as e:
            refused.append(e)

    with run_lock(tmp_path) as outer:
        with run_lock(tmp_path) as inner:
            assert inner == outer
        thread = threading.Thread(target=stage)
        thread.start()
        thread.join()
        assert not refused
        assert _held_elsewhere(outer) and outer.read_text() == str(os.getpid())  # still held by the outer one
    assert not outer.exists()


def test_second_process_is_refused_with_the_pid_then_takes_over_when_it_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom data.shards import run_lock\n"
                               "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ShardError, match=f"is in use by another run \\(PID {holder.pid}, lock file "):
            with run_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / LOCK_FILE).read_text() == str(holder.pid)  # killed: its lock file is left behind
    with run_lock(tmp_path) as lock:
        assert lock.read_text() == str(os.getpid())


def test_a_leftover_lock_file_naming_a_dead_pid_is_taken_over(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / LOCK_FILE).write_text(str(gone.pid))
    with run_lock(tmp_path) as lock:
        assert lock.read_text() == str(os.getpid())


def test_lock_file_feature_stats_and_shards_are_0644(tmp_path):
    with run_lock(tmp_path) as lock:
        assert lock.stat().st_mode & 0o777 == 0o644
    stats = tmp_path / "feature_stats.safetensors"
    with atomic_path(stats) as tmp:  # as teachers/collect.py writes it
        save_file({"features_mean": np.zeros(3, np.float32)}, str(tmp))
    write_shard(tmp_path / "shard-00000.arrow", pa.table({"id": ["a"]}))
    assert stats.stat().st_mode & 0o777 == (tmp_path / "shard-00000.arrow").stat().st_mode & 0o777 == 0o644
