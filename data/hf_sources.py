"""The Hugging Face data sources of data/sources.py (a `save_to_disk` folder, parquet files, an image folder, read
through `datasets`, their image, text and label columns mapped onto samples rows), and the helpers every source
shares: the caption's words and the `limit` check."""

from __future__ import annotations

import glob
import io
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from data.images import encode_png, resize, to_pil


def caption_words(caption: str) -> list[str]:
    """Lower-case words of a caption, split the way `grounded` words are matched."""
    return re.findall(r"[a-z0-9]+(?:[-'][a-z0-9]+)*", caption.lower())


def _check_limit(limit):
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")


# ---------------------------------------------------------------- digits


def _image_bytes(value, image_size: int | None) -> bytes:
    """RGB PNG bytes from a PIL image, array, {"bytes", "path"} dict, path or bytes; raw bytes if undecodable."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (str, Path)):
        try:
            value = Path(value).read_bytes()
        except OSError:
            return b""  # a missing file: an empty image the samples writer will count
    if value is None:
        return b""
    raw = bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else b""
    try:
        img = Image.open(io.BytesIO(raw)) if raw else value
        return encode_png(resize(to_pil(img), image_size))
    except Exception:  # noqa: BLE001 - any decoder failure: pass the raw bytes on
        return raw


def _iter_hf(ds, kind: str, image_column: str = "image", text_column: str | None = None,
             label_column: str | None = None, caption_template: str | None = None,
             image_size: int | None = None, limit: int | None = None, name: str | None = None) -> Iterator[dict]:
    """Checks the columns now (not at the first row), then returns the row generator."""
    from datasets import ClassLabel
    from datasets import Image as ImageFeature

    _check_limit(limit)
    columns = list(ds.column_names)
    for key, col in (("image_column", image_column), ("text_column", text_column), ("label_column", label_column)):
        if col is not None and col not in columns:
            raise ValueError(f"{kind}: {key}={col!r} is not a column; columns are {columns}")
    if text_column is None:
        text_column = next((c for c in ("caption", "text") if c in columns), None)
    if label_column is None:
        label_column = "label" if "label" in columns else None
    if text_column is None and caption_template is None:
        raise ValueError(f"{kind}: no text column among {columns}; set text_column or caption_template")
    if text_column is None and label_column is None:
        raise ValueError(f"{kind}: caption_template needs a label column; columns are {columns}")
    if caption_template is not None:
        try:
            caption_template.format(label_name="x", label=0)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{kind}: caption_template {caption_template!r} may use only "
                             f"{{label_name}} and {{label}} ({e!r})") from e
    label_feature = ds.features[label_column] if label_column else None
    names = label_feature.names if isinstance(label_feature, ClassLabel) else None
    if isinstance(ds.features[image_column], ImageFeature):
        ds = ds.cast_column(image_column, ImageFeature(decode=False))  # we decode, so broken images don't raise
    ds = ds.select_columns([c for c in (image_column, text_column, label_column) if c])
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    prefix = name or kind

    def rows():
        for i, row in enumerate(ds):
            raw = row[label_column] if label_column else None
            label = int(raw) if isinstance(raw, (int, np.integer)) and not isinstance(raw, bool) else None
            if names is not None and label is not None and 0 <= label < len(names):
                label_name = names[label]
            else:
                label_name = None if raw is None else str(raw)
            if text_column:  # bytes pass through: the samples writer decodes them or counts them as bad text
                caption = row[text_column]
                caption = "" if caption is None else caption if isinstance(caption, bytes) else str(caption)
            else:
                caption = caption_template.format(label_name=label_name, label=raw)
            words = set(caption_words(caption)) if isinstance(caption, str) else set()
            grounded = [w for w in caption_words(label_name or "") if w in words]
            yield {"id": f"{prefix}-{i:05d}", "image": _image_bytes(row[image_column], image_size),
                   "caption": caption, "label": label, "grounded": list(dict.fromkeys(grounded))}

    return rows()


def load_hf_disk(path: str, split: str | None = None):
    from datasets import DatasetDict, load_from_disk

    if not Path(path).exists():
        raise FileNotFoundError(f"hf_disk: path {path} does not exist")
    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split not in ds:
            raise ValueError(f"hf_disk: {path} holds splits {list(ds)}; set split to one of them (got {split!r})")
        ds = ds[split]
    elif split is not None:
        raise ValueError(f"hf_disk: {path} holds a single Dataset with no splits; drop split={split!r}")
    return ds


def load_parquet(data_files, split: str = "train", cache_dir: str | None = None):
    from datasets import load_dataset

    files = [str(data_files)] if isinstance(data_files, (str, Path)) else [str(f) for f in data_files]
    missing = [f for f in files if not glob.glob(f)]
    if missing:
        raise FileNotFoundError(f"parquet: data_files not found: {missing}")
    return load_dataset("parquet", data_files=files, split=split, cache_dir=cache_dir)


def load_imagefolder(data_dir: str, split: str = "train", cache_dir: str | None = None):
    from datasets import load_dataset

    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"imagefolder: data_dir {data_dir} is not a folder")
    return load_dataset("imagefolder", data_dir=str(data_dir), split=split, cache_dir=cache_dir)


def iter_hf_disk(path: str, split: str | None = None, **kw) -> Iterator[dict]:
    return _iter_hf(load_hf_disk(path, split), "hf_disk", **kw)


def iter_parquet(data_files, split: str = "train", cache_dir: str | None = None, **kw) -> Iterator[dict]:
    return _iter_hf(load_parquet(data_files, split, cache_dir), "parquet", **kw)


def iter_imagefolder(data_dir: str, split: str = "train", cache_dir: str | None = None, **kw) -> Iterator[dict]:
    return _iter_hf(load_imagefolder(data_dir, split, cache_dir), "imagefolder", **kw)


# ---------------------------------------------------------------- registry
