"""Sparse KD into a student whose vocabulary is a subset of the teacher's (a trimmed vocabulary):
teacher top-k tokens outside the student vocabulary fold into the tail bucket, exactly."""

import math

import pytest
import torch

from distill.losses import KINDS, SparseTargets, language_kd_loss


def case(seed, B=2, L=5, Vt=120, Vs=40, k=12, tau_store=(2.0,)):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(B, L, Vt, generator=g, dtype=torch.float64) * 3.0
    keep = torch.randperm(Vt, generator=g)[:Vs].sort().values  # student id s is teacher id keep[s]
    to_student = torch.full((Vt,), -1, dtype=torch.long)
    to_student[keep] = torch.arange(Vs)
    student = torch.randn(B, L, Vs, generator=g, dtype=torch.float64) * 2.0
    logp = teacher.log_softmax(-1)
    top, ids = logp.topk(k, -1)
    tail = logp.scatter(-1, ids, -math.inf).logsumexp(-1)
    rest = teacher.scatter(-1, ids, -math.inf)
    ztop = teacher.gather(-1, ids)
    tempered = torch.stack([(rest / t).logsumexp(-1) - (ztop / t).logsumexp(-1) for t in tau_store], -1)
    targets = SparseTargets(to_student[ids], top.float(), tail.float(), torch.ones(B, L, dtype=torch.bool),
                            tempered.float(), tau_store, Vt)
    return teacher, student, keep, to_student, ids, targets


def dense_bucket_divergence(teacher, student, to_student, ids, kind, tau):
    """Buckets: the teacher's top-k tokens that are student tokens, one each, plus everything else;
    both distributions are tempered in full, then summed into the buckets (float64)."""
    p = (teacher / tau).softmax(-1)
    q = (student / tau).softmax(-1)
    out = torch.zeros(teacher.shape[:2], dtype=torch.float64)
    for b in range(teacher.shape[0]):
        for i in range(teacher.shape[1]):
            s_ids = to_student[ids[b, i]]
            keep = s_ids >= 0
            pb = p[b, i, ids[b, i][keep]]
            qb = q[b, i, s_ids[keep]]
            pb = torch.cat([pb, (1 - pb.sum()).reshape(1)])
            qb = torch.cat([qb, (1 - qb.sum()).reshape(1)])
            if kind == "forward_kl":
                d = (pb * (pb / qb).log()).sum()
            elif kind == "reverse_kl":
                d = (qb * (qb / pb).log()).sum()
            else:
                m = (pb + qb) / 2
                d = 0.5 * (pb * (pb / m).log()).sum() + 0.5 * (qb * (qb / m).log()).sum()
            out[b, i] = d * tau**2
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_folded_top_k_is_exact_against_the_dense_buckets(kind, tau):
    teacher, student, _, to_student, ids, targets = case(seed=3)
    assert (targets.topk_ids == -1).any() and (targets.topk_ids >= 0).any()  # both kinds of column occur
    sparse = language_kd_loss(student.float(), targets, kind, tau, reduction="none").double()
    dense = dense_bucket_divergence(teacher, student, to_student, ids, kind, tau)
    assert ((sparse - dense).abs() <= 1e-5 * (1 + dense.abs())).all(), (sparse - dense).abs().max()


def test_folding_matters_and_gradients_reach_only_student_tokens_in_buckets():
    teacher, student, _, to_student, ids, targets = case(seed=5)
    z = student.float().requires_grad_(True)
    loss = language_kd_loss(z, targets, "forward_kl")
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # dropping the folded mass instead (renormalising over mapped tokens) gives a different loss
    col = targets.topk_ids >= 0
    dropped = SparseTargets(targets.topk_ids, targets.topk_logprobs.masked_fill(~col, -1e4),
                            targets.tail_logprob, targets.mask, teacher_vocab_size=targets.teacher_vocab_size)
    assert abs(language_kd_loss(student.float(), dropped).item() - loss.item()) > 1e-3


def test_ids_other_than_minus_one_outside_the_vocab_are_refused():
    *_, targets = case(seed=7)
    targets.topk_ids[0, 0, 0] = -2
    with pytest.raises(ValueError, match="outside the student vocab"):
        language_kd_loss(torch.randn(2, 5, 40), targets)
    targets.topk_ids[0, 0, 0] = 40
    with pytest.raises(ValueError, match="outside the student vocab"):
        language_kd_loss(torch.randn(2, 5, 40), targets)
