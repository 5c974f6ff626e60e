"""Collection benchmark: bytes per text token, and collection throughput against a bare teacher forward.

    python bench/collect.py [--config configs/default.yaml] [--rows 256] [key=value ...]

With `--targets <folder>` it only re-encodes an existing language target folder (no teacher, no
timing). Otherwise it prints, for the language teacher, `bytes_per_token` and `kl_error_nats` (max and
mean KL(float32 top-k+tail || decoded), over the k+1 buckets) of every `LogprobEncoding`.

Prints one JSON object. Both timings run in this process over the same batches of one samples
shard: `bare` is the teacher's forward alone on already tokenised / preprocessed batches;
`collect` is the whole `collect_shard` (tokenise or decode, forward, top-k and tail, Arrow
encoding, compression, atomic write, sha256), timed in turn `--repeats` times. `throughput_ratio` is
the fastest bare time ÷ the fastest collect time; `throughput_ratio_paired` is the median of each bare
run ÷ the collection run right after it, which cancels the machine's drift (goal ≥ 0.90).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.env import apply_env_defaults  # noqa: E402

apply_env_defaults()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data.images import decode_image  # noqa: E402
from data.samples import build_samples  # noqa: E402
from data.shards import load_manifest, read_shard, write_shard  # noqa: E402
from data.targets import LogprobEncoding, decode_language_row, language_table  # noqa: E402
from distill.config import cache_path, load_config, shards_path, teacher_configs, to_container  # noqa: E402
from distill.losses import LOGPROB_FLOOR  # noqa: E402
from teachers.collect import TABLES, collect_shard, prefetch_thread, split_rows  # noqa: E402
from teachers.contract import Modality, check_teacher  # noqa: E402
from teachers.registry import load_teacher  # noqa: E402


def bucket_log_probs(ids: np.ndarray, top: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """[N, k+1] log-probs of the top-k (in id order) and the tail, renormalised as the loss does."""
    order = np.argsort(ids, axis=1, kind="stable")
    top = np.take_along_axis(np.asarray(top, np.float64), order, 1)
    x = np.concatenate([top, np.asarray(tail, np.float64)[:, None]], 1).clip(LOGPROB_FLOOR, None)
    return x - np.logaddexp.reduce(x, axis=1, keepdims=True)


def encoding_figures(shards: list[tuple[list[str], list[dict]]], vocab: int, k: int, tmp: Path,
                     compression: str, batch_rows: int) -> dict:
    """Per `LogprobEncoding`: bytes per token on disk and KL(reference || decoded) in nats per position,
    over the k+1 buckets, for rows holding float32 (or stored fp16) reference values."""
    compression = getattr(compression, "value", compression)  # the config's enum -> pyarrow's str
    tokens = sum(len(r["token_ids"]) for _, rows in shards for r in rows)
    ref = [bucket_log_probs(np.concatenate([r["topk_ids"] for r in rows]),
                            np.concatenate([r["topk_logprobs"] for r in rows]),
                            np.concatenate([r["tail_logprob"] for r in rows])) for _, rows in shards]
    out = {}
    for encoding in LogprobEncoding:
        size, kl = 0, []
        for (ids, rows), p in zip(shards, ref, strict=True):
            path = tmp / f"{encoding.value}.arrow"
            size += write_shard(path, language_table(ids, rows, vocab, k, encoding), compression, batch_rows)["bytes"]
            table = read_shard(path)
            dec = [decode_language_row(table, i) for i in range(table.num_rows)]
            q = bucket_log_probs(*(np.concatenate([d[n] for d in dec]) for n in ("topk_ids", "topk_logprobs",
                                                                                 "tail_logprob")))
            kl.append((np.exp(p) * (p - q)).sum(1))
        kl = np.concatenate(kl)
        out[encoding.value] = {"bytes_per_token": round(size / tokens, 1),
                               "kl_error_nats": {"max": float(f"{kl.max():.3g}"), "mean": float(f"{kl.mean():.3g}")}}
    return out


def stored_rows(folder: Path) -> tuple[dict, list[tuple[list[str], list[dict]]]]:
    """The manifest and every shard's (ids, decoded rows) of an existing language target folder."""
    manifest = load_manifest(folder)
    shards = []
    for entry in manifest["shards"]:
        table = read_shard(folder / entry["file"])
        rows = [{n: v.astype(np.float32) if v.dtype == np.float16 else v for n, v in
                 decode_language_row(table, i).items()} for i in range(table.num_rows)]
        shards.append((table.column("id").to_pylist(), rows))
    return manifest, shards


def interleaved_times(fns, repeats: int) -> list[list[float]]:
    """Seconds of `repeats` runs of each function, run in turn (so drift of the machine hits all alike)."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return times


def timers(teacher, language: bool, shard, bs: int, src: Path, out: Path, compression: str, prefetch: bool | None):
    """(bare forward over the shard's batches, full collection of the shard) as callables."""
    if language:
        token_ids, _ = teacher.encode(shard.column("caption").to_pylist())
        batches = [token_ids[i:i + bs] for i in range(0, len(token_ids), bs)]

        def bare():
            return [teacher.forward_logits(b) for b in batches]
    else:
        images = [decode_image(b) for b in shard.column("image").to_pylist()]
        batches = [teacher.preprocess(images[i:i + bs]) for i in range(0, len(images), bs)]

        def bare():
            return [teacher.forward(b) for b in batches]

    def collect():
        for f in out.glob("*"):
            f.unlink()
        return collect_shard(teacher, src, out, producer_digest="bench", batch_size=bs,
                             compression=compression, progress=False, prefetch=prefetch)
    return bare, collect


def overhead(teacher, shard, bs: int, path: Path, compression, repeats: int) -> dict:
    """The fastest seconds of what collection adds to the forward, per part, for a teacher that splits `rows`:
    `prepare` (decode and preprocess every batch) and `write` (the Arrow table, compression, atomic write)."""
    compression = getattr(compression, "value", compression)
    batches = [shard.slice(lo, bs).to_pylist() for lo in range(0, shard.num_rows, bs)]
    ids, ident = shard.column("id").to_pylist(), teacher.identity()
    with torch.inference_mode():
        rows = [r for b in batches for r in teacher.rows_from(teacher.prepare(b))]
        prepare, write = interleaved_times([lambda: [teacher.prepare(b) for b in batches],
                                            lambda: write_shard(path, TABLES[teacher.modality](ids, rows, ident),
                                                                compression)], repeats)
    return {"prepare": round(min(prepare), 3), "write": round(min(write), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--rows", type=int, default=256, help="rows of the first samples shard to time")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each, interleaved; the fastest counts")
    p.add_argument("--targets", type=Path, help="only re-encode this existing language target folder (no teacher): "
                   "bytes_per_token and kl_error_nats of every encoding against its stored values")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    if args.targets:
        manifest, shards = stored_rows(args.targets)
        producer = manifest["producer"]
        with tempfile.TemporaryDirectory() as tmp:
            figures = encoding_figures(shards, producer["vocab_size"], producer["top_k"], Path(tmp),
                                       cfg.collect.compression, max(len(ids) for ids, _ in shards))
        print(json.dumps({"targets": str(args.targets), "rows": manifest["rows"], "tokens": manifest["tokens"],
                          "top_k": producer["top_k"], "stored_encoding": producer.get("logprob_encoding", "fp16"),
                          "encodings": figures}, indent=1))
        return
    samples_dir = shards_path(cfg, "samples")
    build_samples(to_container(cfg)["data"], samples_dir, cfg.seed, progress=False)
    shard = read_shard(samples_dir / "shard-00000.arrow").slice(0, args.rows)
    bs = cfg.collect.batch_size
    result = {"config": args.config, "rows": shard.num_rows, "batch_size": bs, "threads": torch.get_num_threads(),
              "teachers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "shard-00000.arrow"
        write_shard(src, shard)
        for tcfg in teacher_configs(cfg):
            teacher = load_teacher(tcfg, cache_path(cfg, "teachers"))
            language = check_teacher(teacher) == Modality.language
            bare, collect = timers(teacher, language, shard, bs, src, Path(tmp) / tcfg.name, cfg.collect.compression,
                                  cfg.collect.prefetch)
            with torch.inference_mode():
                bare()  # warm-up
                bares, collects = interleaved_times([bare, collect], args.repeats)
            entry = collect()
            t_bare, t_collect = min(bares), min(collects)
            fig = {"bare_s": round(t_bare, 3), "collect_s": round(t_collect, 3),
                   "throughput_ratio": round(t_bare / t_collect, 3),
                   # each bare run against the collection run right after it: drift of the machine cancels
                   "throughput_ratio_paired": round(float(np.median(np.divide(bares, collects))), 3),
                   "samples_per_s": round(shard.num_rows / t_collect, 1),
                   "prefetch_thread": prefetch_thread(teacher, cfg.collect.prefetch)}
            if split_rows(teacher):
                fig["overhead_s"] = overhead(teacher, shard, bs, Path(tmp) / "overhead.arrow",
                                             cfg.collect.compression, args.repeats)
            if language:
                float32_rows = [r for lo in range(0, shard.num_rows, bs)
                                for r in teacher.rows(shard.slice(lo, bs).to_pylist())]
                out = Path(tmp) / tcfg.name
                vocab, k, tokens = teacher.vocab_size, tcfg.top_k, entry["tokens"]
                raw = read_shard(out / "shard-00000.arrow")
                plain = Path(tmp) / "plain.arrow"
                write_shard(plain, raw, compression=None)
                fig.update(vocab_size=vocab, top_k=k, tokens=tokens, tokens_per_s=round(tokens / t_collect, 1),
                           bytes_per_token=round(entry["bytes"] / tokens, 1),
                           bytes_per_token_uncompressed=round(plain.stat().st_size / tokens, 1),
                           dense_fp16_bytes_per_token=2 * vocab,
                           ratio_vs_dense_fp16=round(entry["bytes"] / tokens / (2 * vocab), 5),
                           logprob_encoding=tcfg.logprob_encoding,
                           # every encoding against the teacher's float32 top-k + tail, one record batch
                           encodings=encoding_figures([(shard.column("id").to_pylist(), float32_rows)],
                                                      vocab, k, Path(tmp), cfg.collect.compression, shard.num_rows),
                           compression=cfg.collect.compression)
            result["teachers"][tcfg.name] = fig
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
