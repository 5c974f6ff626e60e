"""Fault injection on real files: a full disk, a concurrent run, a stale lock."""

import errno
import subprocess
import sys

import pyarrow as pa
import pytest

import data.shards as shards
from data.shards import ShardError, run_lock, write_shard


class _FullDisk:
    """A file that accepts `room` bytes, then fails like a full disk."""

    def __init__(self, path, mode, room=64):
        self.f, self.room = open(path, mode), room

    def write(self, data):
        if self.room < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_surfaces_the_os_error_and_leaves_no_partial_file(tmp_path, monkeypatch):
    monkeypatch.setattr(shards.pa, "OSFile", _FullDisk)
    table = pa.table({"id": [f"x{i}" for i in range(500)], "v": list(range(500))})
    with pytest.raises(OSError) as info:
        write_shard(tmp_path / "shard-00000.arrow", table)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # neither the shard nor its temp file


def test_second_run_on_the_same_output_dir_refuses_with_the_pid(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / ".mmtp.lock").write_text(str(holder.pid))
        with pytest.raises(ShardError, match=f"in use by another run \\(PID {holder.pid}"):
            with run_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    # the owner is gone now: its stale lock is taken over and released afterwards
    with run_lock(tmp_path) as lock:
        assert lock.read_text() != str(holder.pid)
    assert not (tmp_path / ".mmtp.lock").exists()
