"""A language teacher measured on the data before it teaches: exact perplexity and top-1 accuracy from its
target shards, and n-gram references fitted on the train captions to hold it against.

The figures are exact: every stored position has `token_logprob`, the teacher's log-probability of the
actual next token, so no bound is involved. Positions are those the student is scored on: each caption
token and the end of the row (stored position j predicts token j+1; the last position predicts nothing).

The perplexity is also split at the caption tokens that spell a grounded word (one only the image tells: the
samples' `grounded` column) and at every other caption token (`GroundedSplit`): a teacher that cannot see the
image has a grounded perplexity far above its other one. The student's (distill/eval/evaluate.py) is split at the
same tokens.

The references are interpolated n-gram models over the same token ids (Jelinek-Mercer: orders 0 (uniform
over the vocabulary) to n, with weights fitted by EM on the val rows, then scored on the eval rows).
docs/teachers.md, "Measuring a teacher".
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

from data.shards import load_manifest, read_shard
from data.targets import decode_language_row

log = logging.getLogger(__name__)
MIN_WEIGHT = 1e-4  # no interpolation weight below this: see NGram.fit_weights


class NoTokenLogprob(ValueError):
    """Target shards collected before `token_logprob` existed: the teacher cannot be measured exactly."""


def rows_by_split(samples_dir: str | Path, target_dir: str | Path, splits: set[str]) -> dict[str, list[dict]]:
    """The decoded target rows of the samples in `splits`, per split (target shards mirror the samples shards),
    each with its sample's grounded words (`grounded`)."""
    samples_dir, target_dir = Path(samples_dir), Path(target_dir)
    out: dict[str, list[dict]] = {s: [] for s in splits}
    for entry in load_manifest(target_dir)["shards"]:
        samples = read_shard(samples_dir / entry["file"])
        split, grounded = samples.column("split").to_pylist(), samples.column("grounded").to_pylist()
        table = read_shard(target_dir / entry["file"])
        for i, s in enumerate(split):
            if s in splits:
                out[s].append({**decode_language_row(table, i), "grounded": grounded[i] or []})
    return out


def exact_figures(rows: list[dict]) -> dict[str, float]:
    """Exact perplexity and top-1 accuracy of the teacher that wrote `rows` on their own tokens.

    Top-1 compares the next token with the first of the decoded top-k; with a lossy log-prob encoding
    (q8, 1/16-nat grid) two candidates within one grid step can swap places, so it may be off there."""
    nll, hits, n = 0.0, 0, 0
    for r in rows:
        if "token_logprob" not in r:
            raise NoTokenLogprob("these target shards have no token_logprob column (collected before it existed); "
                                 "re-run `mmtp collect` to measure the teacher exactly")
        lp = r["token_logprob"][:-1].astype(np.float64)  # the last position predicts nothing (NaN)
        nll -= float(lp.sum())
        hits += int((r["topk_ids"][:-1, 0] == r["token_ids"][1:]).sum())
        n += len(lp)
    if n == 0:
        return {"perplexity": float("nan"), "top1_acc": float("nan"), "tokens": 0}
    return {"perplexity": math.exp(nll / n), "top1_acc": hits / n, "tokens": n}


class GroundedSplit:
    """Perplexity at the caption tokens that spell a grounded word and at every other caption token, from the
    per-token negative log-likelihoods of one model, row by row.

    `add(token_nll, positions)`: `token_nll[t - 1]` is -log p(token t | the tokens before it) for t = 1..L-1 (a
    stored target row's position t-1 predicts token t, as do a student's logits at t-1; a teacher row's
    -token_logprob[:-1], its last position predicting nothing), `positions` the grounded t
    (grounded_positions). Token-weighted in log space the two give back the perplexity over all
    the tokens: n_g·log(ppl_grounded) + n_o·log(ppl_other) = (n_g + n_o)·log(ppl)."""

    def __init__(self):
        self.nll, self.n = [0.0, 0.0], [0, 0]  # at the grounded tokens, at the others

    def add(self, token_nll, positions) -> None:
        nll = np.asarray(token_nll, np.float64)
        at = np.asarray(positions, np.int64) - 1
        if len(at) and not (0 <= at.min() and at.max() < len(nll)):
            raise ValueError(f"grounded positions {list(positions)} outside the predicted tokens 1..{len(nll)}")
        grounded = np.zeros(len(nll), bool)
        grounded[at] = True
        for k, where in enumerate((grounded, ~grounded)):
            self.nll[k] += float(nll[where].sum())
            self.n[k] += int(where.sum())

    def metrics(self, name: str) -> dict[str, float]:
        """{name}_grounded and {name}_other; none where no row has a grounded token (captions without
        grounded words)."""
        if not self.n[0]:
            return {}
        return {f"{name}_{part}": math.exp(self.nll[k] / self.n[k])
                for k, part in enumerate(("grounded", "other")) if self.n[k]}


def grounded_positions(token_ids: list[int], words: list[str], tokenizer) -> list[int]:
    """Positions t (t ≥ 1) whose token overlaps one of `words` in the decoded caption."""
    if not words:
        return []
    ends, text = [], ""
    for t in range(len(token_ids)):
        text = tokenizer.decode(token_ids[: t + 1], skip_special_tokens=True)
        ends.append(len(text))
    spans = [m.span() for w in words for m in re.finditer(rf"\b{re.escape(w)}\b", text, re.IGNORECASE)]
    out = []
    for t in range(1, len(token_ids)):
        start, end = ends[t - 1], ends[t]
        if end > start and any(s < end and start < e for s, e in spans):
            out.append(t)
    return out


def teacher_grounded_split(rows: list[dict], positions) -> GroundedSplit:
    """The teacher's exact figures (`token_logprob`) split at the grounded tokens; `positions(token_ids, words)`
    gives a row's grounded positions (grounded_positions with the teacher's tokenizer)."""
    split = GroundedSplit()
    for r in rows:
        words = r.get("grounded") or []
        split.add(-r["token_logprob"][:-1].astype(np.float64), positions(r["token_ids"].tolist(), words))
    return split


def _contexts(seq: list[int], n: int):
    """(context of up to n-1 tokens, token) for every predicted position of one row."""
    for j in range(1, len(seq)):
        yield tuple(seq[max(0, j - n + 1):j]), seq[j]


class NGram:
    """An interpolated n-gram model over token ids (orders 0..n), fitted on train rows, weights on val rows.

    Order 0 is uniform over the vocabulary; order k is the maximum-likelihood estimate after the last k-1
    tokens. Where that context is shorter than k-1 tokens or never seen in train, order k backs off to order
    k-1, so every order is a distribution over the vocabulary and so is their mixture, for any weights."""

    def __init__(self, train: list[list[int]], n: int, vocab_size: int):
        self.n, self.vocab_size = n, vocab_size
        self.counts = [Counter() for _ in range(n + 1)]  # order k: (context of k-1 tokens + token) counts
        self.context = [Counter() for _ in range(n + 1)]
        for seq in train:
            for ctx, tok in _contexts(seq, n):
                for k in range(1, len(ctx) + 2):
                    c = ctx[len(ctx) - (k - 1):]
                    self.counts[k][c + (tok,)] += 1
                    self.context[k][c] += 1
        self.weights = np.full(n + 1, 1 / (n + 1))

    def _orders(self, ctx: tuple, tok: int) -> np.ndarray:
        """The probability of `tok` after `ctx` under each order 0..n."""
        p = np.empty(self.n + 1)
        p[0] = 1 / self.vocab_size
        for k in range(1, self.n + 1):
            c = ctx[len(ctx) - (k - 1):] if len(ctx) >= k - 1 else None
            total = self.context[k][c] if c is not None else 0
            p[k] = self.counts[k][c + (tok,)] / total if total else p[k - 1]
        return p

    def prob(self, ctx: tuple, tok: int) -> float:
        """The interpolated probability of `tok` after the tokens `ctx`."""
        ctx = tuple(ctx)[-(self.n - 1):] if self.n > 1 else ()
        return float(self._orders(ctx, tok) @ self.weights)

    def _table(self, rows: list[list[int]]) -> np.ndarray:
        table = [self._orders(ctx, tok) for seq in rows for ctx, tok in _contexts(seq, self.n)]
        return np.array(table).reshape(len(table), self.n + 1)

    def fit_weights(self, rows: list[list[int]], iterations: int = 50) -> NGram:
        """EM on held-out rows for the interpolation weights (uniform when there are none). No weight falls
        below MIN_WEIGHT: EM drives an order the held-out rows never need towards 0 geometrically (order 0
        after 50 steps to ~1e-150), and one eval token unseen in train would then cost ~350 nats."""
        table = self._table(rows)
        if not len(table):
            return self
        for _ in range(iterations):
            joint = table * self.weights
            w = np.maximum((joint / joint.sum(1, keepdims=True)).mean(0), MIN_WEIGHT)
            self.weights = w / w.sum()
        return self

    def perplexity(self, rows: list[list[int]]) -> float:
        table = self._table(rows)
        return float(np.exp(-np.log(table @ self.weights).mean())) if len(table) else float("nan")


def ngram_perplexity(train: list[list[int]], val: list[list[int]], test: list[list[int]], n: int,
                     vocab_size: int) -> float:
    """The perplexity on `test` of an order-n interpolated model fitted on `train`, weights fitted on `val`."""
    return NGram(train, n, vocab_size).fit_weights(val).perplexity(test)


def teacher_report(samples_dir, target_dir, split: str, vocab_size: int, ngrams=(1, 3),
                   positions=None) -> dict[str, float]:
    """The teacher's exact figures on `split`, and the n-gram references fitted on train (weights on val).

    Keys: teacher_perplexity, teacher_top1_acc, tokens, <n>gram_perplexity for each n in `ngrams`, and with
    `positions` (see teacher_grounded_split) teacher_perplexity_grounded and teacher_perplexity_other where the
    captions have grounded words. Raises NoTokenLogprob for shards collected before token_logprob."""
    parts = rows_by_split(samples_dir, target_dir, {"train", "val", split})
    figures = exact_figures(parts[split])
    out = {"teacher_perplexity": figures["perplexity"], "teacher_top1_acc": figures["top1_acc"],
           "tokens": figures["tokens"]}
    if positions is not None:
        out.update(teacher_grounded_split(parts[split], positions).metrics("teacher_perplexity"))
    seqs = {k: [r["token_ids"].tolist() for r in v] for k, v in parts.items()}
    for n in ngrams:
        out[f"{n}gram_perplexity"] = ngram_perplexity(seqs["train"], seqs["val"], seqs[split], n, vocab_size)
    return out


def eval_metrics(samples_dir, target_dir, vocab_size: int, positions=None) -> dict[str, float]:
    """`mmtp evaluate`'s teacher figures on the test split (eval/teacher_perplexity, eval/teacher_top1_acc,
    eval/unigram_perplexity, eval/trigram_perplexity, and with `positions` (see teacher_grounded_split)
    eval/teacher_perplexity_grounded and eval/teacher_perplexity_other where the captions have grounded words);
    none, with one warning, for shards without token_logprob."""
    try:
        r = teacher_report(samples_dir, target_dir, "test", vocab_size, ngrams=(1, 3), positions=positions)
    except NoTokenLogprob as err:
        log.warning("evaluate: no exact teacher figures: %s", err)
        return {}
    out = {"eval/teacher_perplexity": r["teacher_perplexity"], "eval/teacher_top1_acc": r["teacher_top1_acc"],
           "eval/unigram_perplexity": r["1gram_perplexity"], "eval/trigram_perplexity": r["3gram_perplexity"]}
    out.update({f"eval/{k}": v for k, v in r.items() if k.startswith("teacher_perplexity_")})
    return {k: v for k, v in out.items() if math.isfinite(v)}  # NaN: an empty split


def worse_than_unigram(name: str, perplexity: float, unigram: float) -> str | None:
    """The warning for a teacher whose perplexity is above the unigram's on the same captions, else None."""
    if not perplexity > unigram:  # NaN (no rows) never warns
        return None
    return (f"teacher {name!r} is worse on the val captions than a unigram of the train captions (perplexity "
            f"{perplexity:.1f} against {unigram:.1f}): it will distil noise; see docs/teachers.md, teacher "
            "correction")


def collection_metrics(name: str, samples_dir, target_dir, vocab_size: int) -> dict[str, float]:
    """The collect run's figures of language teacher `name` on the val split (collect/<name>/val_perplexity,
    .../val_top1_acc, .../val_unigram_perplexity: the unigram fitted on train, its weights on val); warns when
    the teacher is worse than the unigram, and returns none, with one warning, for shards without token_logprob."""
    try:
        r = teacher_report(samples_dir, target_dir, "val", vocab_size, ngrams=(1,))
    except NoTokenLogprob as err:
        log.warning("collect: teacher %r: no exact figures: %s", name, err)
        return {}
    message = worse_than_unigram(name, r["teacher_perplexity"], r["1gram_perplexity"])
    if message:
        log.warning(message)
    out = {f"collect/{name}/val_perplexity": r["teacher_perplexity"],
           f"collect/{name}/val_top1_acc": r["teacher_top1_acc"],
           f"collect/{name}/val_unigram_perplexity": r["1gram_perplexity"]}
    return {k: v for k, v in out.items() if math.isfinite(v)}  # NaN: an empty val split
