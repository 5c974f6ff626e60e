"""Arrow schemas of the shards, and the encoders/decoders of teacher soft targets.

Language rows: `id`, `token_ids` (int32, L), `topk_ids` (L×k; uint16 when the vocab fits in
65,536 ids, else int32), `topk_logprobs` (float16, L×k, true log-probabilities at T=1, sorted
descending) and `tail_logprob` (float16, L: log of the probability mass outside the top-k).
The log-probs may be stored lossily instead (`LogprobEncoding`), and `tempered_tail` (float16,
L×n_τ) may hold the exact tempered tail for the temperatures the schema metadata lists.
`token_logprob` (float16, L; NaN at the last position) holds the teacher's log-probability of the
actual next token: the teacher's exact perplexity and top-1 accuracy come from it (data/quality.py).
Vision rows: `id`, `summary` (float16, D_s) and `features` (float16, P×D_f).
Fixed-size lists keep every value buffer flat, so decoding is a zero-copy numpy reshape.
"""

from __future__ import annotations

import json
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


class LogprobEncoding(str, Enum):
    """How a language shard stores the top-k (docs/collection.md has the measured size and error of each)."""
    fp16 = "fp16"  # topk_ids in rank order, topk_logprobs float16
    q8 = "q8"  # topk_ids in rank order; log-probs on a 1/16-nat grid as uint8 monotone deltas (`topk_logprob_q`)
    q8_sorted = "q8_sorted"  # ids ascending as deltas (`topk_id_deltas`); uint8 grid log-probs in that order


LOGPROB_STEP = 1 / 16  # nats per step of the q8 grid: rounding error <= 1/32 nat per log-prob
META_ENCODING, META_STEP, META_TEMPERATURES = b"mmtp.logprob_encoding", b"mmtp.logprob_step", b"mmtp.tail_temperatures"


def id_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.int32


def language_schema(vocab_size: int, top_k: int, encoding: LogprobEncoding | str = LogprobEncoding.fp16,
                    tail_temperatures: tuple[float, ...] = (), token_logprob: bool = False) -> pa.Schema:
    encoding = LogprobEncoding(encoding)
    ids = pa.uint16() if vocab_size <= 65536 else pa.int32()
    fields = [("id", pa.string()), ("token_ids", pa.list_(pa.int32()))]
    if encoding == LogprobEncoding.fp16:
        fields += [("topk_ids", pa.list_(pa.list_(ids, top_k))),
                   ("topk_logprobs", pa.list_(pa.list_(pa.float16(), top_k)))]
    elif encoding == LogprobEncoding.q8:
        fields += [("topk_ids", pa.list_(pa.list_(ids, top_k))),
                   ("topk_logprob_q", pa.list_(pa.list_(pa.uint8(), top_k)))]
    else:
        fields += [("topk_id_deltas", pa.list_(pa.list_(ids, top_k))),
                   ("topk_logprob_q", pa.list_(pa.list_(pa.uint8(), top_k)))]
    fields.append(("tail_logprob", pa.list_(pa.float16())))
    if token_logprob:
        fields.append(("token_logprob", pa.list_(pa.float16())))
    meta = {}
    if encoding != LogprobEncoding.fp16:
        meta.update({META_ENCODING: encoding.value.encode(), META_STEP: repr(LOGPROB_STEP).encode()})
    if tail_temperatures:
        fields.append(("tempered_tail", pa.list_(pa.list_(pa.float16(), len(tail_temperatures)))))
        meta[META_TEMPERATURES] = json.dumps([float(t) for t in tail_temperatures]).encode()
    return pa.schema(fields, metadata=meta or None)


def _quantise(logprobs: np.ndarray, step: float) -> np.ndarray:
    """Grid indices round(-t/step) (uint8, saturating at 255) of log-probs [L, k]."""
    return np.clip(np.rint(-np.asarray(logprobs, np.float64) / step), 0, 255).astype(np.uint8)


def _monotone_deltas(logprobs: np.ndarray, step: float) -> np.ndarray:
    """Descending log-probs [L, k] -> uint8 deltas of their grid indices. A gap over 255 steps
    (16 nats) saturates: the rest of the row is then coded against the decoded value, so no error
    accumulates beyond that one value."""
    q = np.rint(-np.asarray(logprobs, np.float64) / step).clip(0, None)
    out = np.zeros(q.shape, np.uint8)
    prev = np.zeros(q.shape[0])
    for j in range(q.shape[1]):
        d = np.clip(q[:, j] - prev, 0, 255)
        out[:, j] = d
        prev = prev + d
    return out


def _encode_row(r: dict, encoding: LogprobEncoding, ids_dtype, step: float) -> dict:
    if encoding == LogprobEncoding.fp16:
        return {"topk_ids": r["topk_ids"], "topk_logprobs": r["topk_logprobs"]}
    if encoding == LogprobEncoding.q8:
        return {"topk_ids": r["topk_ids"], "topk_logprob_q": _monotone_deltas(r["topk_logprobs"], step)}
    ids = np.asarray(r["topk_ids"], np.int64)
    order = np.argsort(ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, 1)
    deltas = np.diff(ids, axis=1, prepend=0)
    if ids.size and deltas.max() > np.iinfo(ids_dtype).max:
        raise ValueError("q8_sorted: an id gap does not fit the id dtype")
    lp = np.take_along_axis(np.asarray(r["topk_logprobs"], np.float64), order, 1)
    return {"topk_id_deltas": deltas, "topk_logprob_q": _quantise(lp, step)}


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


def language_table(ids: list[str], rows: list[dict], vocab_size: int, top_k: int,
                   encoding: LogprobEncoding | str = LogprobEncoding.fp16,
                   tail_temperatures: tuple[float, ...] = ()) -> pa.Table:
    """`rows[i]` holds numpy `token_ids` (L), `topk_ids` (L×k), `topk_logprobs` (L×k, descending),
    `tail_logprob` (L), `token_logprob` (L; the column is written when every row has it) and, with
    `tail_temperatures`, `tempered_tail` (L×n_τ)."""
    encoding = LogprobEncoding(encoding)
    with_token = bool(rows) and all("token_logprob" in r for r in rows)
    schema = language_schema(vocab_size, top_k, encoding, tail_temperatures, with_token)
    ids_dtype = id_dtype(vocab_size)
    coded = [_encode_row(r, encoding, ids_dtype, LOGPROB_STEP) for r in rows]
    dtypes = {"topk_ids": ids_dtype, "topk_id_deltas": ids_dtype, "topk_logprobs": np.float16,
              "topk_logprob_q": np.uint8}
    arrays = [pa.array(ids, pa.string()), _ragged([r["token_ids"] for r in rows], np.int32, None)]
    arrays += [_ragged([c[name] for c in coded], dtypes[name], top_k) for name in schema.names[2:4]]
    arrays.append(_ragged([r["tail_logprob"] for r in rows], np.float16, None))
    if with_token:
        arrays.append(_ragged([r["token_logprob"] for r in rows], np.float16, None))
    if tail_temperatures:
        for i, r in enumerate(rows):
            got = np.shape(r.get("tempered_tail"))
            if got != (len(r["token_ids"]), len(tail_temperatures)):
                raise ValueError(f"row {i}: tempered_tail has shape {got}, expected "
                                 f"({len(r['token_ids'])}, {len(tail_temperatures)}) for {list(tail_temperatures)}")
        arrays.append(_ragged([r["tempered_tail"] for r in rows], np.float16, len(tail_temperatures)))
    return pa.Table.from_arrays(arrays, schema=schema)


def language_encoding(schema: pa.Schema) -> tuple[LogprobEncoding, float, tuple[float, ...]]:
    """(log-prob encoding, grid step, stored tail temperatures) of a language shard's schema."""
    meta = schema.metadata or {}
    encoding = LogprobEncoding(meta.get(META_ENCODING, b"fp16").decode())
    step = float(meta.get(META_STEP, b"nan").decode())
    temperatures = tuple(json.loads(meta[META_TEMPERATURES])) if META_TEMPERATURES in meta else ()
    return encoding, step, temperatures


def vision_table(ids: list[str], summary: np.ndarray, features: np.ndarray) -> pa.Table:
    n, p, d = features.shape
    schema = vision_schema(summary.shape[1], p, d)
    s = pa.FixedSizeListArray.from_arrays(pa.array(summary.astype(np.float16).reshape(-1)), summary.shape[1])
    f = pa.FixedSizeListArray.from_arrays(pa.array(features.astype(np.float16).reshape(-1)), d)
    return pa.Table.from_arrays([pa.array(ids, pa.string()), s, pa.FixedSizeListArray.from_arrays(f, p)],
                                schema=schema)


def _flat(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _cell(table: pa.Table, name: str, i: int) -> np.ndarray:
    cell = table.column(name)[i].values  # list<...> cell -> its values
    if isinstance(cell, pa.FixedSizeListArray):
        return cell.flatten().to_numpy(zero_copy_only=False).reshape(-1, cell.type.list_size)
    return cell.to_numpy(zero_copy_only=False)


def decode_language_row(table: pa.Table, i: int) -> dict[str, np.ndarray]:
    """Row `i` as numpy arrays: token_ids, topk_ids, topk_logprobs (descending; float16 as stored, or
    float32 decoded from the q8 grid), tail_logprob and, when the shard has them, token_logprob and
    tempered_tail (L×n_τ, log(U_τ/A_τ) per stored temperature, `language_encoding(table.schema)[2]`)."""
    encoding, step, temperatures = language_encoding(table.schema)
    names = ("token_ids", "tail_logprob") + (("token_logprob",) if "token_logprob" in table.column_names else ())
    out = {name: _cell(table, name, i) for name in names}
    if temperatures:
        out["tempered_tail"] = _cell(table, "tempered_tail", i)
    if encoding == LogprobEncoding.fp16:
        out["topk_ids"], out["topk_logprobs"] = _cell(table, "topk_ids", i), _cell(table, "topk_logprobs", i)
    elif encoding == LogprobEncoding.q8:
        out["topk_ids"] = _cell(table, "topk_ids", i)
        out["topk_logprobs"] = (np.cumsum(_cell(table, "topk_logprob_q", i), 1, dtype=np.int32)
                                * np.float32(-step))
    else:
        ids = np.cumsum(_cell(table, "topk_id_deltas", i), 1, dtype=np.int64)
        lp = _cell(table, "topk_logprob_q", i).astype(np.float32) * np.float32(-step)
        order = np.argsort(-lp, axis=1, kind="stable")  # back to descending log-probs
        out["topk_ids"] = np.take_along_axis(ids, order, 1)
        out["topk_logprobs"] = np.take_along_axis(lp, order, 1)
    return out


def decode_vision(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(summary [N, D_s], features [N, P, D_f]) as float16 numpy arrays."""
    s = _flat(table.column("summary"))
    f = _flat(table.column("features"))
    summary = s.flatten().to_numpy(zero_copy_only=False).reshape(len(s), s.type.list_size)
    p, d = f.type.list_size, f.type.value_type.list_size
    features = f.flatten().flatten().to_numpy(zero_copy_only=False).reshape(len(f), p, d)
    return summary, features


def language_bytes_per_token(vocab_size: int, top_k: int, encoding: LogprobEncoding | str = LogprobEncoding.fp16,
                             n_temperatures: int = 0, token_logprob: bool = False) -> int:
    """Uncompressed payload per text token: top-k ids + log-probs (fp16 or uint8) + fp16 tail(s) + int32 token id
    (+ the fp16 token_logprob)."""
    logprob = 2 if LogprobEncoding(encoding) == LogprobEncoding.fp16 else 1
    return top_k * (np.dtype(id_dtype(vocab_size)).itemsize + logprob) + 2 * (1 + n_temperatures + token_logprob) + 4
