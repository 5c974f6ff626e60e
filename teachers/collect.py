"""Run one frozen teacher over one samples shard and write its soft targets as one target shard.

The teacher builds its own rows (`rows`, teachers/contract.py); its declared `modality` picks the
shard schema and the manifest extras, and is recorded in the manifest for the trainer to read.

Each target shard mirrors a samples shard (same name, same rows, same order). A small sidecar
`shard-NNNNN.json` is written after the shard; it records the shard's sha256, the sha256 of the
samples shard it came from and the producer digest. A re-run skips a shard whose sidecar and file
still agree, so a killed collection resumes without recomputing finished shards.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from data.featurestats import FeatureStatsAccumulator
from data.prefetch import Prefetch
from data.shards import (
    ShardError,
    atomic_path,
    digest,
    load_manifest,
    read_shard,
    sha256_file,
    write_manifest,
    write_shard,
)
from data.stop import check_stop
from data.targets import decode_vision, language_bytes_per_token, language_table, vision_table

from . import peek_vocab_size
from .contract import Modality, check_teacher, reads

STATS_FILE = "feature_stats.safetensors"


class VocabMismatchError(ValueError):
    """The student's vocab differs from the language teacher's."""


def check_vocab(teacher_cfg, student_vocab: int | None, cache_dir) -> int:
    """Fail before any compute when the configured student vocab differs from the teacher's."""
    teacher_vocab = peek_vocab_size(teacher_cfg, cache_dir)
    if student_vocab is not None and student_vocab != teacher_vocab:
        raise VocabMismatchError(
            f"student.vocab_size={student_vocab} but language teacher '{teacher_cfg.name}' has vocab "
            f"{teacher_vocab}; the student uses the teacher's tokenizer, so they must be equal "
            f"(set student.vocab_size={teacher_vocab}, or null to take the teacher's; a student with its own "
            "tokenizer: student.tokenizer)")
    return teacher_vocab


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def finished_entry(out_path: Path, samples_sha256: str, producer_digest: str) -> dict | None:
    """The sidecar of a complete, matching target shard, or None when it must be (re)computed."""
    sidecar = _sidecar(out_path)
    if not (out_path.exists() and sidecar.exists()):
        return None
    try:
        entry = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        return None
    if (entry.get("producer_digest") == producer_digest and entry.get("samples_sha256") == samples_sha256
            and sha256_file(out_path) == entry.get("sha256")):
        return entry
    return None


def spare_capacity(teacher) -> bool:
    """Whether the forward leaves a core free for a decoding thread: the teacher runs on an accelerator, or
    torch's forward uses fewer threads than the machine has cores."""
    device = getattr(teacher, "device", None)
    accelerator = device is not None and torch.device(device).type != "cpu"
    return accelerator or torch.get_num_threads() < (os.cpu_count() or 1)


def split_rows(teacher) -> bool:
    """Whether the teacher splits `rows` into `prepare` (decode, preprocess) and `rows_from` (forward)."""
    return callable(getattr(teacher, "prepare", None)) and callable(getattr(teacher, "rows_from", None))


def prefetch_thread(teacher, prefetch: bool | None) -> bool:
    """Whether `collect_shard(..., prefetch=prefetch)` prepares the next batch in a thread."""
    return split_rows(teacher) and (spare_capacity(teacher) if prefetch is None else prefetch)


def input_shards(teacher, inputs: dict | None, shard_file: str, producer_digest: str) -> tuple[dict[str, Path], str]:
    """The target shards named `shard_file` of the teachers whose stored rows `teacher` reads (`contract.reads`: a
    grafted language teacher's vision teacher, teachers/graft.py), once the teacher has checked their folders
    (`check_reads`: finished, and from the teacher it was fitted on); and the producer digest with their sha256,
    so that re-collected input rows re-score the shard. `inputs`: those teachers' target folders by name."""
    names = reads(teacher)
    if not names:
        return {}, producer_digest
    missing = [n for n in names if n not in (inputs or {})]
    if missing:
        raise ValueError(f"teacher {teacher.identity()['name']!r} reads the stored rows of teacher(s) {missing} (a "
                         "grafted teacher); collect them first and pass their target folders (inputs=)")
    teacher.check_reads({n: Path(inputs[n]) for n in names})
    paths = {n: Path(inputs[n]) / shard_file for n in names}
    for name, path in paths.items():
        if not path.is_file():
            raise ShardError(f"{path}: missing; teacher {name!r}'s shards are read by teacher "
                             f"{teacher.identity()['name']!r}: re-run `mmtp collect`")
    return paths, digest([producer_digest, {n: sha256_file(p) for n, p in paths.items()}])


def read_inputs(paths: dict[str, Path], ids: list[str]) -> dict[str, tuple]:
    """(summary, features) of each input teacher's shard, checked to hold the samples shard's rows in order."""
    out = {}
    for name, path in paths.items():
        table = read_shard(path)
        if table.column("id").to_pylist() != ids:
            raise ShardError(f"{path}: rows do not line up with the samples shard; re-run `mmtp collect`")
        out[name] = decode_vision(table)
    return out


def shard_batches(samples, batch_size: int, stored: dict[str, tuple]):
    """The samples shard's rows as dicts, `batch_size` at a time, each with its input teachers' stored rows under
    `vision` (name -> summary, features) when there are any."""
    for lo in range(0, samples.num_rows, batch_size):
        batch = samples.slice(lo, batch_size).to_pylist()
        for j, row in enumerate(batch if stored else ()):
            row["vision"] = {n: {"summary": s[lo + j], "features": f[lo + j]} for n, (s, f) in stored.items()}
        yield batch


def collect_shard(teacher, samples_path: str | Path, out_dir: str | Path, *, producer_digest: str,
                  batch_size: int = 32, compression: str | None = "zstd", progress: bool = True,
                  prefetch: bool | None = None, inputs: dict | None = None) -> dict:
    """Write the target shard for `samples_path`; returns its manifest entry plus run figures.

    `forwards` in the result counts teacher forward passes (0 when the shard was already done). `prefetch`:
    prepare (decode, resize) the next batch in a thread during the forward, for teachers that split `rows`
    into `prepare` and `rows_from`; None = only with `spare_capacity` (on a CPU whose cores the forward
    fills, the thread just contends with it: docs/collection.md). `inputs`: see `input_shards`.
    """
    samples_path, out_dir = Path(samples_path), Path(out_dir)
    compression = getattr(compression, "value", compression)  # the config's Compression enum -> pyarrow's str
    out_path = out_dir / samples_path.name
    samples_sha = sha256_file(samples_path)
    paths, producer_digest = input_shards(teacher, inputs, samples_path.name, producer_digest)
    done = finished_entry(out_path, samples_sha, producer_digest)
    if done is not None:
        return {**done, "skipped": True, "forwards": 0, "seconds": 0.0}
    check_stop()

    modality = check_teacher(teacher)
    ident = teacher.identity()
    samples = read_shard(samples_path)
    ids = samples.column("id").to_pylist()
    start, forwards, rows = time.perf_counter(), 0, []
    bar = tqdm(total=len(ids), desc=f"{ident['name']} {samples_path.name}", disable=not progress,
               unit="row", leave=False)
    batches = shard_batches(samples, batch_size, read_inputs(paths, ids))
    # A teacher that splits `rows` into `prepare` (decode, preprocess) and `rows_from` can get the next
    # batch prepared in a thread while the current one runs forward.
    split, threaded = split_rows(teacher), prefetch_thread(teacher, prefetch)
    stream = ((b, teacher.prepare(b)) for b in batches) if split else ((b, b) for b in batches)
    stream = Prefetch(stream, depth=2) if threaded else stream
    try:
        for batch, prepared in stream:
            check_stop()  # a SIGTERM abandons the shard (written only at the end) at the next batch
            out = teacher.rows_from(prepared) if split else teacher.rows(batch)
            if len(out) != len(batch):
                raise ValueError(f"teacher {ident['name']!r}: rows() returned {len(out)} rows for {len(batch)} samples")
            rows += out
            forwards += 1
            bar.update(len(batch))
        check_stop()
    finally:
        if threaded:
            stream.close()
        bar.close()

    table = TABLES[modality](ids, rows, ident)
    tokens = sum(len(r["token_ids"]) for r in rows) if modality == Modality.language else 0
    truncated = sum(bool(r["truncated"]) for r in rows) if modality == Modality.language else 0
    # Language shards go out as one record batch: zstd then sees the whole shard (80 against 125 B/token
    # for fp16 at k=64, docs/collection.md); readers decompress a whole shard anyway.
    batch_rows = max(len(ids), 1) if modality == Modality.language else 64
    entry = write_shard(out_path, table, compression, batch_rows)
    entry.update(samples_sha256=samples_sha, producer_digest=producer_digest, tokens=tokens,
                 truncated_captions=truncated)
    with atomic_path(_sidecar(out_path)) as tmp:
        tmp.write_text(json.dumps(entry, indent=1))
    return {**entry, "skipped": False, "forwards": forwards, "seconds": time.perf_counter() - start}


def _language_table(ids: list[str], rows: list[dict], ident: dict):
    return language_table(ids, rows, ident["vocab_size"], ident["top_k"], ident.get("logprob_encoding", "fp16"),
                          tuple(ident.get("tail_temperatures", ())))


def _vision_table(ids: list[str], rows: list[dict], ident: dict):
    summary = np.stack([np.asarray(r["summary"], dtype=np.float32) for r in rows])
    features = np.stack([np.asarray(r["features"], dtype=np.float32) for r in rows])
    want = (len(rows), ident["num_patches"], ident["feature_dim"])
    if features.shape != want or summary.shape != (len(rows), ident["summary_dim"]):
        raise ValueError(f"teacher {ident['name']!r}: rows give summary {summary.shape} and features "
                         f"{features.shape}; its identity says ({len(rows)}, {ident['summary_dim']}) and {want}")
    return vision_table(ids, summary, features)


TABLES = {Modality.language: _language_table, Modality.vision: _vision_table}


def feature_stats(out_dir: Path, entries: list[dict], chunk: int = 8192) -> dict[str, np.ndarray]:
    """Mean, per-dim std and covariance of the summary and of the patch features, over all shards.

    These standardise the teacher's features for the vision KD loss (z-score or PHI-S).
    """
    acc = {"summary": FeatureStatsAccumulator(), "features": FeatureStatsAccumulator()}
    for e in entries:
        summary, features = decode_vision(read_shard(out_dir / e["file"]))
        for name, x in (("summary", summary), ("features", features.reshape(-1, features.shape[-1]))):
            for lo in range(0, len(x), chunk):
                acc[name].update(torch.tensor(x[lo:lo + chunk]))
    stats = {}
    for name, a in acc.items():
        s = a.finalize()
        stats.update({f"{name}_mean": s.mean, f"{name}_std": s.std, f"{name}_cov": s.cov})
    return {k: v.float().numpy() for k, v in stats.items()}


def finalize_targets(teacher, out_dir: str | Path, samples_manifest: dict, entries: list[dict],
                     *, config_digest: str, collect_options: dict, origin: str | None = None) -> dict:
    """Check every samples shard has its target shard, then write the teacher's manifest, which
    records the teacher's `modality`.

    A language teacher's tokenizer is saved beside its shards (`tokenizer/`): the student uses it,
    and evaluation reads words back from token ids, without loading the teacher model.
    """
    out_dir = Path(out_dir)
    modality = check_teacher(teacher)
    teacher_identity = teacher.identity()
    if modality == Modality.language:
        tmp = out_dir / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        teacher.tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(out_dir / "tokenizer", ignore_errors=True)
        os.replace(tmp, out_dir / "tokenizer")
    by_file = {e["file"]: e for e in entries}
    missing = [s["file"] for s in samples_manifest["shards"] if s["file"] not in by_file]
    if missing:
        raise ShardError(f"{out_dir}: target shards missing for {missing}; re-run `mmtp collect`")
    keep = ("file", "rows", "bytes", "sha256", "id_first", "id_last", "samples_sha256", "tokens",
            "truncated_captions")
    shards = [{k: by_file[s["file"]][k] for k in keep} for s in samples_manifest["shards"]]
    for s, t in zip(samples_manifest["shards"], shards, strict=True):
        if s["rows"] != t["rows"] or s["id_first"] != t["id_first"]:
            raise ShardError(f"{out_dir / t['file']}: rows do not line up with samples shard {s['file']}; "
                             "delete the target folder and re-run `mmtp collect`")
    extra = {"modality": modality.value, "collect": collect_options}
    if origin is not None:  # shards of other rows than the collected samples (e.g. on-policy generations)
        extra["origin"] = origin
    if modality == Modality.language:
        tokens = sum(s["tokens"] for s in shards)
        extra.update(
            tokens=tokens, truncated_captions=sum(s["truncated_captions"] for s in shards),
            bytes_per_token=sum(s["bytes"] for s in shards) / max(tokens, 1),
            bytes_per_token_uncompressed=language_bytes_per_token(
                teacher_identity["vocab_size"], teacher_identity["top_k"],
                teacher_identity.get("logprob_encoding", "fp16"), len(teacher_identity.get("tail_temperatures", ())),
                token_logprob=True))
    else:
        stats = feature_stats(out_dir, shards)
        with atomic_path(out_dir / STATS_FILE) as tmp:
            save_file(stats, str(tmp))
        cov = stats["features_cov"].astype(np.float64)
        extra.update(
            shape=[teacher_identity["num_patches"], teacher_identity["feature_dim"]],
            grid=teacher_identity["grid"],
            feature_stats={
                "file": STATS_FILE, "sha256": sha256_file(out_dir / STATS_FILE),
                "features_mean": stats["features_mean"].tolist(), "features_std": stats["features_std"].tolist(),
                "summary_mean": stats["summary_mean"].tolist(), "summary_std": stats["summary_std"].tolist(),
                # PHI-S divides the Hadamard-rotated, whitened-by-PCA features by this one scale.
                "features_phis_scale": float(np.sqrt(max(np.trace(cov) / cov.shape[0], 1e-12))),
            })
    return write_manifest(out_dir, kind="targets", shards=shards, producer=teacher_identity,
                          config_digest=config_digest, samples_config_digest=samples_manifest["config_digest"],
                          **extra)


def targets_complete(out_dir: str | Path, producer_digest: str) -> dict | None:
    """The teacher's manifest when it exists, verifies, and was made by the same producer."""
    try:
        manifest = load_manifest(out_dir)
    except ShardError:
        return None
    return manifest if manifest.get("config_digest") == producer_digest else None
