"""The tiny pipeline end to end with an image-aware language teacher (kind hf_vlm) in place of the tiny Llama:
for a tiny random LLaVA and a tiny random Idefics3 (tests/teachers/test_vlm.py builds them), collection writes
language targets in the VLM's vocabulary, the student (student.vocab=teacher: the VLM's text vocabulary) trains
a few steps, and evaluation reports the student's and the teacher's perplexity and the grounded accuracy."""

import json
import math
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from transformers import AutoTokenizer

from data.shards import load_manifest
from distill.config import shards_path
from tests.teachers.test_vlm import FAMILIES, save_tiny_vlm


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_pipeline_with_a_vlm_language_teacher(family, prefect_harness, tiny_cfg, tmp_path):
    from flows.pipeline import run_pipeline
    folder = save_tiny_vlm(family, tmp_path / family)
    teacher = f"{{name: vlm, kind: hf_vlm, source: '{folder}', top_k: 16, max_tokens: 32}}"
    cfg = tiny_cfg(f"teachers.language={teacher}", "train.max_steps=4", "train.checkpoint_every=4",
                   "evaluate.probe=false", "evaluate.mtp_prompts=1")
    lang = cfg.teachers.language
    assert (lang.name, lang.kind, lang.source, lang.top_k) == ("vlm", "hf_vlm", str(folder), 16)
    assert cfg.student.vocab == "teacher"
    vocab = len(AutoTokenizer.from_pretrained(folder))

    result = run_pipeline(cfg)

    manifest = load_manifest(shards_path(cfg, "targets", "vlm"))
    assert manifest["modality"] == "language" and manifest["producer"]["kind"] == "hf_vlm"
    assert manifest["producer"]["vocab_size"] == vocab
    summary = json.loads(Path(cfg.output_dir, "train_summary.json").read_text())
    assert summary["steps"] == result["steps"] == 4 and math.isfinite(summary["final_loss"])
    mlflow.set_tracking_uri(cfg.tracking.uri)
    metrics = MlflowClient().get_run(result["evaluate_run_id"]).data.metrics
    for key in ("eval/perplexity", "eval/teacher_perplexity", "eval/grounded_acc"):
        assert math.isfinite(metrics[key]), key
    assert metrics["eval/teacher_perplexity"] > 1 and 0 <= metrics["eval/grounded_acc"] <= 1
    student = json.loads(Path(result["student_dir"], "config.json").read_text())
    assert student["vocab_size"] == vocab  # the student speaks the VLM's text vocabulary
