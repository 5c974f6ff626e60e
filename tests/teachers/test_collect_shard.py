"""collect_shard with real tiny teachers: the vision batches prepared a batch ahead (or in line) give the same
rows as `rows`, a failing decode surfaces, and language shards carry the configured encoding and tempered tails."""

import io
import os
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from data.shards import read_shard, write_shard
from data.targets import LogprobEncoding, decode_language_row, decode_vision, language_encoding
from teachers.collect import collect_shard, prefetch_thread, spare_capacity
from teachers.language import HFCausalLMTeacher
from teachers.tiny import ensure_tiny_teacher
from teachers.vision import HFVisionTeacher


def png(seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def samples_shard(path, n, bad=None):
    images = [b"not a png" if i == bad else png(i) for i in range(n)]
    table = pa.table({"id": [f"s{i:03d}" for i in range(n)], "image": images,
                      "caption": [f"a picture number {i} of a red square." for i in range(n)]})
    write_shard(path, table)
    return path


@pytest.mark.parametrize("prefetch", [True, False])
def test_vision_collection_equals_rows_with_and_without_the_prefetch_thread(tmp_path, cache_dir, prefetch):
    teacher = HFVisionTeacher(dict(name="vis", kind="hf_vision", source=str(ensure_tiny_teacher("vit", cache_dir)),
                                   image_size=32), cache_dir)
    src = samples_shard(tmp_path / "shard-00000.arrow", 11)
    entry = collect_shard(teacher, src, tmp_path / "out", producer_digest="t", batch_size=4, progress=False,
                          prefetch=prefetch)
    assert entry["forwards"] == 3 and entry["rows"] == 11
    summary, features = decode_vision(read_shard(tmp_path / "out" / "shard-00000.arrow"))
    want = teacher.rows(read_shard(src).to_pylist())
    np.testing.assert_allclose(features.astype(np.float32), np.stack([r["features"] for r in want]),
                               rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(summary.astype(np.float32), np.stack([r["summary"] for r in want]), rtol=1e-3, atol=1e-3)


def test_the_prefetch_thread_runs_only_with_a_spare_core_or_an_accelerator(monkeypatch):
    cpu, gpu = SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert not spare_capacity(cpu) and spare_capacity(gpu)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert spare_capacity(cpu)
    # a teacher without prepare/rows_from never gets the thread; an explicit setting wins over the rule
    split = SimpleNamespace(device=torch.device("cpu"), prepare=lambda b: b, rows_from=lambda p: p)
    assert prefetch_thread(split, None) and not prefetch_thread(split, False)
    assert not prefetch_thread(cpu, True) and not prefetch_thread(gpu, None)


@pytest.mark.parametrize("prefetch", [True, False])
def test_a_bad_image_surfaces_with_and_without_the_prefetch_thread(tmp_path, cache_dir, prefetch):
    teacher = HFVisionTeacher(dict(name="vis", kind="hf_vision", source=str(ensure_tiny_teacher("vit", cache_dir)),
                                   image_size=32), cache_dir)
    src = samples_shard(tmp_path / "shard-00000.arrow", 9, bad=6)
    with pytest.raises(ValueError, match="cannot be decoded"):
        collect_shard(teacher, src, tmp_path / "out", producer_digest="t", batch_size=4, progress=False,
                      prefetch=prefetch)
    assert not (tmp_path / "out" / "shard-00000.arrow").exists()


@pytest.mark.parametrize("encoding", list(LogprobEncoding))
def test_language_shard_carries_its_encoding_and_tempered_tails(tmp_path, cache_dir, encoding):
    source = str(ensure_tiny_teacher("llama", cache_dir))
    teacher = HFCausalLMTeacher(dict(name="lm", kind="hf_causal_lm", source=source, top_k=8,
                                     tail_temperatures=[2.0, 4.0], logprob_encoding=encoding.value), cache_dir)
    src = samples_shard(tmp_path / "shard-00000.arrow", 5)
    collect_shard(teacher, src, tmp_path / "out", producer_digest="t", batch_size=2, progress=False)
    table = read_shard(tmp_path / "out" / "shard-00000.arrow")
    assert language_encoding(table.schema)[0] == encoding and language_encoding(table.schema)[2] == (2.0, 4.0)
    want = teacher.rows(read_shard(src).to_pylist())
    for i, r in enumerate(want):
        d = decode_language_row(table, i)
        np.testing.assert_allclose(d["tempered_tail"].astype(np.float32), r["tempered_tail"], rtol=1e-3, atol=1e-3)
        assert (np.sort(d["topk_ids"], 1) == np.sort(r["topk_ids"], 1)).all()
