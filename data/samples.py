"""Build the samples shards (id, PNG image, caption, label, split) from the configured sources.

Row rules, each counted in the manifest under `rows_skipped` / `rows_fixed`:
- an image that does not decode, or has zero size: the row is skipped (`bad_image`);
- a caption that is empty after stripping whitespace: skipped (`empty_caption`);
- caption bytes that are not UTF-8: skipped (`bad_text`);
- a caption longer than `max_caption_chars`: cut at the last space before the limit (`truncated_caption`).
When more than `max_bad_fraction` of the rows are skipped the build aborts with `BadRowsError`
before any manifest is written, so nothing downstream trains on a mostly broken source.

Splits come from a hash of (seed, sample id): stable when sources grow, and deterministic. The
generator sources (digits, scenes, fashion_mnist) are told each row's split through `split_of`, so
they caption val/test rows from held-out templates only (data/sources.py).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from data.images import decode_image
from data.shards import ShardError, ShardWriter, clean_temp_files, digest, load_manifest, write_manifest
from data.sources import CAPTIONS_VERSION, iter_source
from data.targets import SAMPLES_SCHEMA

log = logging.getLogger(__name__)


class BadRowsError(RuntimeError):
    """Too many rows of a source were unusable."""


def assign_split(sample_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    u = int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:8], "big") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def clean_caption(caption, max_chars: int) -> tuple[str | None, str | None]:
    """(caption, None) when usable, (None, reason) when skipped, (cut, 'truncated_caption') when cut."""
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            return None, "bad_text"
    if not isinstance(caption, str):
        return None, "bad_text"
    caption = " ".join(caption.split())
    if not caption:
        return None, "empty_caption"
    if len(caption) > max_chars:
        cut = caption[:max_chars]
        return (cut[: cut.rfind(" ")] if " " in cut else cut), "truncated_caption"
    return caption, None


def samples_config(data_cfg: dict, seed: int) -> dict:
    """The part of the config that determines the samples shards (their producer digest), and the
    version of the generated captions (they change with the code, not the config)."""
    keys = ("sources", "image_size", "shard_rows", "val_fraction", "test_fraction", "max_caption_chars")
    return {"seed": seed, "captions": CAPTIONS_VERSION, **{k: data_cfg[k] for k in keys}}


def build_samples(data_cfg: dict, out_dir: str | Path, seed: int = 0, progress: bool = True) -> dict:
    """Write the samples shards and manifest into `out_dir`; reuse them when already complete."""
    out_dir = Path(out_dir)
    spec = samples_config(data_cfg, seed)
    config_digest = digest(spec)
    try:
        manifest = load_manifest(out_dir)
        if manifest["config_digest"] == config_digest:
            log.info("samples in %s are complete; reusing them", out_dir)
            return manifest
    except ShardError:
        pass
    clean_temp_files(out_dir)
    for stale in out_dir.glob("shard-*.arrow"):
        stale.unlink()

    writer = ShardWriter(out_dir, SAMPLES_SCHEMA, data_cfg["shard_rows"])
    seen, skipped, fixed, splits = 0, Counter(), Counter(), Counter()
    split_of = partial(assign_split, seed=seed, val_fraction=data_cfg["val_fraction"],
                       test_fraction=data_cfg["test_fraction"])
    for source in data_cfg["sources"]:
        source = {k: v for k, v in source.items() if v is not None}
        source.setdefault("image_size", data_cfg["image_size"])
        rows = iter_source(source, split_of)
        for raw in tqdm(rows, desc=f"samples: {source['kind']}", disable=not progress):
            seen += 1
            caption, reason = clean_caption(raw.get("caption"), data_cfg["max_caption_chars"])
            if caption is None:
                skipped[reason] += 1
                continue
            try:
                decode_image(raw["image"])
            except (ValueError, TypeError, OSError) as e:
                skipped["bad_image"] += 1
                log.warning("skipping %s: %s", raw.get("id"), e)
                continue
            if reason:
                fixed[reason] += 1
            split = split_of(raw["id"])
            splits[split] += 1
            writer.add({"id": raw["id"], "image": raw["image"], "caption": caption, "label": raw.get("label"),
                        "split": split, "source": source["kind"], "grounded": raw.get("grounded") or []})
    n_bad = sum(skipped.values())
    if seen == 0:
        raise BadRowsError("the configured data sources produced no rows (data.sources)")
    if n_bad / seen > data_cfg["max_bad_fraction"]:
        raise BadRowsError(f"{n_bad} of {seen} rows are unusable ({dict(skipped)}), more than "
                           f"data.max_bad_fraction={data_cfg['max_bad_fraction']}; fix the source or raise the limit")
    if n_bad or fixed:
        log.warning("samples: skipped %s, fixed %s of %d rows", dict(skipped), dict(fixed), seen)
    return write_manifest(out_dir, kind="samples", shards=writer.close(),
                          producer={"kind": "samples", "sources": spec["sources"]}, config_digest=config_digest,
                          config=spec, rows_seen=seen, rows_skipped=dict(skipped), rows_fixed=dict(fixed),
                          splits=dict(splits))
