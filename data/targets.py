"""Arrow schemas of the shards, and the encoders/decoders of teacher soft targets.

Language rows: `id`, `token_ids` (int32, L), `topk_ids` (L×k; uint16 when the vocab fits in
65,536 ids, else int32), `topk_logprobs` (float16, L×k, true log-probabilities at T=1, sorted
descending) and `tail_logprob` (float16, L: log of the probability mass outside the top-k).
Vision rows: `id`, `summary` (float16, D_s) and `features` (float16, P×D_f).
Fixed-size lists keep every value buffer flat, so decoding is a zero-copy numpy reshape.
"""

from __future__ import annotations

from enum import Enum

import numpy as np
import pyarrow as pa


class Modality(str, Enum):
    """Which rows a teacher writes; target manifests record it (teachers/contract.py)."""
    language = "language"  # token_ids, topk_ids, topk_logprobs, tail_logprob
    vision = "vision"  # summary, features

SAMPLES_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.binary()),  # PNG bytes
    ("caption", pa.string()),
    ("label", pa.int32()),
    ("split", pa.string()),  # train | val | test
    ("source", pa.string()),
    ("grounded", pa.list_(pa.string())),  # caption words only the image can tell
])


def id_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.int32


def language_schema(vocab_size: int, top_k: int) -> pa.Schema:
    ids = pa.uint16() if vocab_size <= 65536 else pa.int32()
    return pa.schema([
        ("id", pa.string()),
        ("token_ids", pa.list_(pa.int32())),
        ("topk_ids", pa.list_(pa.list_(ids, top_k))),
        ("topk_logprobs", pa.list_(pa.list_(pa.float16(), top_k))),
        ("tail_logprob", pa.list_(pa.float16())),
    ])


def vision_schema(summary_dim: int, num_patches: int, feature_dim: int) -> pa.Schema:
    return pa.schema([
        ("id", pa.string()),
        ("summary", pa.list_(pa.float16(), summary_dim)),
        ("features", pa.list_(pa.list_(pa.float16(), feature_dim), num_patches)),
    ])


def _ragged(rows: list[np.ndarray], dtype, width: int | None) -> pa.Array:
    """A list<...> array from per-row arrays of shape (L,) or (L, width)."""
    lengths = np.array([len(r) for r in rows], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    flat = np.concatenate([np.asarray(r, dtype=dtype).reshape(-1) for r in rows]) if rows else np.zeros(0, dtype)
    values = pa.array(flat)
    if width is not None:
        values = pa.FixedSizeListArray.from_arrays(values, width)
    return pa.ListArray.from_arrays(offsets, values)


def language_table(ids: list[str], rows: list[dict], vocab_size: int, top_k: int) -> pa.Table:
    """`rows[i]` holds numpy `token_ids` (L), `topk_ids` (L×k), `topk_logprobs` (L×k), `tail_logprob` (L)."""
    schema = language_schema(vocab_size, top_k)
    return pa.Table.from_arrays([
        pa.array(ids, pa.string()),
        _ragged([r["token_ids"] for r in rows], np.int32, None),
        _ragged([r["topk_ids"] for r in rows], id_dtype(vocab_size), top_k),
        _ragged([r["topk_logprobs"] for r in rows], np.float16, top_k),
        _ragged([r["tail_logprob"] for r in rows], np.float16, None),
    ], schema=schema)


def vision_table(ids: list[str], summary: np.ndarray, features: np.ndarray) -> pa.Table:
    n, p, d = features.shape
    schema = vision_schema(summary.shape[1], p, d)
    s = pa.FixedSizeListArray.from_arrays(pa.array(summary.astype(np.float16).reshape(-1)), summary.shape[1])
    f = pa.FixedSizeListArray.from_arrays(pa.array(features.astype(np.float16).reshape(-1)), d)
    return pa.Table.from_arrays([pa.array(ids, pa.string()), s, pa.FixedSizeListArray.from_arrays(f, p)],
                                schema=schema)


def _flat(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def decode_language_row(table: pa.Table, i: int) -> dict[str, np.ndarray]:
    """Row `i` as numpy arrays (views into the Arrow buffers where the shard is uncompressed)."""
    out = {}
    for name in ("token_ids", "tail_logprob", "topk_ids", "topk_logprobs"):
        cell = table.column(name)[i].values  # list<...> cell -> its values
        if isinstance(cell, pa.FixedSizeListArray):
            width = cell.type.list_size
            out[name] = cell.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
        else:
            out[name] = cell.to_numpy(zero_copy_only=False)
    return out


def decode_vision(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(summary [N, D_s], features [N, P, D_f]) as float16 numpy arrays."""
    s = _flat(table.column("summary"))
    f = _flat(table.column("features"))
    summary = s.flatten().to_numpy(zero_copy_only=False).reshape(len(s), s.type.list_size)
    p, d = f.type.list_size, f.type.value_type.list_size
    features = f.flatten().flatten().to_numpy(zero_copy_only=False).reshape(len(f), p, d)
    return summary, features


def language_bytes_per_token(vocab_size: int, top_k: int) -> int:
    """Uncompressed payload per text token: top-k ids + fp16 log-probs + fp16 tail + int32 token id."""
    return top_k * (np.dtype(id_dtype(vocab_size)).itemsize + 2) + 2 + 4
