"""Evaluation: metrics on hand-built cases, grounded-token positions, and the evaluate-student flow."""

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from distill.eval import agreement_and_kl, better, grounded_positions, teacher_caption_nll, teacher_note
from distill.eval.report import report
from distill.losses import SparseTargets


def _targets_from(logits, k):
    logp = logits.log_softmax(-1)
    top = logp.topk(k, -1)
    rest = logp.scatter(-1, top.indices, float("-inf"))
    mask = torch.ones(logits.shape[:2], dtype=torch.bool)
    return SparseTargets(top.indices, top.values, torch.logsumexp(rest, -1), mask)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_a_model_agrees_with_itself_and_has_zero_kl(depth):
    logits = torch.randn(3, 7, 50)
    # the depth-k head at position i predicts what the teacher predicts at i+k
    head = torch.cat([logits[:, depth:], logits[:, :depth]], 1)
    agree, kl, n = agreement_and_kl(head, _targets_from(logits, 8), depth)
    assert n == 3 * (7 - depth) and agree == n and abs(kl) < 1e-4
    other = torch.randn(3, 7, 50)
    agree2, kl2, _ = agreement_and_kl(other, _targets_from(logits, 8), depth)
    assert agree2 < n and kl2 > 0.1


def test_teacher_caption_nll_reads_the_next_token_from_top_k_or_the_tail():
    """Position t scores caption token t+1: its top-k log-prob where the teacher ranked it, else the whole tail
    (an upper bound of its probability); masked positions count nothing."""
    logits = torch.randn(2, 4, 30)
    targets = _targets_from(logits, 5)
    logp = logits.log_softmax(-1)
    nxt = torch.stack([targets.topk_ids[0, :, 2], targets.topk_ids[1, :, 0]])  # in the top-k ...
    nxt[1, 1] = logp[1, 1].argsort()[0]  # ... but after position 1 of row 1: the teacher's least likely token
    ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), nxt[:, :3]], 1)  # position t predicts ids[:, t + 1]
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[:, 3] = False  # nothing after the last token
    mask[0, 2] = False  # padding
    lang = {"topk_ids": targets.topk_ids, "topk_logprobs": targets.topk_logprobs,
            "tail_logprob": targets.tail_logprob, "mask": mask}
    expected = -(logp[0, 0, nxt[0, 0]] + logp[0, 1, nxt[0, 1]] + logp[1, 0, nxt[1, 0]] + targets.tail_logprob[1, 1]
                 + logp[1, 2, nxt[1, 2]])
    assert teacher_caption_nll(lang, ids) == pytest.approx(float(expected), rel=1e-5)
    assert float(targets.tail_logprob[1, 1]) > float(logp[1, 1, nxt[1, 1]])  # the tail bounds the token's log-prob


def test_grounded_positions_find_the_tokens_of_the_word(tiny_collected):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(Path(tiny_collected[1]["targets"]["lm"]) / "tokenizer"))
    ids = [tok.bos_token_id] + tok("a handwritten digit seven on paper.", add_special_tokens=False)["input_ids"]
    pos = grounded_positions(ids, ["seven"], tok)
    assert pos and tok.decode([ids[t] for t in pos]).strip() == "seven"
    assert grounded_positions(ids, ["purple"], tok) == []


def test_report_says_where_kd_does_not_help():
    kd = {"eval/agreement/main": 0.5, "eval/perplexity": 9.0, "eval/probe/pixels": 0.6, "eval/grounded_tokens": 9}
    base = {"eval/agreement/main": 0.4, "eval/perplexity": 8.0, "eval/probe/pixels": 0.6, "eval/grounded_tokens": 9}
    text = report(kd, base, "r", [])
    assert "KD does not help on: eval/perplexity." in text and better("eval/kl/main", 0.1, 0.2)
    assert "| eval/probe/pixels | 0.6000 | 0.6000 | reference |" in text  # the same for both: not a verdict


def test_report_names_the_exact_teacher_figure_the_headline_and_the_bound_secondary():
    m = {"eval/teacher_perplexity": 12.345, "eval/teacher_top1_acc": 0.4, "eval/unigram_perplexity": 40.0,
         "eval/trigram_perplexity": 15.0, "eval/teacher_perplexity_bound": 8.0}
    note = teacher_note(m)
    assert "perplexity 12.35 (exact: the headline teacher figure)" in note and "unigram 40.00, trigram 15.00" in note
    assert "perplexity bound 8.00 (a lower bound" in note
    old = teacher_note({"eval/teacher_perplexity_bound": 8.0})  # shards without token_logprob
    assert "perplexity bound 8.00" in old and "re-run `mmtp collect`" in old
    text = report(m, m, "r", [note])
    assert "| eval/teacher_perplexity | 12.3450 | 12.3450 | reference |" in text
    assert "| eval/teacher_perplexity_bound | 8.0000 | 8.0000 | reference |" in text


@pytest.mark.slow
def test_evaluate_flow_logs_metrics_report_and_baseline(train_cfg):
    from distill.train import run_training
    from flows.evaluate import run_evaluate
    out = Path(train_cfg().output_dir)
    base = run_training(train_cfg("train.max_steps=3", "loss.vision=false", "loss.ce_weight=1.0",
                                  f"output_dir={out.parent / 'baseline'}", f"shards_dir={out}"))
    baseline_dir = base["student_dir"]
    run_training(train_cfg("train.max_steps=3"))  # the KD student in output_dir/student
    result = run_evaluate(train_cfg("evaluate.mtp_prompts=4", f"evaluate.baseline={baseline_dir}"))
    mlflow.set_tracking_uri(train_cfg().tracking.uri)
    run = MlflowClient().get_run(result["mlflow_run_id"])
    m = run.data.metrics
    for key in ("eval/agreement/main", "eval/agreement/mtp2", "eval/kl/mtp1", "eval/perplexity", "eval/grounded_acc",
                "eval/grounded_acc_blank", "eval/vision/vit/patch_cos", "eval/probe/student", "eval/probe/pixels",
                "eval/probe/clip", "baseline/eval/agreement/main", "mtp/acceptance_at_1", "mtp/tau",
                "mtp/tokens_per_forward", "mtp/speedup"):
        assert key in m, key
    # mtp/acceptance_at_2 only where a depth-1 draft was accepted, which 3 steps may not give (distill/eval/mtp_eval.py)
    assert 0 <= m["eval/agreement/main"] <= 1 and m["eval/perplexity"] > 1
    assert m["eval/teacher_perplexity_bound"] == m["baseline/eval/teacher_perplexity_bound"] > 1  # data alone
    # the teacher measured exactly on the test captions (data/quality.py), and its n-gram references
    for key in ("eval/teacher_perplexity", "eval/teacher_top1_acc", "eval/unigram_perplexity",
                "eval/trigram_perplexity"):
        assert key in m and m[key] == m[f"baseline/{key}"], key
    assert m["eval/teacher_perplexity"] >= 1 and 0 <= m["eval/teacher_top1_acc"] <= 1
    assert m["eval/teacher_perplexity"] >= m["eval/teacher_perplexity_bound"]  # the bound is a lower bound
    assert m["eval/unigram_perplexity"] >= 1 and m["eval/trigram_perplexity"] >= 1
    # perplexity at the grounded tokens and at the others (digit and scene captions), the teacher's at the same tokens:
    # each pair brackets its overall figure (a token-weighted mean in log space), the teacher's is data alone
    for key in ("eval/perplexity", "eval/teacher_perplexity"):
        low, high = sorted([m[f"{key}_grounded"], m[f"{key}_other"]])
        assert low * (1 - 1e-9) <= m[key] <= high * (1 + 1e-9), key
    for part in ("grounded", "other"):
        assert m[f"eval/teacher_perplexity_{part}"] == m[f"baseline/eval/teacher_perplexity_{part}"]
        assert f"baseline/eval/perplexity_{part}" in m
    assert "perplexity_grounded / _other" in Path(result["report"]).read_text()
    assert "baseline/eval/vision/vit/patch_cos" not in m  # the CE-only student has no vision heads
    text = Path(result["report"]).read_text()
    assert "| eval/agreement/main |" in text and "CE-only baseline" in text
    assert "(exact: the headline teacher figure)" in text and "perplexity bound" in text
    assert "timed in a fresh process in MKL's default mode" in text  # tests run with MKL_CBWR set, as mmtp does
    assert run.data.tags["mtp_timing"] == "fresh process, MKL default mode"
    assert {"eval_report.md", "plots"} <= {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    plots = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/probe.png", "plots/acceptance.png"}
    assert 1 <= m["mtp/tokens_per_forward"] <= 3
