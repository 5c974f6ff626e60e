"""The collect-soft-targets flow on the tiny config: shard contract, exact soft targets, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from data.shards import ShardError, load_manifest, read_shard, stray_temp_files
from data.targets import LOGPROB_STEP, decode_language_row, decode_vision
from distill.config import teacher_config

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def collected(tiny_collected):
    return tiny_collected


def test_manifests_and_shards_follow_the_contract(collected):
    cfg, summary = collected
    samples = load_manifest(summary["samples_dir"])
    assert samples["kind"] == "samples" and samples["rows"] == 96 + 48
    assert set(samples["splits"]) <= {"train", "val", "test"} and samples["splits"]["train"] > 0
    for name, folder in summary["targets"].items():
        m = load_manifest(folder)  # verifies every sha256
        assert m["producer"]["name"] == name and m["producer"]["weights_digest"]
        assert [s["rows"] for s in m["shards"]] == [s["rows"] for s in samples["shards"]]
        assert [s["id_first"] for s in m["shards"]] == [s["id_first"] for s in samples["shards"]]
        for s in m["shards"]:
            assert Path(folder, s["file"]).name.startswith("shard-") and s["file"].endswith(".arrow")
        assert not stray_temp_files(folder)
    lm = load_manifest(summary["targets"]["lm"])
    assert lm["producer"]["vocab_size"] > 0 and lm["producer"]["tokenizer_digest"] and lm["producer"]["top_k"] == 16
    assert lm["tokens"] > samples["rows"] and lm["bytes_per_token"] > 0
    vit = load_manifest(summary["targets"]["vit"])
    assert lm["modality"] == "language" and vit["modality"] == "vision"  # recorded from the teacher's class
    p, d = vit["shape"]
    assert p == vit["grid"][0] * vit["grid"][1] and len(vit["feature_stats"]["features_mean"]) == d


def test_shards_round_trip_through_pyarrow_and_datasets(collected):
    cfg, summary = collected
    for folder in [summary["samples_dir"], *summary["targets"].values()]:
        shard = Path(folder) / load_manifest(folder)["shards"][0]["file"]
        table = read_shard(shard)
        ds = Dataset.from_file(str(shard))
        assert ds.num_rows == table.num_rows and ds.column_names == table.column_names
        assert ds[0]["id"] == table.column("id")[0].as_py()
    vit = Path(summary["targets"]["vit"]) / "shard-00000.arrow"
    summary_fp16, features = decode_vision(read_shard(vit))
    assert features.dtype == np.float16 and features.shape[0] == read_shard(vit).num_rows
    row = Dataset.from_file(str(vit))[1]
    np.testing.assert_allclose(np.asarray(row["features"], np.float32), features[1].astype(np.float32))


def test_stored_topk_are_the_teachers_true_log_probs(collected):
    cfg, summary = collected
    from teachers.registry import load_teacher
    tcfg = teacher_config(cfg, "lm")
    teacher = load_teacher(tcfg, Path(cfg.cache_dir) / "teachers")
    table = read_shard(Path(summary["targets"]["lm"]) / "shard-00000.arrow")
    for i in range(3):
        row = decode_language_row(table, i)
        ids = torch.tensor(row["token_ids"], dtype=torch.long)[None]
        with torch.no_grad():
            logp = torch.log_softmax(teacher.model(input_ids=ids).logits[0].float(), -1)
        expect = logp.gather(-1, torch.as_tensor(row["topk_ids"].astype(np.int64)))
        # fp16 rounding plus the default q8 grid's half step (data/targets.py)
        np.testing.assert_allclose(row["topk_logprobs"].astype(np.float32), expect.numpy(),
                                   atol=2e-2 + LOGPROB_STEP / 2, rtol=1e-2)
        # top-k plus the tail bucket is a full distribution
        mass = torch.logsumexp(torch.cat([torch.as_tensor(row["topk_logprobs"].astype(np.float32)),
                                          torch.as_tensor(row["tail_logprob"].astype(np.float32))[:, None]], 1), 1)
        np.testing.assert_allclose(mass.numpy(), 0.0, atol=5e-3 + LOGPROB_STEP / 2)
        # and the stored ids really are the k most likely tokens
        assert set(row["topk_ids"][0].tolist()) == set(logp[0].topk(tcfg.top_k).indices.tolist())


def test_rerun_performs_zero_teacher_forwards(collected):
    from flows.collect import run_collect
    cfg, first = collected
    assert all(n > 0 for n in first["forwards"].values())
    again = run_collect(cfg)
    assert again["forwards"] == {name: 0 for name in first["forwards"]}
    n_shards = len(load_manifest(first["samples_dir"])["shards"])
    assert again["shards_reused"] == {name: n_shards for name in first["forwards"]}


def test_collect_run_is_logged_to_mlflow(collected):
    import mlflow
    from mlflow.tracking import MlflowClient
    cfg, summary = collected
    mlflow.set_tracking_uri(cfg.tracking.uri)
    run = MlflowClient().get_run(summary["mlflow_run_id"])
    assert MlflowClient().get_experiment(run.info.experiment_id).name == cfg.tracking.experiment
    assert run.data.params["teachers.language.top_k"] == "16"
    assert run.data.params["teachers.vision.vit.image_size"] == "28"
    assert run.data.metrics["collect/lm/tokens_per_s"] > 0 and run.data.metrics["collect/vit/samples_per_s"] > 0
    assert run.data.metrics["collect/lm/bytes_per_token"] > 0 and run.data.metrics["collect/wall_seconds"] > 0
    assert run.data.tags["mmtp.stage"] == "collect" and run.data.tags["teacher.lm.weights_digest"]
    # the language teacher measured on the val captions against a unigram of the train captions (data/quality.py)
    m = run.data.metrics
    assert m["collect/lm/val_perplexity"] >= 1 and 0 <= m["collect/lm/val_top1_acc"] <= 1
    vocab = load_manifest(summary["targets"]["lm"])["producer"]["vocab_size"]
    assert 1 <= m["collect/lm/val_unigram_perplexity"] < vocab
    assert not any(k.startswith(("collect/vit/val_", "collect/clip/val_")) for k in m)  # language teachers only
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"samples", "targets/lm", "targets/vit",
                                                                    "targets/clip"}


def test_collection_warns_only_for_a_teacher_worse_than_the_unigram(monkeypatch, caplog):
    """The decision (data.quality.worse_than_unigram) and the one warning line it gives at collection."""
    import logging

    from data import quality
    figures = {"teacher_perplexity": 412.3, "teacher_top1_acc": 0.1, "tokens": 10, "1gram_perplexity": 35.1}
    monkeypatch.setattr(quality, "teacher_report", lambda *a, **k: dict(figures))
    with caplog.at_level(logging.WARNING, logger="data.quality"):
        got = quality.collection_metrics("smollm2", "samples", "targets", 100)
    assert got == {"collect/smollm2/val_perplexity": 412.3, "collect/smollm2/val_top1_acc": 0.1,
                   "collect/smollm2/val_unigram_perplexity": 35.1}
    assert [r.getMessage() for r in caplog.records] == [quality.worse_than_unigram("smollm2", 412.3, 35.1)]
    assert "perplexity 412.3 against 35.1" in caplog.records[0].getMessage()
    caplog.clear()
    figures["teacher_perplexity"] = 9.8
    with caplog.at_level(logging.WARNING, logger="data.quality"):
        quality.collection_metrics("smollm2", "samples", "targets", 100)
    assert not caplog.records and quality.worse_than_unigram("smollm2", 9.8, 35.1) is None


def test_corrupt_shard_and_checksum_mismatch_name_the_file(collected, tmp_path):
    import shutil
    cfg, summary = collected
    folder = tmp_path / "lm"
    shutil.copytree(summary["targets"]["lm"], folder)
    shard = folder / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-00001.arrow.*sha256"):
        load_manifest(folder)
    shard.write_bytes(bytes(data[: len(data) // 3]))  # truncated mid-stream
    with pytest.raises(ShardError, match="shard-00001.arrow.*corrupt or truncated"):
        read_shard(shard)
    (folder / "shard-00002.arrow").unlink()
    with pytest.raises(ShardError, match="shard-00001.arrow|shard-00002.arrow"):
        load_manifest(folder)


def test_vocab_mismatch_fails_before_any_compute(prefect_harness, tiny_cfg):
    from flows.collect import run_collect
    from teachers.collect import VocabMismatchError
    cfg = tiny_cfg("student.vocab_size=123")
    with pytest.raises(VocabMismatchError, match=r"student.vocab_size=123 .* vocab \d+"):
        run_collect(cfg)
    assert not Path(cfg.output_dir, "samples").exists()


@pytest.mark.slow
def test_killed_collection_resumes_without_partial_or_duplicate_shards(prefect_harness, tiny_cfg, tmp_path):
    from prefect.settings import PREFECT_API_URL

    from flows.collect import run_collect
    cfg = tiny_cfg("collect.batch_size=4")
    out = Path(cfg.output_dir)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value() or ""}
    args = [sys.executable, "-m", "flows.cli", "collect", "--config", str(TINY), f"output_dir={out}",
            f"cache_dir={cfg.cache_dir}", f"tracking.uri={cfg.tracking.uri}", "collect.batch_size=4"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("targets/*/shard-00001.json")):
        assert proc.poll() is None, "collect finished or died before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.with_suffix(".arrow"): p.with_suffix(".arrow").read_bytes()
                for p in out.glob("targets/*/shard-*.json")}
    assert finished, "the kill came before any shard finished"
    summary = run_collect(cfg)
    assert sum(summary["shards_reused"].values()) >= len(finished)
    for path, data in finished.items():
        assert path.read_bytes() == data  # finished shards were not rewritten
    for folder in [summary["samples_dir"], *summary["targets"].values()]:
        m = load_manifest(folder)
        on_disk = sorted(p.name for p in Path(folder).glob("shard-*.arrow"))
        assert on_disk == sorted(s["file"] for s in m["shards"])
        assert not stray_temp_files(folder) and not list(Path(folder).glob(".*"))
    assert json.loads((out / "samples" / "manifest.json").read_text())["rows"] == 144
    assert not (out / ".mmtp.lock").exists()
