"""Samples shards: bad rows are skipped by rule and counted; splits are deterministic."""

import io

import pytest
from datasets import Dataset
from PIL import Image

from data.samples import BadRowsError, assign_split, build_samples, clean_caption
from data.shards import load_manifest, read_shard


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def _data_cfg(path, **kw):
    source = {"kind": "parquet", "data_files": str(path), "image_column": "image", "text_column": "caption",
              "label_column": None}
    return {"sources": [source], "image_size": 16, "shard_rows": 4, "val_fraction": 0.2, "test_fraction": 0.2,
            "max_caption_chars": 40, "max_bad_fraction": 0.5, **kw}


@pytest.fixture
def messy_parquet(tmp_path):
    good = [_png((i * 20, 0, 0)) for i in range(6)]
    rows = {"image": good + [b"\x89PNG not really", b"", _png((0, 0, 9))],
            "caption": [f"a red square number {i}" for i in range(6)] + ["broken", "empty", "   "]}
    rows["caption"][0] = "word " * 100  # 500 chars: cut at a word boundary
    path = tmp_path / "messy.parquet"
    Dataset.from_dict(rows).to_parquet(str(path))
    return path


def test_bad_rows_are_skipped_counted_and_reported(messy_parquet, tmp_path):
    m = build_samples(_data_cfg(messy_parquet), tmp_path / "samples", seed=0, progress=False)
    assert m["rows_seen"] == 9 and m["rows"] == 6
    assert m["rows_skipped"] == {"bad_image": 2, "empty_caption": 1}
    assert m["rows_fixed"] == {"truncated_caption": 1}
    captions = [c for s in m["shards"]
                for c in read_shard(tmp_path / "samples" / s["file"]).column("caption").to_pylist()]
    assert len(captions[0]) <= 40 and captions[0].endswith("word") and "broken" not in captions
    assert load_manifest(tmp_path / "samples")["rows_skipped"]["bad_image"] == 2


def test_too_many_bad_rows_abort_without_a_manifest(messy_parquet, tmp_path):
    with pytest.raises(BadRowsError, match="3 of 9 rows are unusable"):
        build_samples(_data_cfg(messy_parquet, max_bad_fraction=0.1), tmp_path / "s", progress=False)
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_rebuild_is_reused_and_byte_identical(messy_parquet, tmp_path):
    a = build_samples(_data_cfg(messy_parquet), tmp_path / "a", progress=False)
    b = build_samples(_data_cfg(messy_parquet), tmp_path / "b", progress=False)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    again = build_samples(_data_cfg(messy_parquet), tmp_path / "a", progress=False)
    assert again["created"] == a["created"]  # reused, not rewritten


def test_splits_are_deterministic_and_follow_the_fractions():
    splits = [assign_split(f"x-{i}", 0, 0.1, 0.2) for i in range(5000)]
    assert splits == [assign_split(f"x-{i}", 0, 0.1, 0.2) for i in range(5000)]
    assert abs(splits.count("test") / 5000 - 0.2) < 0.03 and abs(splits.count("val") / 5000 - 0.1) < 0.03
    assert splits != [assign_split(f"x-{i}", 1, 0.1, 0.2) for i in range(5000)]


def test_caption_rules():
    assert clean_caption(b"\xff\xfe bad", 50) == (None, "bad_text")
    assert clean_caption(" \n ", 50) == (None, "empty_caption")
    assert clean_caption("a  b\tc", 50) == ("a b c", None)
    assert clean_caption("one two three", 9) == ("one two", "truncated_caption")
