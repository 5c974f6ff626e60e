"""Fault injection on real files: a full disk, a concurrent run, a stale lock."""

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

import data.shards as shards
from data.shards import ShardError, run_lock, write_shard

ROOT = Path(__file__).resolve().parents[2]


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


def _listen_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on `port`, read from the kernel's tables."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]) if len(addr) == 8
                              else "ipv6:" + addr)
    return found


def test_servers_listen_on_loopback_only(tmp_path):
    from distill.config import load_config
    from distill.train import launcher_command
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--config", "configs/tiny.yaml",
                           f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "--port", str(port)],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        while not _listen_addresses(port):
            assert ui.poll() is None and time.time() < deadline, "mmtp ui did not start listening"
            time.sleep(0.5)
        assert _listen_addresses(port) == {"127.0.0.1"}
    finally:  # SIGTERM: `mmtp ui` then stops its server, which runs in a process group of its own
        ui.send_signal(signal.SIGTERM)
        try:
            ui.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()
    cmd = launcher_command(load_config(ROOT / "configs/tiny.yaml", ["train.nproc=2"]), tmp_path / "c.yaml", None)
    assert cmd[cmd.index("--master_addr") + 1] == "127.0.0.1"


def test_sigterm_runs_the_exit_handlers(tmp_path):
    """After apply_env_defaults, SIGTERM exits through atexit (where Prefect stops its temporary server) with
    code 143; without it the process would die at once and the handler never run."""
    marker = tmp_path / "exit-handlers-ran"
    script = ("import atexit, pathlib, time\n"
              "from distill.env import apply_env_defaults\n"
              "apply_env_defaults()\n"
              f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes')\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert marker.read_text() == "yes"
