"""The ULD loss (distill/losses/xtoken.py) for cross-tokenizer positions that do not align 1:1."""

import math

import pytest
import torch

from distill.losses import SparseTargets, uld_loss


def sparse_teacher(teacher_logits, k, mask=None):
    logp = teacher_logits.double().log_softmax(-1)
    top, ids = logp.topk(k, -1)
    tail = logp.scatter(-1, ids, -math.inf).logsumexp(-1)
    mask = torch.ones(teacher_logits.shape[:2], dtype=torch.bool) if mask is None else mask
    return SparseTargets(ids, top.float(), tail.float(), mask)


def dense_uld(student_logits, teacher_logits):
    """ULD over the full vocabularies: both distributions sorted, the shorter zero-padded, L1."""
    p = teacher_logits.double().softmax(-1).sort(-1, descending=True).values
    q = student_logits.double().softmax(-1).sort(-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    return (p - q).abs().sum(-1)


def dense_topk_tail(student_logits, teacher_logits, k):
    """The rule with a stored top-k: the sorted top k ranks compared one by one, then the two tails."""
    p = teacher_logits.double().softmax(-1).sort(-1, descending=True).values
    q = student_logits.double().softmax(-1).sort(-1, descending=True).values
    q = torch.nn.functional.pad(q, (0, max(0, k - q.shape[-1])))
    p_top, q_top = p[..., :k], q[..., :k]
    tails = ((1 - p_top.sum(-1)) - (1 - q_top.sum(-1))).abs()
    return (p_top - q_top).abs().sum(-1) + tails


@pytest.mark.parametrize("vt, vs", [(50, 80), (80, 50), (64, 64)])
def test_full_top_k_gives_the_dense_uld(vt, vs):
    g = torch.Generator().manual_seed(vt + vs)
    teacher = torch.randn(2, 5, vt, generator=g) * 3
    student = torch.randn(2, 5, vs, generator=g) * 2
    loss = uld_loss(student, sparse_teacher(teacher, vt), reduction="none").double()
    torch.testing.assert_close(loss, dense_uld(student, teacher), atol=1e-5, rtol=1e-5)
    mean = uld_loss(student, sparse_teacher(teacher, vt))
    torch.testing.assert_close(mean.double(), dense_uld(student, teacher).mean(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vs", [8, 100])
def test_top_k_with_tail_matches_its_reference_and_bounds_the_dense_uld(vs):
    g = torch.Generator().manual_seed(vs)
    teacher = torch.randn(3, 4, 90, generator=g) * 3
    student = torch.randn(3, 4, vs, generator=g) * 2
    loss = uld_loss(student, sparse_teacher(teacher, 12), reduction="none").double()
    torch.testing.assert_close(loss, dense_topk_tail(student, teacher, 12), atol=1e-5, rtol=1e-5)
    assert (loss <= dense_uld(student, teacher) + 1e-6).all()
    assert (loss > 0).all() and (loss <= 2 + 1e-6).all()


def test_identical_sorted_distributions_give_zero():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(2, 6, 40, generator=g) * 3
    student = teacher[..., torch.randperm(40, generator=g)]  # other token ids, the same sorted probabilities
    loss = uld_loss(student, sparse_teacher(teacher, 10), reduction="none")
    assert loss.abs().max() < 1e-6
    assert uld_loss(student, sparse_teacher(teacher, 40)).abs() < 1e-6


def test_gradients_are_finite_and_reach_only_the_student():
    g = torch.Generator().manual_seed(2)
    targets = sparse_teacher(torch.randn(2, 5, 60, generator=g) * 4, 8)
    targets.topk_logprobs.requires_grad_(True)
    targets.tail_logprob.requires_grad_(True)
    z = (torch.randn(2, 5, 70, generator=g) * 2).to(torch.bfloat16).requires_grad_(True)
    loss = uld_loss(z, targets)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert targets.topk_logprobs.grad is None and targets.tail_logprob.grad is None


def test_masked_positions_are_ignored():
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(2, 6, 50, generator=g) * 3
    mask = torch.rand(2, 6, generator=g) < 0.5
    mask[0, 0], mask[1, 5] = True, False
    targets = sparse_teacher(teacher, 10, mask)
    z = (torch.randn(2, 6, 30, generator=g) * 2).requires_grad_(True)
    loss = uld_loss(z, targets)
    # garbage where the mask is off: NaN teacher values, huge student logits
    targets.topk_logprobs[~mask] = float("nan")
    targets.tail_logprob[~mask] = float("nan")
    z2 = z.detach().clone()
    z2[~mask] = 1e4
    z2.requires_grad_(True)
    loss2 = uld_loss(z2, targets)
    torch.testing.assert_close(loss2, loss)
    per_position = uld_loss(z2, targets, reduction="none")
    assert (per_position[~mask] == 0).all()
    torch.testing.assert_close(loss2, per_position.sum() / mask.sum())
    loss2.backward()
    assert torch.isfinite(z2.grad).all() and (z2.grad[~mask] == 0).all()
    none = uld_loss(z, SparseTargets(targets.topk_ids, targets.topk_logprobs, targets.tail_logprob,
                                     torch.zeros_like(mask)))
    assert none.item() == 0.0 and none.requires_grad


def test_accepts_a_mapping_and_rejects_bad_inputs():
    g = torch.Generator().manual_seed(4)
    t = sparse_teacher(torch.randn(1, 3, 20, generator=g), 5)
    z = torch.randn(1, 3, 20, generator=g)
    batch = {"topk_ids": t.topk_ids, "topk_logprobs": t.topk_logprobs, "tail_logprob": t.tail_logprob, "mask": t.mask}
    assert uld_loss(z, batch) == uld_loss(z, t)
    with pytest.raises(ValueError, match="match"):
        uld_loss(z[:, :2], t)
    with pytest.raises(ValueError, match="reduction"):
        uld_loss(z, t, reduction="sum")
    t.topk_logprobs[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        uld_loss(z, t)


def test_language_distill_loss_adds_uld_on_approx_positions_per_depth():
    from dataclasses import replace

    from distill.losses import LanguageDistillLoss, causal_ce_loss, language_kd_loss, shift_targets
    g = torch.Generator().manual_seed(5)
    teacher = sparse_teacher(torch.randn(2, 7, 40, generator=g) * 3, 6)
    approx = torch.rand(2, 7, generator=g) < 0.4
    folded = teacher.topk_ids.masked_fill(teacher.topk_ids >= 30, -1)  # teacher tokens the student lacks
    targets = replace(teacher, topk_ids=folded, mask=teacher.mask & ~approx, approx=approx, teacher_vocab_size=40)
    heads = [torch.randn(2, 7, 30, generator=g) for _ in range(2)]
    labels = torch.randint(0, 30, (2, 7), generator=g)
    loss = LanguageDistillLoss(alpha=0.25, mtp_weights=[0.5], uld_weight=2.0)
    out = loss(heads[0], targets, labels=labels, mtp_logits=heads[1:])
    total = 0.0
    for depth, (head, weight) in enumerate(zip(heads, [1.0, 0.5], strict=True)):
        suffix = "" if depth == 0 else f"/mtp{depth}"
        t = shift_targets(targets, depth)
        assert (t.approx == torch.nn.functional.pad(approx[:, depth:], (0, depth))).all()
        uld = uld_loss(head, replace(t, mask=t.approx))
        kd = language_kd_loss(head, t)
        torch.testing.assert_close(out["lang_uld" + suffix], uld)
        torch.testing.assert_close(out["lang_kd" + suffix], kd)
        total = total + weight * (0.25 * causal_ce_loss(head, labels, depth) + 0.75 * (kd + 2.0 * uld))
    torch.testing.assert_close(out["loss"], total)
    plain = LanguageDistillLoss(alpha=0.25, mtp_weights=[0.5])(heads[0], replace(targets, approx=None), labels=labels,
                                                               mtp_logits=heads[1:])
    assert not any(k.startswith("lang_uld") for k in plain)
    with pytest.raises(ValueError, match="uld_weight"):
        LanguageDistillLoss(uld_weight=-1.0)
