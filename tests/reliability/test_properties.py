"""Property tests: shard round trips for random schemas and sizes; sparse KD invariants."""

import numpy as np
import pyarrow as pa
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.shards import read_shard, write_shard
from data.targets import decode_language_row, language_table
from distill.losses import KINDS, SparseTargets, language_kd_loss

TYPES = [pa.int32(), pa.int64(), pa.float16(), pa.float32(), pa.string(), pa.binary(), pa.list_(pa.int32())]


def _column(draw, typ, n):
    if typ == pa.string():
        return draw(st.lists(st.text(max_size=12), min_size=n, max_size=n))
    if typ == pa.binary():
        return draw(st.lists(st.binary(max_size=20), min_size=n, max_size=n))
    if typ == pa.list_(pa.int32()):
        return draw(st.lists(st.lists(st.integers(-2**31, 2**31 - 1), max_size=5), min_size=n, max_size=n))
    if pa.types.is_integer(typ):
        bits = typ.bit_width - 1
        return draw(st.lists(st.integers(-2**bits, 2**bits - 1), min_size=n, max_size=n))
    width = 16 if typ == pa.float16() else 32
    return draw(st.lists(st.floats(allow_nan=False, width=width), min_size=n, max_size=n))


@st.composite
def tables(draw):
    n = draw(st.integers(0, 40))
    types = draw(st.lists(st.sampled_from(TYPES), min_size=1, max_size=5))
    arrays = [pa.array([f"id-{i}" for i in range(n)], pa.string())]
    arrays += [pa.array(_column(draw, t, n), t) for t in types]
    return pa.Table.from_arrays(arrays, names=["id"] + [f"c{i}" for i in range(len(types))])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=tables(), compression=st.sampled_from([None, "zstd", "lz4"]), batch_rows=st.integers(1, 50))
def test_shard_round_trip_for_random_schemas(tmp_path, table, compression, batch_rows):
    path = tmp_path / "shard-00000.arrow"
    entry = write_shard(path, table, compression, batch_rows)
    back = read_shard(path)
    assert back.equals(table)
    assert entry["rows"] == table.num_rows
    assert not list(tmp_path.glob(".*tmp*"))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 8), vocab=st.sampled_from([16, 70000]),
       lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4))
def test_language_rows_round_trip(seed, k, vocab, lengths):
    rng = np.random.default_rng(seed)
    rows = [{"token_ids": rng.integers(0, vocab, n).astype(np.int32),
             "topk_ids": np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)]),
             "topk_logprobs": -rng.random((n, k)) * 10, "tail_logprob": -rng.random(n)} for n in lengths]
    table = language_table([f"r{i}" for i in range(len(rows))], rows, vocab, k)
    for i, row in enumerate(rows):
        got = decode_language_row(table, i)
        np.testing.assert_array_equal(got["token_ids"], row["token_ids"])
        np.testing.assert_array_equal(got["topk_ids"].astype(np.int64), row["topk_ids"])
        np.testing.assert_allclose(got["topk_logprobs"], row["topk_logprobs"].astype(np.float16))


def _targets_from(logits, k):
    logp = logits.log_softmax(-1)
    top = logp.topk(k, -1)
    rest = logp.scatter(-1, top.indices, float("-inf"))
    return SparseTargets(top.indices, top.values, torch.logsumexp(rest, -1),
                         torch.ones(logits.shape[:2], dtype=torch.bool))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), vocab=st.integers(2, 40), scale=st.floats(0.1, 8.0),
       kind=st.sampled_from(KINDS), temperature=st.sampled_from([0.5, 1.0, 2.0]), data=st.data())
def test_sparse_kd_invariants(seed, vocab, scale, kind, temperature, data):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(2, 3, vocab, generator=g, dtype=torch.float64) * scale
    student = torch.randn(2, 3, vocab, generator=g, dtype=torch.float64) * scale
    k = data.draw(st.integers(1, vocab))
    t = _targets_from(teacher, k)
    loss = language_kd_loss(student, t, kind, temperature)
    assert loss >= -1e-6  # non-negative
    assert language_kd_loss(teacher, t, kind, 1.0).abs() < 1e-5  # zero for the teacher's own logits
    # at k = vocab the sparse loss is the dense one
    full = _targets_from(teacher, vocab)
    p, q = teacher.log_softmax(-1), student.log_softmax(-1)
    dense = {"forward_kl": (p.exp() * (p - q)).sum(-1), "reverse_kl": (q.exp() * (q - p)).sum(-1)}
    if kind in dense:
        torch.testing.assert_close(language_kd_loss(student, full, kind, 1.0).double(),
                                   dense[kind].mean(), rtol=1e-5, atol=1e-5)
