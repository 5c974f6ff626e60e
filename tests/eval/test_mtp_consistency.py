"""The MTP figures agree with each other: no speed-up without accepted drafts, figures that cannot be measured are
left out with a logged reason, and the timing process gets an absolute student path."""

import json
import logging
import subprocess
from pathlib import Path

import pytest
import torch

import student
from distill.eval import mtp_eval, mtp_figures_in_child, speculative_figures


@torch.no_grad()
def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    config = student.load_preset("tiny", vocab_size=256, mtp_depth=2, initializer_range=0.2, **overrides)
    return student.CogViTMTPForDistillation(config).eval()


@torch.no_grad()
def never_accepting():
    """Every draft is token 0 (zero MTP output norms: all draft scores tie, the first wins), and token 0's embedding,
    the tied head row, is zero, so its main-head logit is exactly 0 while some other token scores above 0."""
    model = tiny(seed=2)
    model.decoder.embed_tokens.weight[0].zero_()
    for m in model.mtp:
        m.norm.weight.zero_()
    return model


def prompts(n=3):
    g = torch.Generator().manual_seed(1)
    return [(i, torch.randn(1, 3, 28, 28, generator=g), torch.randint(1, 256, (1, 3), generator=g)) for i in range(n)]


def test_all_rejected_drafts_give_no_speedup(caplog):
    model = never_accepting()
    with caplog.at_level(logging.WARNING, "distill.eval.mtp_eval"):
        f = speculative_figures(model, prompts(), 9, "cpu")
    assert f["mtp/acceptance_at_1"] == 0.0 and f["mtp/tokens_per_forward"] == 1.0 and f["mtp/tau"] == 1.0
    assert "mtp/acceptance_at_2" not in f  # depth 2 drafts only count after an accepted depth-1 draft
    assert "mtp/acceptance_at_2 absent" in caplog.text
    assert f.get("mtp/speedup", 0.0) <= 1 + mtp_eval.NOISE  # drafting costs: never a gain


def test_prefill_only_decoding_reports_no_tau_or_speedup(caplog):
    """The issue's case: every first token is eos, so no verification round ran and both timings are one prefill;
    they used to give tau 0.0 and a speed-up of noise (2.23)."""
    model = tiny(eos_token_id=0)
    with torch.no_grad():
        model.decoder.norm.weight.zero_()  # all main-head logits 0: token 0, eos, first
    with caplog.at_level(logging.WARNING, "distill.eval.mtp_eval"):
        f = speculative_figures(model, prompts(), 24, "cpu")
    assert f == {"mtp/tokens_per_forward": 1.0}
    assert "mtp/tau, mtp/speedup absent: every prompt ended at its first token" in caplog.text
    assert speculative_figures(model, [], 24, "cpu") == {}


def test_a_speedup_above_tokens_per_forward_is_noise_and_left_out(monkeypatch, caplog):
    ticks = iter([0.0, 10.0, 10.0, 11.0])  # greedy (run first) 10 s, speculative 1 s
    monkeypatch.setattr(mtp_eval, "_clock", lambda device: next(ticks))
    with caplog.at_level(logging.WARNING, "distill.eval.mtp_eval"):
        f = speculative_figures(never_accepting(), prompts(1), 9, "cpu", repeats=1)
    assert "mtp/speedup" not in f and "timing noise" in caplog.text


def test_the_timing_process_gets_an_absolute_student_path(monkeypatch, tmp_path, caplog):
    seen = {}

    def child(args, cwd, **kwargs):
        seen.update(torch.load(args[-2], weights_only=True), cwd=cwd)
        Path(args[-1]).write_text(json.dumps({"figures": {"mtp/tokens_per_forward": 1.0}, "reasons": ["why"]}))
        return subprocess.CompletedProcess(args, 0, "", "")

    (tmp_path / "student").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mtp_eval.subprocess, "run", child)
    with caplog.at_level(logging.WARNING, "distill.eval.mtp_eval"):
        assert mtp_figures_in_child("student", [], 4) == {"mtp/tokens_per_forward": 1.0}
    assert seen["folder"] == str(tmp_path.resolve() / "student") and Path(seen["cwd"]) != tmp_path
    assert "why" in caplog.text  # the child's reasons are logged here


@pytest.mark.slow
def test_a_relative_folder_is_evaluated_by_the_timing_process(monkeypatch, tmp_path, caplog):
    never_accepting().save_pretrained(tmp_path / "student")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, "distill.eval.mtp_eval"):
        f = mtp_figures_in_child("student", prompts(2), 9)
    assert f["mtp/acceptance_at_1"] == 0.0 and f["mtp/tokens_per_forward"] == 1.0
    assert f.get("mtp/speedup", 0.0) <= 1 + mtp_eval.NOISE and "mtp/acceptance_at_2 absent" in caplog.text
