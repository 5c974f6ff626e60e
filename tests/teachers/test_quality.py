"""data/quality.py: the teacher's exact figures from token_logprob, the interpolated n-gram references, and
teacher_report on real tiny shards checked against the tiny teacher model itself."""

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data import quality
from data.quality import (
    MIN_WEIGHT,
    NGram,
    exact_figures,
    ngram_perplexity,
    rows_by_split,
    teacher_report,
    worse_than_unigram,
)

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
NAN = float("nan")


def row(tokens, token_logprob, top1):
    """A decoded language row: top-k of width 2 whose first column is `top1`."""
    top1 = np.asarray(top1, np.uint16)
    return {"token_ids": np.asarray(tokens, np.int32), "topk_ids": np.stack([top1, top1 + 1], 1),
            "token_logprob": np.asarray(token_logprob, np.float16)}


def test_exact_figures_by_hand():
    """Position j scores token j+1; the last position (NaN: nothing follows) is left out."""
    rows = [row([2, 10, 11, 3], [-1.0, -2.0, -0.5, NAN], [10, 5, 3, 11]),  # hits at 0 and 2; 11 at the end: no token
            row([2, 12, 3], [-3.0, -0.25, NAN], [12, 4, 3])]  # hit at 0
    got = exact_figures(rows)
    assert got["tokens"] == 5
    assert got["perplexity"] == pytest.approx(math.exp((1 + 2 + 0.5 + 3 + 0.25) / 5), rel=1e-12)
    assert got["top1_acc"] == pytest.approx(3 / 5)
    assert math.isnan(exact_figures([])["perplexity"]) and exact_figures([])["tokens"] == 0


def test_rows_without_token_logprob_say_to_recollect():
    old = {k: v for k, v in row([2, 10, 3], [-1.0, -1.0, NAN], [10, 3, 3]).items() if k != "token_logprob"}
    with pytest.raises(ValueError, match=r"no token_logprob column .*re-run `mmtp collect`"):
        exact_figures([old])


@pytest.mark.parametrize("kind", ["eval", "collect"])
def test_old_shards_give_no_figures_and_one_warning(kind, monkeypatch, caplog):
    old = {k: v for k, v in row([2, 10, 3], [-1.0, -1.0, NAN], [10, 3, 3]).items() if k != "token_logprob"}
    monkeypatch.setattr(quality, "rows_by_split", lambda s, t, splits: {k: [old] for k in splits})
    with caplog.at_level(logging.WARNING, logger="data.quality"):
        got = (quality.eval_metrics("s", "t", 20) if kind == "eval" else
               quality.collection_metrics("lm", "s", "t", 20))
    assert got == {}
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "re-run `mmtp collect`" in caplog.records[0].getMessage()


CORPUS = [[0, 1, 2, 3, 1, 2, 4], [0, 2, 3, 1, 2, 3, 4], [0, 1, 1, 2, 4], [0, 3, 2, 1, 4]]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ngram_probabilities_sum_to_one_for_any_weights(n):
    """Seen, unseen and too-short contexts alike: orders without a train context back off to the order below."""
    vocab = 7  # ids 5 and 6 never occur in train
    model = NGram(CORPUS, n, vocab)
    rng = np.random.default_rng(0)
    for weights in [np.full(n + 1, 1 / (n + 1)), np.eye(n + 1)[-1], *rng.dirichlet(np.ones(n + 1), 5)]:
        model.weights = weights
        for ctx in [(), (0,), (1, 2), (2, 3), (6, 5), (4, 4), (0, 1, 2, 3)]:
            total = sum(model.prob(ctx, tok) for tok in range(vocab))
            assert total == pytest.approx(1.0, abs=1e-12), (weights, ctx)


def test_em_weights_sum_to_one_and_beat_uniform_on_the_held_out_rows():
    val = [[0, 1, 2, 3, 4], [0, 2, 1, 2, 3, 4], [0, 3, 1, 4]]
    uniform = NGram(CORPUS, 3, 7)
    fitted = NGram(CORPUS, 3, 7).fit_weights(val)
    assert fitted.weights.sum() == pytest.approx(1.0) and (fitted.weights >= MIN_WEIGHT / 2).all()
    assert fitted.perplexity(val) <= uniform.perplexity(val)
    assert NGram(CORPUS, 3, 7).fit_weights([]).weights == pytest.approx(np.full(4, 0.25))  # no val rows: uniform
    # a token unseen in train and val still costs a bounded amount: order 0 keeps a floor weight
    assert fitted.perplexity([[0, 6]]) < 2 * 7 / MIN_WEIGHT


def test_on_a_repetitive_corpus_the_trigram_beats_the_unigram():
    rng = np.random.default_rng(1)
    cycle = [1, 2, 3, 4, 5, 2, 1, 4]  # every token twice-ish: the unigram is flat, the trigram knows what comes

    def rows(k):
        out = []
        for _ in range(k):
            start = int(rng.integers(len(cycle)))
            out.append([0] + [cycle[(start + i) % len(cycle)] for i in range(12)])
        return out
    train, val, test = rows(40), rows(10), rows(10)
    tri, uni = ngram_perplexity(train, val, test, 3, 16), ngram_perplexity(train, val, test, 1, 16)
    assert tri < 0.5 * uni and 1 <= tri


def test_worse_than_unigram_warns_with_both_figures():
    message = worse_than_unigram("smollm2", 412.31, 35.12)
    assert message.startswith("teacher 'smollm2' is worse on the val captions than a unigram")
    assert "412.3 against 35.1" in message and "docs/teachers.md" in message
    assert worse_than_unigram("smollm2", 9.8, 35.1) is None
    assert worse_than_unigram("smollm2", 35.1, 35.1) is None
    assert worse_than_unigram("smollm2", NAN, 35.1) is None  # no val rows: nothing to say


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory, llama_dir, cache_dir):
    """The tiny config's samples and the tiny language teacher's target shards (fp16 top-k), without the flow."""
    from data.samples import build_samples
    from distill.config import load_config, to_container
    from teachers.collect import collect_shard, finalize_targets
    from teachers.language import HFCausalLMTeacher
    root = tmp_path_factory.mktemp("quality")
    cfg = load_config(TINY, [f"output_dir={root}", f"cache_dir={cache_dir}"])
    samples = build_samples(to_container(cfg)["data"], root / "samples", cfg.seed, progress=False)
    teacher = HFCausalLMTeacher(dict(name="lm", kind="hf_causal_lm", source=str(llama_dir), top_k=8,
                                     max_tokens=32, logprob_encoding="fp16"), cache_dir)
    entries = [collect_shard(teacher, root / "samples" / s["file"], root / "lm", producer_digest="t",
                             batch_size=16, progress=False) for s in samples["shards"]]
    finalize_targets(teacher, root / "lm", samples, entries, config_digest="t", collect_options={})
    return root / "samples", root / "lm", teacher


def test_teacher_report_is_the_teachers_own_perplexity(tiny_shards):
    samples_dir, target_dir, teacher = tiny_shards
    got = teacher_report(samples_dir, target_dir, "test", teacher.vocab_size)
    test_rows = rows_by_split(samples_dir, target_dir, {"test"})["test"]
    assert test_rows and got["tokens"] == sum(len(r["token_ids"]) - 1 for r in test_rows)
    p = len(teacher.prompt_ids)
    nll, hits, n = 0.0, 0, 0
    with torch.no_grad():
        for r in test_rows:
            ids = r["token_ids"].tolist()
            full = torch.tensor(teacher.scored_inputs([ids]))
            logp = torch.log_softmax(teacher.model(input_ids=full).logits[0].double(), -1)
            for j in range(len(ids) - 1):  # the logits at p-1+j predict stored token j+1
                nll -= float(logp[p - 1 + j, ids[j + 1]])
                hits += int(logp[p - 1 + j].argmax() == ids[j + 1])
                n += 1
    assert got["tokens"] == n
    assert got["teacher_perplexity"] == pytest.approx(math.exp(nll / n), rel=2e-3)  # fp16-stored log-probs
    assert got["teacher_top1_acc"] == pytest.approx(hits / n)
    assert {"1gram_perplexity", "3gram_perplexity"} <= got.keys()
    assert 1 <= got["3gram_perplexity"] < teacher.vocab_size and 1 <= got["1gram_perplexity"] < teacher.vocab_size
    # the samples' grounded words travel with the rows and split the exact figure at their tokens
    # (distill/eval/evaluate.py)
    from distill.eval import grounded_positions

    def positions(ids, words):
        return grounded_positions(ids, words, teacher.tokenizer)
    assert any(r["grounded"] for r in test_rows)  # digit and scene captions
    split = quality.teacher_grounded_split(test_rows, positions)
    assert split.n[0] > 0 and sum(split.n) == n
    with_split = teacher_report(samples_dir, target_dir, "test", teacher.vocab_size, positions=positions)
    g, o = with_split["teacher_perplexity_grounded"], with_split["teacher_perplexity_other"]
    assert math.exp((split.n[0] * math.log(g) + split.n[1] * math.log(o)) / n) == pytest.approx(
        got["teacher_perplexity"], rel=1e-9)
    # the collect run's figures: on val, against the unigram; a random teacher is worse, so it warns
    val = quality.collection_metrics("lm", samples_dir, target_dir, teacher.vocab_size)
    assert set(val) == {"collect/lm/val_perplexity", "collect/lm/val_top1_acc", "collect/lm/val_unigram_perplexity"}
