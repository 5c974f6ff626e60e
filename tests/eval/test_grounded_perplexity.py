"""Perplexity split at the grounded caption tokens and at the others, for the teacher (exact, from token_logprob)
and the student (evaluate_student), on two hand-made captions whose log-probabilities are known."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data import quality
from data.quality import GroundedSplit
from distill.eval import evaluate_student, grounded_positions, teacher_note, verdict

NAN = float("nan")
VOCAB = ["<s>", "a", "red", "ball", "blue", "cube"]  # id 0 is BOS (and the padding)


class WordTokenizer:
    """One word a token, joined by spaces; BOS is special."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(VOCAB[i] for i in ids if i != 0)


TOK = WordTokenizer()
# "a red ball" (grounded: red, ball -> tokens 2, 3) and "blue cube" (grounded: blue -> token 1)
CAPTIONS = [([0, 1, 2, 3], ["red", "ball"]), ([0, 4, 5], ["blue"])]
# the teacher's log-probability of token t, stored at row position t - 1 (NaN at the last: nothing follows)
TEACHER_LOGPROB = [[-1.0, -3.0, -2.0, NAN], [-4.0, -0.5, NAN]]


def positions(ids, words):
    return grounded_positions(ids, words, TOK)


def test_the_captions_grounded_positions():
    assert [positions(ids, words) for ids, words in CAPTIONS] == [[2, 3], [1]]


def test_grounded_split_by_hand_and_its_token_weighted_combination():
    split = GroundedSplit()
    split.add([0.5, 1.0, 2.0], [2, 3])  # token 1 other; tokens 2, 3 grounded
    split.add([3.0, 0.25], [1])
    assert split.n == [3, 2]
    got = split.metrics("m")
    assert got["m_grounded"] == pytest.approx(math.exp((1.0 + 2.0 + 3.0) / 3), rel=1e-12)
    assert got["m_other"] == pytest.approx(math.exp((0.5 + 0.25) / 2), rel=1e-12)
    overall = math.exp((0.5 + 1.0 + 2.0 + 3.0 + 0.25) / 5)
    combined = math.exp((3 * math.log(got["m_grounded"]) + 2 * math.log(got["m_other"])) / 5)
    assert combined == pytest.approx(overall, rel=1e-12)
    empty = GroundedSplit()
    empty.add([1.0, 2.0], [])  # captions without grounded words: no figures
    assert empty.metrics("m") == {}
    with pytest.raises(ValueError, match="outside the predicted tokens"):
        empty.add([1.0, 2.0], [0])  # token 0 (BOS) is never predicted


def teacher_rows(grounded=True):
    rows = []
    for (ids, words), lp in zip(CAPTIONS, TEACHER_LOGPROB, strict=True):
        nxt = np.asarray(ids[1:] + [0], np.uint16)
        rows.append({"token_ids": np.asarray(ids, np.int32), "topk_ids": np.stack([nxt, nxt + 1], 1),
                     "token_logprob": np.asarray(lp, np.float16), "grounded": words if grounded else []})
    return rows


def teacher_metrics(monkeypatch, rows, with_positions=True):
    monkeypatch.setattr(quality, "rows_by_split", lambda s, t, splits: {k: rows for k in splits})
    return quality.eval_metrics("s", "t", len(VOCAB), positions=positions if with_positions else None)


def test_teacher_split_by_hand(monkeypatch):
    """Row position t-1 scores token t: grounded -3, -2 (row 0) and -4 (row 1); other -1 and -0.5."""
    m = teacher_metrics(monkeypatch, teacher_rows())
    assert m["eval/teacher_perplexity_grounded"] == pytest.approx(math.exp((3 + 2 + 4) / 3), rel=1e-12)
    assert m["eval/teacher_perplexity_other"] == pytest.approx(math.exp((1 + 0.5) / 2), rel=1e-12)
    combined = (3 * math.log(m["eval/teacher_perplexity_grounded"]) + 2 * math.log(m["eval/teacher_perplexity_other"]))
    assert math.exp(combined / 5) == pytest.approx(m["eval/teacher_perplexity"], rel=1e-12)
    assert m["eval/teacher_perplexity"] == pytest.approx(math.exp(10.5 / 5), rel=1e-12)
    # absent without grounded words, and without the positions (an older caller)
    assert not any(k.startswith("eval/teacher_perplexity_") for k in teacher_metrics(monkeypatch, teacher_rows(False)))
    assert not any(k.startswith("eval/teacher_perplexity_")
                   for k in teacher_metrics(monkeypatch, teacher_rows(), with_positions=False))


def test_no_split_for_shards_without_token_logprob(monkeypatch):
    rows = [{k: v for k, v in r.items() if k != "token_logprob"} for r in teacher_rows()]
    assert teacher_metrics(monkeypatch, rows) == {}


class PrefixStudent(torch.nn.Module):
    """Logits at position t depend on the caption up to t: `probs[prefix]` names the probability of some next
    tokens (teacher ids), the rest of the mass is spread evenly. With `teacher_token_ids` it is a trimmed
    vocabulary student: it reads and writes student ids, its unknown token nearly impossible."""

    def __init__(self, probs, teacher_token_ids=None):
        super().__init__()
        self.probs, self.weight = probs, torch.nn.Parameter(torch.zeros(1))
        self.map = teacher_token_ids
        self.config = SimpleNamespace(mtp_depth=0)
        if teacher_token_ids is not None:
            self.config.teacher_token_ids, self.config.teacher_vocab_size = teacher_token_ids, len(VOCAB)

    def _logp(self, prefix):
        named = self.probs.get(tuple(prefix), {})
        rest = (1 - sum(named.values())) / (len(VOCAB) - len(named))
        return [math.log(named.get(i, rest)) for i in range(len(VOCAB))]

    def forward(self, pixel_values, input_ids, attention_mask, text_logits_only=True):
        ids = input_ids.tolist()
        if self.map is not None:
            ids = [[self.map[s] for s in row] for row in ids]
        logits = torch.tensor([[self._logp(row[: t + 1]) for t in range(len(row))] for row in ids])
        if self.map is not None:  # columns in student ids; the unknown token (-1) nearly impossible
            logits = torch.stack([logits[..., i] if i >= 0 else torch.full_like(logits[..., 0], -60.0)
                                  for i in self.map], -1)
        return SimpleNamespace(logits=logits, mtp_logits=[], teacher_outputs={})

    def image_features(self, pixel_values):
        return torch.zeros(len(pixel_values), 2)


def items(grounded=True):
    out = []
    for b, (ids, words) in enumerate(CAPTIONS):
        nxt = torch.tensor(ids[1:] + [0])
        out.append({"id": f"digits-{b}", "caption": "", "label": b, "grounded": words if grounded else [],
                    "pixel_values": torch.zeros(3, 4, 4), "vision": {}, "input_ids": torch.tensor(ids),
                    "lang": {"topk_ids": torch.stack([nxt, (nxt + 1) % len(VOCAB)], 1),
                             "topk_logprobs": torch.tensor([[-0.5, -1.5]] * len(ids)),
                             "tail_logprob": torch.full((len(ids),), -1.2)}})
    return out


# the student's probability of each caption token (row 0: 1/2, 1/4, 1/2; row 1: 1/4, 1/8)
STUDENT = {(0,): {1: 1 / 2, 4: 1 / 4}, (0, 1): {2: 1 / 4}, (0, 1, 2): {3: 1 / 2}, (0, 4): {5: 1 / 8}}


def student_metrics(probs, grounded=True, batch_size=2, trimmed=None):
    model = PrefixStudent(probs, trimmed)
    return evaluate_student(model, items(grounded), None, TOK, stds={}, pad_id=0, batch_size=batch_size,
                            device="cpu")


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("trimmed", [None, [3, -1, 0, 5, 1, 2, 4]], ids=["teacher-vocab", "trimmed-vocab"])
def test_student_split_by_hand(batch_size, trimmed):
    """Grounded: row 0 tokens 2, 3 (1/4, 1/2) and row 1 token 1 (1/4); other: row 0 token 1 (1/2), row 1 token 2
    (1/8). The row padded in a batch of two counts nothing past its end."""
    m = student_metrics(STUDENT, batch_size=batch_size, trimmed=trimmed)
    assert m["eval/grounded_tokens"] == 3
    assert m["eval/perplexity_grounded"] == pytest.approx(2 ** (5 / 3), rel=1e-6)  # log 4 + log 2 + log 4 = 5 log 2
    assert m["eval/perplexity_other"] == pytest.approx(4.0, rel=1e-6)  # log 2 + log 8 = 4 log 2
    assert m["eval/perplexity"] == pytest.approx(2 ** (9 / 5), rel=1e-6)
    combined = 3 * math.log(m["eval/perplexity_grounded"]) + 2 * math.log(m["eval/perplexity_other"])
    assert math.exp(combined / 5) == pytest.approx(m["eval/perplexity"], rel=1e-9)  # up to float error


def test_a_student_with_the_teachers_probabilities_has_the_teachers_split(monkeypatch):
    """The same tokens for both: a student that predicts each caption token with the teacher's probability has
    the teacher's four figures; without grounded words neither has any."""
    copy = {}
    for (ids, _), lp in zip(CAPTIONS, TEACHER_LOGPROB, strict=True):
        for t in range(1, len(ids)):
            copy.setdefault(tuple(ids[:t]), {})[ids[t]] = math.exp(lp[t - 1])
    student, teacher = student_metrics(copy), teacher_metrics(monkeypatch, teacher_rows())
    for part in ("grounded", "other"):
        assert student[f"eval/perplexity_{part}"] == pytest.approx(teacher[f"eval/teacher_perplexity_{part}"], rel=1e-5)
    assert student["eval/perplexity"] == pytest.approx(teacher["eval/teacher_perplexity"], rel=1e-5)
    blind = student_metrics(copy, grounded=False)
    assert "eval/perplexity" in blind and not any(k.startswith("eval/perplexity_") for k in blind)


def test_report_names_the_teachers_split_and_scores_the_students():
    m = {"eval/teacher_perplexity": 12.345, "eval/teacher_top1_acc": 0.4, "eval/unigram_perplexity": 40.0,
         "eval/trigram_perplexity": 15.0, "eval/teacher_perplexity_grounded": 80.0,
         "eval/teacher_perplexity_other": 6.5}
    assert "at the grounded tokens 80.00, at the others 6.50" in teacher_note(m)
    without = {k: v for k, v in m.items() if not k.endswith(("_grounded", "_other"))}
    assert "grounded tokens" not in teacher_note(without)
    assert verdict("eval/perplexity_grounded", 3.0, 5.0) == "yes"  # lower is better, as eval/perplexity
    assert verdict("eval/perplexity_other", 5.0, 3.0) == "**no**"
    assert verdict("eval/teacher_perplexity_grounded", 80.0, 80.0) == "reference"
