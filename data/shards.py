"""Arrow shards and their manifest: the contract between collection and training.

Shards are Arrow IPC *stream* files (`datasets.Dataset.from_file` reads only that format),
named `shard-00000.arrow`, ... Every write goes to a temporary name in the same folder and is
renamed when complete, so a reader never sees a partial file. `manifest.json` beside the shards
lists each shard's file, rows, sha256 and id range, the producer, a digest of the producing
config and the creation time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)  # a write that cannot succeed


class ShardError(RuntimeError):
    """A shard or manifest is missing, corrupt or does not match what was expected."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex of a file, read in chunks (never whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest(obj) -> str:
    """A stable sha256 of a JSON-serialisable object (configs, producer identities)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    On any error (a full disk included) the partial file is removed and the error propagates (an OS error that
    names no file, naming `path`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # like a plain open(); some writers (safetensors) create 0600
        os.replace(tmp, path)
    except OSError as e:  # a write to a full disk names no file (pyarrow's gives no errno): name the file
        code = e.errno or next((c for c in WRITE_ERRNOS if os.strerror(c) in str(e)), None)
        if e.filename is not None or code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from e
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, default=str) + "\n").encode())


def write_shard(path: str | Path, table: pa.Table, compression: str | None = None,
                batch_rows: int = 64) -> dict:
    """Write `table` as one Arrow IPC stream shard, atomically. Returns its manifest entry."""
    path = Path(path)
    options = pa.ipc.IpcWriteOptions(compression=None if compression in (None, "none") else compression)
    with atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema, options=options) as w:
            for batch in table.to_batches(max_chunksize=batch_rows):
                w.write_batch(batch)
    ids = table.column("id") if "id" in table.column_names else None
    return {
        "file": path.name,
        "rows": table.num_rows,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "id_first": ids[0].as_py() if ids is not None and len(ids) else None,
        "id_last": ids[-1].as_py() if ids is not None and len(ids) else None,
    }


def read_shard(path: str | Path) -> pa.Table:
    """Read a shard memory-mapped (zero-copy for uncompressed buffers)."""
    path = Path(path)
    if not path.exists():
        raise ShardError(f"{path}: shard file is missing; re-run `mmtp collect` to rebuild it")
    try:
        with pa.memory_map(str(path), "r") as source:
            return pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise ShardError(f"{path}: corrupt or truncated Arrow shard ({e}); delete it and re-run "
                         "`mmtp collect` to rebuild it") from e


class ShardWriter:
    """Accumulates rows and writes a new shard every `shard_rows` rows."""

    def __init__(self, out_dir: str | Path, schema: pa.Schema, shard_rows: int, compression: str | None = None):
        self.out_dir, self.schema, self.shard_rows = Path(out_dir), schema, shard_rows
        self.compression = compression
        self.rows: list[dict] = []
        self.entries: list[dict] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        self.entries.append(write_shard(self.out_dir / shard_name(len(self.entries)), table, self.compression))
        self.rows = []

    def close(self) -> list[dict]:
        self.flush()
        return self.entries


def write_manifest(out_dir: str | Path, *, kind: str, shards: list[dict], producer: dict,
                   config_digest: str, **extra) -> dict:
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "producer": producer,
        "config_digest": config_digest,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": sum(s["rows"] for s in shards),
        "shards": shards,
        **extra,
    }
    atomic_write_json(Path(out_dir) / MANIFEST, manifest)
    return manifest


def load_manifest(out_dir: str | Path, verify: bool = True) -> dict:
    """Load `manifest.json` and, with `verify`, check that every shard exists with its sha256."""
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        raise ShardError(f"{path}: no manifest; run `mmtp collect` first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: manifest is not valid JSON ({e}); delete it and re-run `mmtp collect`") from e
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{path}: schema_version {manifest.get('schema_version')!r}, expected "
                         f"{SCHEMA_VERSION}; re-collect with this version")
    if verify:
        verify_shards(out_dir, manifest["shards"])
    return manifest


def verify_shards(out_dir: str | Path, entries: Iterable[dict]) -> None:
    for entry in entries:
        path = Path(out_dir) / entry["file"]
        if not path.exists():
            raise ShardError(f"{path}: listed in the manifest but missing; re-run `mmtp collect` to rebuild it")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise ShardError(f"{path}: sha256 {actual[:12]}… does not match the manifest's "
                             f"{entry['sha256'][:12]}…; the file is corrupt or was changed. Delete it and "
                             "re-run `mmtp collect`")


def stray_temp_files(out_dir: str | Path) -> list[Path]:
    """Temporary files left by a killed writer (removed by `clean_temp_files`)."""
    return sorted(Path(out_dir).glob(".*.tmp-*")) if Path(out_dir).exists() else []


def clean_temp_files(out_dir: str | Path) -> int:
    stray = stray_temp_files(out_dir)
    for p in stray:
        p.unlink(missing_ok=True)
    return len(stray)


LOCK_FILE = ".mmtp.lock"
_held: dict[Path, list[int]] = {}  # resolved lock path -> [fd, depth], for re-entry within this process
_held_guard = threading.Lock()  # Prefect may run tasks in threads of one process


@contextlib.contextmanager
def run_lock(out_dir: str | Path):
    """Refuse a second run on the same output folder: an flock on `.mmtp.lock`, which holds the owner's PID.

    flock because the kernel grants it atomically and drops it when its owner dies, so a stale lock
    is taken over with no PID guessing. Re-entrant within one process (a pipeline holds it around
    its stages). The file is removed on release while still locked; a run that opened it just
    before finds it unlinked and retries on the new file.
    """
    path = Path(out_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    key = path.resolve()
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
        else:
            _held[key] = [_acquire(key, out_dir), 1]
    try:
        yield path
    finally:
        with _held_guard:
            _held[key][1] -= 1
            if not _held[key][1]:
                fd = _held.pop(key)[0]
                key.unlink(missing_ok=True)
                os.close(fd)


def _acquire(path: Path, out_dir) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            owner = None
        except BlockingIOError:
            owner = _pid_in(fd) or "unknown"
        if owner is None:
            try:
                linked = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                linked = False
            if not linked:  # its holder removed it as we opened it: lock the new file
                os.close(fd)
                continue
            pid = _pid_in(fd)  # a leftover file names a dead PID; a live one is a run of an older version
            owner = pid if pid and pid != os.getpid() and _alive(pid) else None
        if owner is not None:
            os.close(fd)
            raise ShardError(f"{out_dir} is in use by another run (PID {owner}, lock file {path}); wait for "
                             "it to finish or choose another output_dir")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd


def _pid_in(fd: int) -> int:
    try:
        return int(os.pread(fd, 32, 0) or 0)
    except ValueError:
        return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
