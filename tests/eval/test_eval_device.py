"""The evaluator runs where it is told: an explicit CPU device gives the default call's metrics, and the MTP
figures timed in a fresh process (MKL's default mode) are those of this process."""

import os
from pathlib import Path

import pytest
import torch

import student as student_pkg
from distill.config import shards_path
from distill.eval import (
    default_mkl_env,
    evaluate_student,
    exported_dtype,
    load_eval_data,
    mtp_figures,
    mtp_figures_in_child,
    mtp_prompts,
    speculative_figures,
)


@pytest.fixture(scope="module")
def untrained(tiny_collected):
    """A freshly initialised tiny student on the session's tiny shards, with its eval data."""
    cfg, collected = tiny_collected
    dirs = {n: Path(p) for n, p in collected["targets"].items()}
    test, train, stds = load_eval_data(shards_path(cfg, "samples"), dirs, cfg.student.image_size, True,
                                       cfg.loss.standardize)
    heads = {n: {"summary_dim": len(test.targets[n]["feature_stats"]["summary_mean"]),
                 "feature_dim": test.targets[n]["shape"][1], "grid": test.targets[n]["grid"]} for n in test.vision}
    vocab = test.targets[test.language]["producer"]["vocab_size"]
    config = student_pkg.load_preset(cfg.student.preset, vocab_size=vocab,
                                     mtp_depth=cfg.student.mtp_depth, teachers=heads)
    torch.manual_seed(0)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(dirs[test.language] / "tokenizer"))
    return student_pkg.build_student(config).eval(), test, train, stds, tokenizer


def test_explicit_cpu_device_gives_the_default_metrics(untrained):
    model, test, train, stds, tokenizer = untrained
    default = evaluate_student(model, test, train, tokenizer, stds=stds, batch_size=16)
    explicit = evaluate_student(model, test, train, tokenizer, stds=stds, batch_size=16, device=torch.device("cpu"))
    assert explicit == default
    assert {"eval/agreement/main", "eval/kl/mtp2", "eval/probe/student", "eval/vision/vit/patch_cos"} <= set(default)
    assert next(model.parameters()).device.type == "cpu"
    figures = mtp_figures(model, test, 2, 3, 4, device="cpu")
    assert 1 <= figures["mtp/tokens_per_forward"] <= 3


def test_exported_dtype_is_read_from_the_folder(tmp_path):
    (tmp_path / "config.json").write_text('{"dtype": "bfloat16"}')
    assert exported_dtype(tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text('{"torch_dtype": "float32"}')
    assert exported_dtype(tmp_path) == "float32"


def test_mtp_figures_from_a_fresh_process_equal_this_processs(untrained, tmp_path):
    model, test, *_ = untrained
    model.save_pretrained(tmp_path / "student")
    prompts = mtp_prompts(model.config, test, 2, 3)
    assert len(prompts) == 2 and prompts[0][2].shape == (1, 3)
    here = speculative_figures(model, prompts, 4, "cpu")
    child = mtp_figures_in_child(tmp_path / "student", prompts, 4)  # checks speculative == greedy there too
    speedups = here.pop("mtp/speedup", 1.0), child.pop("mtp/speedup", 1.0)  # absent where timing noise (logged)
    assert child == here and min(speedups) > 0
    assert {"mtp/acceptance_at_1", "mtp/tau"} <= set(child)  # depth 2: only where a depth-1 draft was accepted


def test_the_timing_process_runs_mkl_in_its_default_mode_and_says_why_it_failed(monkeypatch, tmp_path):
    monkeypatch.setenv("MKL_CBWR", "AUTO,STRICT")
    env = default_mkl_env()
    assert "MKL_CBWR" not in env and env["PREFECT_HOME"] == os.environ["PREFECT_HOME"]
    with pytest.raises(RuntimeError, match="MTP timing process for .*missing failed"):
        mtp_figures_in_child(tmp_path / "missing", [], 4)
