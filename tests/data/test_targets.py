"""Language target encodings: round trips, their error bound, old shards, and the tempered tail's path
through decode and collate into the loss."""

import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from data.dataset import collate
from data.shards import read_shard, write_shard
from data.targets import (
    LOGPROB_STEP,
    LogprobEncoding,
    decode_language_row,
    language_bytes_per_token,
    language_encoding,
    language_schema,
    language_table,
)
from distill.losses import SparseTargets, language_kd_loss
from student.pixels import image_transform

V, K, TAUS = 3000, 16, (2.0, 4.0)


def rows(n=5, seed=0, peaked=False):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = 3 + i
        z = rng.standard_normal((L, V)) * (12.0 if peaked else 3.0)
        logp = z - np.logaddexp.reduce(z, 1, keepdims=True)
        ids = np.argsort(-logp, 1)[:, :K]
        top = np.take_along_axis(logp, ids, 1)
        rest = z.copy()
        np.put_along_axis(rest, ids, -np.inf, 1)
        tail = np.logaddexp.reduce(rest, 1) - np.logaddexp.reduce(z, 1)
        top_z = np.take_along_axis(z, ids, 1)
        tempered = np.stack([np.logaddexp.reduce(rest / t, 1) - np.logaddexp.reduce(top_z / t, 1) for t in TAUS], 1)
        out.append({"token_ids": rng.integers(0, V, L).astype(np.int32), "topk_ids": ids.astype(np.int32),
                    "topk_logprobs": top.astype(np.float32), "tail_logprob": tail.astype(np.float32),
                    "tempered_tail": tempered.astype(np.float32)})
    return out


def roundtrip(tmp_path, rs, encoding, taus=()):
    table = language_table([f"r{i}" for i in range(len(rs))], rs, V, K, encoding, taus)
    write_shard(tmp_path / "t.arrow", table, "zstd", batch_rows=len(rs))
    table = read_shard(tmp_path / "t.arrow")
    return table, [decode_language_row(table, i) for i in range(len(rs))]


@pytest.mark.parametrize("encoding", list(LogprobEncoding))
@pytest.mark.parametrize("peaked", [False, True])
def test_encodings_round_trip_within_their_step(tmp_path, encoding, peaked):
    rs = rows(peaked=peaked)
    table, dec = roundtrip(tmp_path, rs, encoding)
    assert language_encoding(table.schema)[0] == encoding
    for r, d in zip(rs, dec, strict=True):
        assert (d["token_ids"] == r["token_ids"]).all()
        assert np.allclose(d["tail_logprob"], r["tail_logprob"], rtol=1e-3)
        assert (np.diff(d["topk_logprobs"].astype(np.float32), axis=1) <= 0).all()  # still descending
        # the same ids carry the same values, whatever order the encoding stored them in
        got = np.take_along_axis(d["topk_logprobs"].astype(np.float64), np.argsort(d["topk_ids"], 1), 1)
        want = np.take_along_axis(r["topk_logprobs"].astype(np.float64), np.argsort(r["topk_ids"], 1), 1)
        assert (np.sort(d["topk_ids"], 1) == np.sort(r["topk_ids"], 1)).all()
        tol = 1e-3 * np.abs(want) if encoding == LogprobEncoding.fp16 else LOGPROB_STEP / 2 + 1e-6
        # the q8 grid saturates 16 nats down (mass below 1e-7), always upwards
        keep = (want > -15.5) | (encoding == LogprobEncoding.fp16)
        assert (np.abs(got - want) <= tol)[keep].all()
        assert (got[~keep] >= want[~keep] - LOGPROB_STEP / 2 - 1e-6).all()


def test_lossy_encodings_are_smaller(tmp_path):
    rs = rows(20)
    sizes = {e: write_shard(tmp_path / f"{e.value}.arrow", language_table([str(i) for i in range(20)], rs, V, K, e),
                            "zstd", 20)["bytes"] for e in LogprobEncoding}
    assert sizes[LogprobEncoding.q8] < sizes[LogprobEncoding.fp16]
    assert language_bytes_per_token(V, K, "q8") == K * 3 + 2 + 4
    assert language_bytes_per_token(V, K, "fp16", 2) == K * 4 + 6 + 4


def test_old_shards_without_metadata_still_decode(tmp_path):
    rs = rows(2)
    old = pa.schema([f.remove_metadata() for f in language_schema(V, K)])
    table = language_table(["a", "b"], rs, V, K).cast(old).replace_schema_metadata(None)
    write_shard(tmp_path / "old.arrow", table, "zstd")
    d = decode_language_row(read_shard(tmp_path / "old.arrow"), 1)
    assert set(d) == {"token_ids", "topk_ids", "topk_logprobs", "tail_logprob"}
    encoding, _, temps = language_encoding(read_shard(tmp_path / "old.arrow").schema)
    assert encoding == LogprobEncoding.fp16 and temps == ()
    assert (d["topk_logprobs"] == rs[1]["topk_logprobs"].astype(np.float16)).all()


def test_tempered_tail_needs_every_row(tmp_path):
    rs = rows(2)
    del rs[1]["tempered_tail"]
    with pytest.raises(ValueError, match="row 1: tempered_tail"):
        language_table(["a", "b"], rs, V, K, "q8", TAUS)


def item(d, temps):
    lang = {"topk_ids": torch.from_numpy(d["topk_ids"].astype(np.int64)),
            "topk_logprobs": torch.from_numpy(d["topk_logprobs"].astype(np.float32)),
            "tail_logprob": torch.from_numpy(d["tail_logprob"].astype(np.float32))}
    if temps:
        lang.update(tempered_tail=torch.from_numpy(d["tempered_tail"].astype(np.float32)), tail_temperatures=temps)
    return {"id": "x", "label": 0, "pixel_values": torch.zeros(3, 4, 4), "vision": {},
            "input_ids": torch.from_numpy(d["token_ids"].astype(np.int64)), "lang": lang}


def test_tempered_tail_travels_through_decode_and_collate_into_the_loss(tmp_path):
    rs = rows(3)
    table, dec = roundtrip(tmp_path, rs, LogprobEncoding.q8_sorted, TAUS)
    temps = language_encoding(table.schema)[2]
    assert temps == TAUS and dec[0]["tempered_tail"].shape == (3, 2)
    batch = collate([item(d, temps) for d in dec])
    lang = batch["lang"]
    assert lang["tail_temperatures"] == TAUS and lang["tempered_tail"].shape == (3, 5, 2)
    targets = SparseTargets.from_mapping(lang)
    student = torch.randn(3, 5, V, generator=torch.Generator().manual_seed(0))
    exact = language_kd_loss(student, targets, temperature=4.0)
    approx = language_kd_loss(student, SparseTargets(*[getattr(targets, n) for n in
                                                       ("topk_ids", "topk_logprobs", "tail_logprob", "mask")]),
                              temperature=4.0)
    assert torch.isfinite(exact) and not torch.isclose(exact, approx, rtol=1e-3)
    # a batch mixing shards with and without the column falls back to the approximation for all rows
    mixed = collate([item(dec[0], temps), item(dec[1], ())])["lang"]
    assert "tempered_tail" not in mixed


@pytest.mark.slow
def test_collected_tempered_tails_reach_the_training_batch(prefect_harness, tiny_cfg):
    from data.dataset import DistillDataset
    from distill.config import shards_path, teacher_configs
    from flows.collect import run_collect

    cfg = tiny_cfg("teachers.language.tail_temperatures=[2.0]", "collect.progress=false")
    run_collect(cfg)
    names = [t.name for t in teacher_configs(cfg)]
    ds = DistillDataset(shards_path(cfg, "samples"), {n: shards_path(cfg, "targets", n) for n in names}, "train",
                        transform=image_transform(cfg.student.image_size))
    lang = collate([ds[i] for i in range(4)])["lang"]
    assert lang["tail_temperatures"] == (2.0,) and lang["tempered_tail"].shape[:2] == lang["mask"].shape
    assert ds.targets[ds.language]["producer"]["tail_temperatures"] == [2.0]
    targets = SparseTargets.from_mapping(lang)
    student = torch.randn(*lang["mask"].shape, ds.targets[ds.language]["producer"]["vocab_size"])
    exact = language_kd_loss(student, targets, temperature=2.0)
    plain = SparseTargets(targets.topk_ids, targets.topk_logprobs, targets.tail_logprob, targets.mask)
    assert torch.isfinite(exact) and exact != language_kd_loss(student, plain, temperature=2.0)
    # bench/collect.py --targets re-encodes those shards: every encoding with its size and error
    import json
    import subprocess
    import sys
    folder = shards_path(cfg, "targets", ds.language)
    cmd = [sys.executable, "bench/collect.py", "--config", "configs/tiny.yaml", "--targets", str(folder)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    figures = json.loads(out.stdout)["encodings"]
    assert set(figures) == {e.value for e in LogprobEncoding}
    # the shards were written as q8_sorted: its grid values re-encode exactly in every encoding
    for name in ("fp16", "q8", "q8_sorted"):
        assert figures[name]["kl_error_nats"] == {"max": 0.0, "mean": 0.0}
    for name in ("q8", "q8_sorted"):
        assert figures[name]["bytes_per_token"] < figures["fp16"]["bytes_per_token"]
