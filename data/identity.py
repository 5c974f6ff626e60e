"""Digests that identify a teacher: its weight files and its tokenizer. They live in data/, beside the shards
that record them, because both the teachers (collection) and distill (evaluation compares a student's tokenizer
with the teacher's) read them, and distill does not import teachers.

Digests are sha256 hex strings, made by data/shards.py's helpers (the one place they are written;
`json_sha256` is its `digest`). A file's digest is memoised per (path, size, mtime) so a process hashes
each weight file once.
"""
import hashlib
import json
from pathlib import Path

from data.shards import digest as json_sha256  # noqa: F401  (re-exported: teachers/registry.py, tiny.py)
from data.shards import sha256_file

_FILE_DIGESTS: dict[tuple, str] = {}


def file_sha256(path) -> str:
    """sha256 of one file, streamed, memoised."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        _FILE_DIGESTS[key] = sha256_file(path)
    return _FILE_DIGESTS[key]


def files_sha256(paths) -> str:
    """One digest over several files: the sha256 of their names and digests, in name order."""
    paths = sorted(Path(p) for p in paths)
    if len(paths) == 1:
        return file_sha256(paths[0])
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.name}:{file_sha256(p)}\n".encode())
    return h.hexdigest()


def weight_files(folder) -> list[Path]:
    """The weight files a HF model folder loads from: safetensors when present, else .bin."""
    folder = Path(folder)
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"no *.safetensors or *.bin weight files in model folder {folder}")


def weights_digest(folder) -> str:
    return files_sha256(weight_files(folder))


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the tokenizer's serialised JSON (fast tokenizers) or its vocab, plus its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = {
        name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")
    }
    h = hashlib.sha256(body.encode())
    h.update(json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()
