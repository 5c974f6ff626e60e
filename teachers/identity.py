"""Digests that identify a teacher: its weight files and its tokenizer.

Digests are sha256 hex strings. Files are hashed streamed (never read whole), and a
file's digest is memoised per (path, size, mtime) so a process hashes each file once.
"""
import hashlib
import json
from pathlib import Path

_CHUNK = 1 << 20
_FILE_DIGESTS: dict[tuple, str] = {}

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf")


def file_sha256(path) -> str:
    """sha256 of one file, streamed."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    digest = _FILE_DIGESTS.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = _FILE_DIGESTS[key] = h.hexdigest()
    return digest


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


def json_sha256(obj) -> str:
    """sha256 of a JSON-serialisable object, key order independent."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
