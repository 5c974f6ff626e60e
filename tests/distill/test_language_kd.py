"""Sparse language KD against dense references written here from the full teacher distribution."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill.losses import (
    KINDS,
    LanguageDistillLoss,
    SparseTargets,
    causal_ce_loss,
    language_kd_loss,
    shift_targets,
)

torch.set_default_dtype(torch.float32)


def make_case(B, L, V, teacher_scale, student_scale, seed):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(B, L, V, generator=g, dtype=torch.float64) * teacher_scale
    student = torch.randn(B, L, V, generator=g, dtype=torch.float64) * student_scale
    return teacher, student


def sparse_targets(teacher_logits, k, mask=None):
    """Top-k + tail from the full teacher log-softmax at T=1 (as the collector stores them)."""
    logp = teacher_logits.double().log_softmax(-1)
    top, ids = logp.topk(k, -1)
    outside = torch.ones_like(logp, dtype=torch.bool).scatter(-1, ids, False)
    tail = logp.masked_fill(~outside, -math.inf).logsumexp(-1)
    if mask is None:
        mask = torch.ones(logp.shape[:2], dtype=torch.bool)
    return SparseTargets(ids, top.float(), tail.float(), mask)


def dense_divergence(teacher_logits, student_logits, kind, tau):
    """Per-position divergence of the full tempered distributions, times tau^2 (float64)."""
    log_p = (teacher_logits.double() / tau).log_softmax(-1)
    log_q = (student_logits.double() / tau).log_softmax(-1)
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward_kl":
        d = (p * (log_p - log_q)).sum(-1)
    elif kind == "reverse_kl":
        d = (q * (log_q - log_p)).sum(-1)
    else:
        m = (p + q) / 2
        d = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    return d * tau**2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_full_vocab_topk_equals_dense(kind, tau):
    V = 37
    teacher, student = make_case(2, 5, V, 3.0, 2.0, seed=1)
    targets = sparse_targets(teacher, V)  # k = V: tail is -inf, temperature exact
    assert torch.isinf(targets.tail_logprob).all()
    z = student.float().requires_grad_(True)
    loss = language_kd_loss(z, targets, kind, tau)
    ref = dense_divergence(teacher, student, kind, tau).mean()
    assert abs(loss.item() - ref.item()) < 1e-5
    loss.backward()
    assert torch.isfinite(z.grad).all()
    # The gradient matches the dense gradient too.
    zd = student.clone().requires_grad_(True)
    dense_divergence(teacher, zd, kind, tau).mean().backward()
    assert torch.allclose(z.grad.double(), zd.grad, atol=1e-5)


def tail_error_terms(teacher_logits, student_logits, k, tau, kind, sparse):
    """Per-position (temperature error bound, bucketing gap bound), both >= 0 and already times
    tau^2, from the derivation in docs/losses.md: sparse - dense lies in [-(temp + lump), temp].

    The temperature part uses only what top-k storage holds (plus the student); the bucketing
    (lumping) part of reverse KL needs the teacher's smallest tail probability, taken from dense.
    """
    logp = teacher_logits.double().log_softmax(-1)
    top, ids = logp.topk(k, -1)
    outside = torch.ones_like(logp, dtype=torch.bool).scatter(-1, ids, False)
    V = logp.shape[-1]
    n = V - k
    t_tail = logp.masked_fill(~outside, -math.inf).logsumexp(-1)
    t_min = top[..., -1]
    log_u_unif = (1 - 1 / tau) * math.log(n) + t_tail / tau  # what the loss uses
    log_u_conc = t_tail + (1 / tau - 1) * t_min  # the other extreme of feasible tails
    log_u_lo, log_u_hi = torch.minimum(log_u_unif, log_u_conc), torch.maximum(log_u_unif, log_u_conc)
    log_a = (top / tau).logsumexp(-1)
    pi_hat, pi_lo, pi_hi = (torch.sigmoid(x - log_a) for x in (log_u_unif, log_u_lo, log_u_hi))
    dpi = torch.maximum(pi_hat - pi_lo, pi_hi - pi_hat)

    zq = (student_logits.double() / tau).log_softmax(-1)
    log_rho = zq.masked_fill(~outside, -math.inf).logsumexp(-1)
    rho = log_rho.exp()
    log_qc = (zq - log_rho[..., None]).masked_fill(~outside, math.nan)  # student tail conditional

    if kind == "forward_kl":
        a_hat = (top / tau).softmax(-1)
        q_k = zq.gather(-1, ids) - torch.log1p(-rho)[..., None]
        d_k = (a_hat * (a_hat.log() - q_k)).sum(-1)
        logit = lambda x: torch.log(x) - torch.log1p(-x)  # noqa: E731
        slope = torch.maximum((logit(pi_lo) - logit(rho) - d_k).abs(), (logit(pi_hi) - logit(rho) - d_k).abs())
        temp_err = dpi * slope
        lump = pi_hi * (t_min / tau - log_u_lo - log_qc.nan_to_num(math.inf).amin(-1)).clamp_min(0)
    elif kind == "reverse_kl":
        temp_err = log_u_hi - log_u_lo
        log_pc = ((logp / tau).masked_fill(~outside, -math.inf).log_softmax(-1)).masked_fill(~outside, math.nan)
        lump = rho * (log_qc.nan_to_num(-math.inf).amax(-1) - log_pc.nan_to_num(math.inf).amin(-1)).clamp_min(0)
    else:
        eps = (math.log(2) * dpi).sqrt()
        temp_err = eps * (2 * (sparse.double() / tau**2).clamp_min(0).sqrt() + eps)
        s = pi_hi + rho
        lump = 0.5 * (pi_hi * (s / pi_hi).log() + rho * (s / rho).log())
    return temp_err * tau**2, lump * tau**2


def bucket_divergence(teacher_logits, student_logits, k, kind, tau):
    """Divergence between the exact (k+1)-bucket distributions, the tail tempered exactly."""
    log_p = (teacher_logits.double() / tau).log_softmax(-1)
    log_q = (student_logits.double() / tau).log_softmax(-1)
    ids = teacher_logits.topk(k, -1).indices
    outside = torch.ones_like(log_p, dtype=torch.bool).scatter(-1, ids, False)

    def buckets(lp):
        return torch.cat([lp.gather(-1, ids), lp.masked_fill(~outside, -math.inf).logsumexp(-1, keepdim=True)], -1)

    return dense_divergence(buckets(log_p), buckets(log_q), kind, 1.0) * tau**2


SHAPES = [  # (V, k, teacher scale, student scale): flat to peaked teachers and students
    (50, 1, 0.5, 0.5), (50, 5, 2.0, 1.0), (200, 20, 4.0, 2.0), (200, 3, 8.0, 0.3), (120, 60, 1.0, 4.0),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0, 0.7])
@pytest.mark.parametrize("shape", SHAPES)
def test_topk_tail_error_within_derived_bound(kind, tau, shape):
    V, k, ts, ss = shape
    teacher, student = make_case(3, 4, V, ts, ss, seed=V + k)
    targets = sparse_targets(teacher, k)
    sparse = language_kd_loss(student.float(), targets, kind, tau, reduction="none").double()
    dense = dense_divergence(teacher, student, kind, tau)
    temp_err, lump = tail_error_terms(teacher, student, k, tau, kind, sparse)
    err = sparse - dense
    tol = 1e-5 * (1 + dense.abs())
    assert (err >= -(temp_err + lump) - tol).all(), (err + temp_err + lump).min()
    assert (err <= temp_err + tol).all(), (temp_err - err).min()
    # The temperature part alone, against the exact bucketed divergence.
    bucket = bucket_divergence(teacher, student, k, kind, tau)
    assert ((sparse - bucket).abs() <= temp_err + tol).all()
    if tau == 1.0:  # exact where it can be: only the within-tail divergence is dropped
        assert torch.allclose(sparse, bucket, atol=1e-5)
        assert (err <= tol).all()


@pytest.mark.parametrize("tau", [2.0, 4.0, 0.5])
def test_true_tempered_tail_lies_between_uniform_and_concentrated(tau):
    """The feasible range that the bound rests on contains the true tempered tail mass."""
    V, k = 300, 10
    teacher, _ = make_case(4, 6, V, 3.0, 1.0, seed=7)
    logp = teacher.log_softmax(-1)
    top, ids = logp.topk(k, -1)
    outside = torch.ones_like(logp, dtype=torch.bool).scatter(-1, ids, False)
    t_tail = logp.masked_fill(~outside, -math.inf).logsumexp(-1)
    true = (logp / tau).masked_fill(~outside, -math.inf).logsumexp(-1)
    unif = (1 - 1 / tau) * math.log(V - k) + t_tail / tau
    conc = t_tail + (1 / tau - 1) * top[..., -1]
    assert (true <= torch.maximum(unif, conc) + 1e-9).all()
    assert (true >= torch.minimum(unif, conc) - 1e-9).all()
    assert (unif - conc).abs().min() > 0  # a real interval, so the test above could fail


@pytest.mark.parametrize("kind", KINDS)
def test_nonnegative_and_zero_for_identical(kind):
    V = 60
    teacher, student = make_case(2, 7, V, 2.0, 2.0, seed=3)
    for k in (1, 8, V):
        targets = sparse_targets(teacher, k)
        assert (language_kd_loss(student.float(), targets, kind, 1.5, reduction="none") >= -1e-6).all()
        same = language_kd_loss(teacher.float(), targets, kind, 1.0, reduction="none")
        assert same.abs().max() < 1e-5
    same_tempered = language_kd_loss(teacher.float(), sparse_targets(teacher, V), kind, 3.0)
    assert abs(same_tempered.item()) < 1e-5
    assert language_kd_loss(student.float(), sparse_targets(teacher, 8), kind, 1.0) > 1e-2


def test_forward_and_reverse_differ_and_match_their_definitions():
    V = 40
    teacher, student = make_case(1, 6, V, 4.0, 1.0, seed=5)
    targets = sparse_targets(teacher, V)
    fwd = language_kd_loss(student.float(), targets, "forward_kl")
    rev = language_kd_loss(student.float(), targets, "reverse_kl")
    assert abs(fwd.item() - rev.item()) > 0.1
    # KL(teacher || student) written out with F.kl_div (input = log q, target = log p)
    kl_ts = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none")
    kl_st = F.kl_div(teacher.log_softmax(-1), student.log_softmax(-1), log_target=True, reduction="none")
    assert abs(fwd.item() - kl_ts.sum(-1).mean().item()) < 1e-5
    assert abs(rev.item() - kl_st.sum(-1).mean().item()) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_only_to_student(kind):
    teacher, student = make_case(2, 3, 30, 2.0, 1.0, seed=11)
    targets = sparse_targets(teacher, 4)
    targets.topk_logprobs.requires_grad_(True)
    targets.tail_logprob.requires_grad_(True)
    z = student.float().requires_grad_(True)
    language_kd_loss(z, targets, kind, 2.0).backward()
    assert targets.topk_logprobs.grad is None and targets.tail_logprob.grad is None
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_mask_and_padding_garbage():
    teacher, student = make_case(2, 6, 30, 2.0, 1.0, seed=13)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    targets = sparse_targets(teacher, 5, mask)
    # padding: repeated/out-of-range ids and NaN values must not matter
    targets.topk_ids[0, 4:] = -1
    targets.topk_logprobs[0, 4:] = math.nan
    targets.tail_logprob[0, 4:] = math.nan
    z = student.float().requires_grad_(True)
    loss = language_kd_loss(z, targets, "jsd", 2.0)
    per = language_kd_loss(z, targets, "jsd", 2.0, reduction="none")
    assert torch.isfinite(loss)
    assert (per[0, 4:] == 0).all()
    assert abs(loss.item() - per[mask].mean().item()) < 1e-6
    loss.backward()
    assert torch.isfinite(z.grad).all() and (z.grad[0, 4:] == 0).all()
    # no valid positions at all: 0, not NaN
    targets.mask[:] = False
    assert language_kd_loss(z, targets, "forward_kl").item() == 0.0


def test_low_precision_inputs_computed_in_fp32():
    teacher, student = make_case(2, 4, 64, 3.0, 2.0, seed=17)
    t = sparse_targets(teacher, 8)
    t16 = SparseTargets(t.topk_ids.int(), t.topk_logprobs.half(), t.tail_logprob.half(), t.mask)
    for dtype in (torch.float16, torch.bfloat16):
        z = student.to(dtype)
        for kind in KINDS:
            low = language_kd_loss(z, t16, kind, 2.0)
            ref = language_kd_loss(z.float(), t16, kind, 2.0)
            assert low.dtype == torch.float32 and torch.isfinite(low)
            assert abs(low.item() - ref.item()) < 1e-6
            # fp16 storage of the teacher values moves the loss only slightly
            assert abs(low.item() - language_kd_loss(z.float(), t, kind, 2.0).item()) < 2e-2


def test_bad_input_is_named():
    teacher, student = make_case(1, 2, 20, 1.0, 1.0, seed=19)
    t = sparse_targets(teacher, 3)
    with pytest.raises(ValueError, match="kind"):
        language_kd_loss(student.float(), t, "kl", 1.0)
    with pytest.raises(ValueError, match="temperature"):
        language_kd_loss(student.float(), t, "jsd", 0.0)
    with pytest.raises(ValueError, match="vocab"):
        language_kd_loss(student[..., :10].float(), t, "jsd", 1.0)
    t.topk_ids[0, 0, 1] = t.topk_ids[0, 0, 0]
    with pytest.raises(ValueError, match="repeat"):
        language_kd_loss(student.float(), t, "jsd", 1.0)
    with pytest.raises(ValueError, match="tail_logprob"):
        language_kd_loss(student.float(), SparseTargets(t.topk_ids, t.topk_logprobs, t.tail_logprob[:, :1], t.mask),
                         "jsd")


def test_shift_targets_aligns_mtp_depth():
    """Depth-k head at position i predicts token i+1+k = what the teacher predicts at i+k."""
    B, L, V, depth = 2, 7, 25, 2
    teacher, student = make_case(B, L, V, 2.0, 1.0, seed=23)
    targets = sparse_targets(teacher, V)
    per = language_kd_loss(student.float(), shift_targets(targets, depth), "forward_kl", reduction="none")
    ref = dense_divergence(teacher[:, depth:], student[:, : L - depth], "forward_kl", 1.0)
    assert torch.allclose(per[:, : L - depth].double(), ref, atol=1e-5)
    assert (per[:, L - depth:] == 0).all()
    shifted = shift_targets(targets, depth)
    assert not shifted.mask[:, L - depth:].any() and shifted.mask[:, : L - depth].all()
    assert shift_targets(targets, 0) is targets
    assert not shift_targets(targets, L + 3).mask.any()


def test_language_distill_loss_mix():
    B, L, V = 2, 8, 30
    teacher, student = make_case(B, L, V, 2.0, 1.0, seed=29)
    g = torch.Generator().manual_seed(0)
    mtp = [torch.randn(B, L - d, V, generator=g) for d in (1, 2)]  # MTP heads may be shorter
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, 3] = -100  # e.g. an image position
    targets = sparse_targets(teacher, 6)
    crit = LanguageDistillLoss("reverse_kl", temperature=2.0, alpha=0.3, mtp_weights=[0.5, 0.25])
    out = crit(student.float(), targets, labels, mtp)
    assert set(out) == {"loss", "ce", "lang_kd", "ce/mtp1", "lang_kd/mtp1", "ce/mtp2", "lang_kd/mtp2"}
    # CE written out: head d at position i predicts labels[i+1+d]
    for d, head in enumerate([student.float(), *mtp]):
        n = min(head.shape[1], L - 1 - d)
        ref = F.cross_entropy(head[:, :n].reshape(-1, V), labels[:, 1 + d: 1 + d + n].reshape(-1), ignore_index=-100)
        key = "ce" if d == 0 else f"ce/mtp{d}"
        assert abs(out[key].item() - ref.item()) < 1e-5
        kd = language_kd_loss(head, shift_targets(targets, d)[:, : head.shape[1]], "reverse_kl", 2.0)
        assert abs(out["lang_kd" if d == 0 else f"lang_kd/mtp{d}"].item() - kd.item()) < 1e-6
    expect = sum(w * (0.3 * out[c] + 0.7 * out[k]) for w, c, k in
                 [(1.0, "ce", "lang_kd"), (0.5, "ce/mtp1", "lang_kd/mtp1"), (0.25, "ce/mtp2", "lang_kd/mtp2")])
    assert abs(out["loss"].item() - expect.item()) < 1e-5
    # pure KD needs no labels; CE mix without labels is refused
    assert set(LanguageDistillLoss()(student.float(), targets)) == {"loss", "lang_kd"}
    with pytest.raises(ValueError, match="labels"):
        LanguageDistillLoss(alpha=0.5)(student.float(), targets)
    with pytest.raises(ValueError, match="mtp_weights"):
        crit(student.float(), targets, labels, mtp[:1])


def test_causal_ce_all_ignored_is_zero():
    logits = torch.randn(1, 4, 10, requires_grad=True)
    labels = torch.full((1, 4), -100)
    loss = causal_ce_loss(logits, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_student_tail_is_exact_on_both_sides_of_the_top_k_mass_switch():
    """The student's tail log-mass comes from log1p(-p_K) when the top-k hold at most half the mass,
    and from a logsumexp over the outside tokens otherwise; both must equal the dense value."""
    from distill.losses.language import _buckets
    torch.manual_seed(0)
    V, k = 300, 8
    logits = torch.randn(2, 6, V, dtype=torch.float64).float()
    logits[0, :3] *= 0.1  # flat: p_K small
    logits[1, :3, :k] += 30.0  # peaked: p_K ~ 1 - 1e-10
    ids = torch.arange(k).expand(2, 6, k).clone()
    t = SparseTargets(ids, torch.full((2, 6, k), -3.0), torch.full((2, 6), -1.0), torch.ones(2, 6, dtype=torch.bool))
    _, log_q, _ = _buckets(logits, t, 1.0)
    dense = logits.double().log_softmax(-1)
    expect = torch.logsumexp(dense[..., k:], -1)
    torch.testing.assert_close(log_q[..., -1].double(), expect, rtol=1e-5, atol=1e-5)


def tempered_tail(teacher_logits, k, taus):
    """log(U_tau / A_tau) per position for each tau, from the full logits (as the collector stores it)."""
    z = teacher_logits.double()
    ids = z.topk(k, -1).indices
    rest = z.scatter(-1, ids, -math.inf)
    top = z.gather(-1, ids)
    return torch.stack([(rest / t).logsumexp(-1) - (top / t).logsumexp(-1) for t in taus], -1).float()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tau", [2.0, 4.0, 0.5])
@pytest.mark.parametrize("shape", SHAPES)
def test_stored_tempered_tail_makes_kd_exact(kind, tau, shape):
    V, k, ts, ss = shape
    teacher, student = make_case(3, 4, V, ts, ss, seed=V + k)
    taus = (3.0, tau)  # the loss picks the stored column of its own temperature
    t = sparse_targets(teacher, k)
    exact = SparseTargets(t.topk_ids, t.topk_logprobs, t.tail_logprob, t.mask, tempered_tail(teacher, k, taus), taus)
    sparse = language_kd_loss(student.float(), exact, kind, tau, reduction="none").double()
    bucket = bucket_divergence(teacher, student, k, kind, tau)
    assert ((sparse - bucket).abs() <= 1e-5 * (1 + bucket.abs())).all(), (sparse - bucket).abs().max()
    # an unlisted temperature keeps the approximation, the same as without the column
    other = language_kd_loss(student.float(), exact, kind, 1.5, reduction="none")
    assert torch.equal(other, language_kd_loss(student.float(), t, kind, 1.5, reduction="none"))


def test_approximate_tail_is_measurably_off_where_the_stored_one_is_exact():
    teacher, student = make_case(3, 4, 200, 4.0, 2.0, seed=7)
    t = sparse_targets(teacher, 20)
    bucket = bucket_divergence(teacher, student, 20, "forward_kl", 4.0)
    approx = language_kd_loss(student.float(), t, "forward_kl", 4.0, reduction="none").double()
    assert (approx - bucket).abs().max() > 1e-3  # what the stored tail fixes


def test_tempered_tail_follows_mtp_shift_slicing_and_mappings():
    teacher, _ = make_case(2, 6, 30, 2.0, 1.0, seed=3)
    t = sparse_targets(teacher, 5)
    tt = tempered_tail(teacher, 5, (2.0,))
    m = {"topk_ids": t.topk_ids, "topk_logprobs": t.topk_logprobs, "tail_logprob": t.tail_logprob,
         "mask": t.mask, "tempered_tail": tt, "tail_temperatures": (2.0,)}
    targets = SparseTargets.from_mapping(m)
    shifted = shift_targets(targets, 2)[:, :3]
    assert shifted.tail_temperatures == (2.0,)
    assert torch.equal(shifted.tempered_tail, tt[:, 2:5])
    bad = SparseTargets(t.topk_ids, t.topk_logprobs, t.tail_logprob, t.mask, tt[..., :0], (2.0,))
    with pytest.raises(ValueError, match="tempered_tail has shape"):
        language_kd_loss(torch.randn(2, 6, 30), bad, temperature=2.0)


def test_generated_rows_take_their_own_divergence():
    """`generated_kind` applies at the positions of generated rows only; the other rows keep `kind`, and the
    mean is over all valid positions alike (GKD: reverse KL on the student's samples, forward KL offline)."""
    teacher, student = make_case(3, 5, 40, 2.0, 2.0, seed=7)
    t = sparse_targets(teacher, 8)
    t.generated = torch.tensor([[False], [True], [False]]).expand(3, 5)
    fwd = language_kd_loss(student.float(), t, "forward_kl", reduction="none")
    rev = language_kd_loss(student.float(), t, "reverse_kl", reduction="none")
    mixed = language_kd_loss(student.float(), t, "forward_kl", reduction="none", generated_kind="reverse_kl")
    torch.testing.assert_close(mixed, torch.where(t.generated, rev, fwd))
    assert not torch.allclose(mixed, fwd)
    mean = language_kd_loss(student.float(), t, "forward_kl", generated_kind="reverse_kl")
    torch.testing.assert_close(mean, mixed.mean())
    # the field follows the MTP shift, and a loss without generated_kind ignores it
    assert shift_targets(t, 2).generated[1, :3].all() and not shift_targets(t, 2).generated[1, 3:].any()
    torch.testing.assert_close(language_kd_loss(student.float(), t, "forward_kl", reduction="none"), fwd)
    with pytest.raises(ValueError, match="unknown KD kind 'kl'"):
        language_kd_loss(student.float(), t, "forward_kl", generated_kind="kl")
    spec = LanguageDistillLoss("forward_kl", alpha=0.0, generated_kind="reverse_kl")
    torch.testing.assert_close(spec(student.float(), t)["lang_kd"], mean)


def test_generated_kd_weight_adds_the_generated_rows_mean():
    """With `generated_weight` the KD is the offline rows' mean + weight x the generated rows' mean: more or fewer
    generated rows in a batch no longer change the offline rows' share of the gradient."""
    teacher, student = make_case(3, 5, 40, 2.0, 2.0, seed=8)
    t = sparse_targets(teacher, 8)
    t.mask = t.mask.clone()
    t.mask[2, 3:] = False  # padding stays out of both means
    t.generated = torch.tensor([[False], [True], [False]]).expand(3, 5)
    per = language_kd_loss(student.float(), t, "forward_kl", reduction="none", generated_kind="reverse_kl")
    offline, generated = t.mask & ~t.generated, t.mask & t.generated
    expected = per[offline].mean() + 0.3 * per[generated].mean()
    got = language_kd_loss(student.float(), t, "forward_kl", generated_kind="reverse_kl", generated_weight=0.3)
    torch.testing.assert_close(got, expected)
    assert not torch.isclose(got, per[t.mask].mean())  # not the pooled mean
    spec = LanguageDistillLoss("forward_kl", alpha=0.0, generated_kind="reverse_kl", generated_kd_weight=0.3)
    torch.testing.assert_close(spec(student.float(), t)["lang_kd"], expected)
    # no generated field (offline batches): the weight changes nothing
    t.generated = None
    torch.testing.assert_close(language_kd_loss(student.float(), t, generated_weight=0.3),
                               language_kd_loss(student.float(), t))
    with pytest.raises(ValueError, match="generated_kd_weight must be >= 0"):
        LanguageDistillLoss(generated_kd_weight=-1.0)


# ---------------------------------------------------------------- label smoothing of the ground-truth CE


def test_label_smoothing_zero_is_todays_ce_and_positive_is_torchs():
    B, L, V = 2, 7, 23
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(B, L, V, generator=g) * 3
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, 2] = labels[1, 5] = -100
    for depth in (0, 1, 2):
        plain = causal_ce_loss(logits, labels, depth)
        assert torch.equal(causal_ce_loss(logits, labels, depth, label_smoothing=0.0), plain)  # bit for bit
        n = L - 1 - depth
        flat, target = logits[:, :n].reshape(-1, V), labels[:, 1 + depth: 1 + depth + n].reshape(-1)
        torch.testing.assert_close(plain, F.cross_entropy(flat, target, ignore_index=-100))
        for s in (0.1, 0.5):
            torch.testing.assert_close(causal_ce_loss(logits, labels, depth, label_smoothing=s),
                                       F.cross_entropy(flat, target, ignore_index=-100, label_smoothing=s))
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="label_smoothing"):
            causal_ce_loss(logits, labels, label_smoothing=bad)
        with pytest.raises(ValueError, match="label_smoothing"):
            LanguageDistillLoss(alpha=1.0, label_smoothing=bad)


def test_label_smoothing_reaches_every_depth_and_leaves_the_kd_alone():
    B, L, V = 2, 8, 30
    teacher, student = make_case(B, L, V, 2.0, 1.0, seed=31)
    g = torch.Generator().manual_seed(1)
    mtp = [torch.randn(B, L - d, V, generator=g) for d in (1, 2)]
    labels = torch.randint(0, V, (B, L), generator=g)
    targets = sparse_targets(teacher, 6)
    plain = LanguageDistillLoss("forward_kl", alpha=0.4, mtp_weights=[0.5, 0.25])(student.float(), targets, labels, mtp)
    smooth = LanguageDistillLoss("forward_kl", alpha=0.4, mtp_weights=[0.5, 0.25], label_smoothing=0.2)(
        student.float(), targets, labels, mtp)
    for d, head in enumerate([student.float(), *mtp]):
        suffix = "" if d == 0 else f"/mtp{d}"
        n = min(head.shape[1], L - 1 - d)
        ref = F.cross_entropy(head[:, :n].reshape(-1, V), labels[:, 1 + d: 1 + d + n].reshape(-1),
                              label_smoothing=0.2)
        torch.testing.assert_close(smooth["ce" + suffix], ref)
        assert not torch.isclose(smooth["ce" + suffix], plain["ce" + suffix])
        torch.testing.assert_close(smooth["lang_kd" + suffix], plain["lang_kd" + suffix])


# ---------------------------------------------------------------- selective KD (loss.kd_gate)


def test_gate_names_match_the_config_enum():
    from distill.config import KDGate
    from distill.losses import GATES
    assert tuple(g.value for g in KDGate) == GATES


def test_teacher_entropy_is_the_bucketed_entropy_and_a_lower_bound():
    from distill.losses import teacher_entropy
    teacher, _ = make_case(2, 6, 50, 2.0, 1.0, seed=3)
    logp = teacher.log_softmax(-1)
    dense = -(logp.exp() * logp).sum(-1)
    for k in (1, 5, 49):
        t = sparse_targets(teacher, k)
        top = t.topk_logprobs.double()
        buckets = torch.cat([top, t.tail_logprob.double()[..., None]], -1)
        ref = -(buckets.exp() * buckets).sum(-1)
        torch.testing.assert_close(teacher_entropy(t).double(), ref, atol=1e-5, rtol=1e-5)
        assert (teacher_entropy(t) <= dense.float() + 1e-5).all()
    full = sparse_targets(teacher, 50)  # k = V: an empty tail, the entropy is the dense one
    torch.testing.assert_close(teacher_entropy(full).double(), dense, atol=1e-5, rtol=1e-5)


def confident_and_flat(L=6, V=30, k=5, flat_at=(2,)):
    """Targets where every position is confident (one token at 0.99) except those in `flat_at`, spread evenly
    over six tokens (entropy about log 6 = 1.8 nats, the sixth token in the tail bucket)."""
    logits = torch.full((1, L, V), -4.0, dtype=torch.float64)
    logits[0, torch.arange(L), torch.arange(L) % V] = 4.0
    for i in flat_at:
        logits[0, i, :6] = 4.0
    return logits, sparse_targets(logits, k)


def test_gate_none_or_a_threshold_keeping_everything_changes_nothing():
    from distill.losses import teacher_entropy
    teacher, student = make_case(2, 7, 40, 2.0, 1.5, seed=11)
    t = sparse_targets(teacher, 6)
    t.mask = t.mask.clone()
    t.mask[1, 5:] = False
    plain = language_kd_loss(student.float(), t)
    assert torch.equal(language_kd_loss(student.float(), t, gate="none", gate_nats=0.1), plain)
    top = float(teacher_entropy(t).max())
    torch.testing.assert_close(language_kd_loss(student.float(), t, gate="entropy", gate_nats=top), plain)
    labels = torch.randint(0, 40, (2, 7))
    mtp = [torch.randn(2, 7 - d, 40) for d in (1, 2)]
    base = LanguageDistillLoss(alpha=0.5, mtp_weights=[0.5, 0.5])(student.float(), t, labels, mtp)
    for gate, nats in (("none", 0.0), ("entropy", top)):
        out = LanguageDistillLoss(alpha=0.5, mtp_weights=[0.5, 0.5], kd_gate=gate, kd_gate_nats=nats)(
            student.float(), t, labels, mtp)
        for key in base:
            torch.testing.assert_close(out[key], base[key], msg=key)
    with pytest.raises(ValueError, match="unknown KD gate"):
        LanguageDistillLoss(kd_gate="margin")
    with pytest.raises(ValueError, match="kd_gate_nats"):
        LanguageDistillLoss(kd_gate="entropy", kd_gate_nats=-1.0)


def test_gate_drops_a_high_entropy_position_and_the_mean_is_over_the_kept_ones():
    from distill.losses import kd_gate_keep, teacher_entropy
    teacher, t = confident_and_flat()
    entropy = teacher_entropy(t)[0]
    assert entropy[2] > 1.5 and (entropy[[0, 1, 3, 4, 5]] < 0.3).all()
    _, student = make_case(1, 6, 30, 1.0, 1.0, seed=2)
    per = language_kd_loss(student.float(), t, reduction="none")[0]
    keep = kd_gate_keep(t, "entropy", 1.0)[0]
    assert keep.tolist() == [True, True, False, True, True, True]
    got = language_kd_loss(student.float(), t, gate="entropy", gate_nats=1.0)
    torch.testing.assert_close(got, per[keep].mean())
    assert not torch.isclose(got, per.mean())
    # the gradient reaches no logit of the dropped position
    logits = student.float().requires_grad_()
    language_kd_loss(logits, t, gate="entropy", gate_nats=1.0).backward()
    assert logits.grad[0, 2].abs().sum() == 0 and logits.grad[0, 1].abs().sum() > 0
    # nothing kept: 0, not NaN
    assert language_kd_loss(student.float(), t, gate="entropy", gate_nats=0.0).item() == 0.0


def test_gate_at_mtp_depth_k_reads_the_teacher_at_i_plus_k():
    """The flat teacher position 3 gates position 3 of the main head, 2 of depth 1 and 1 of depth 2; CE is
    unchanged by the gate."""
    teacher, t = confident_and_flat(L=7, flat_at=(3,))
    g = torch.Generator().manual_seed(4)
    main = torch.randn(1, 7, 30, generator=g)
    mtp = [torch.randn(1, 7 - d, 30, generator=g) for d in (1, 2)]
    labels = torch.randint(0, 30, (1, 7), generator=g)
    gated = LanguageDistillLoss(alpha=0.3, mtp_weights=[0.5, 0.5], kd_gate="entropy", kd_gate_nats=1.0)(
        main, t, labels, mtp)
    plain = LanguageDistillLoss(alpha=0.3, mtp_weights=[0.5, 0.5])(main, t, labels, mtp)
    for d, head in enumerate([main, *mtp]):
        suffix = "" if d == 0 else f"/mtp{d}"
        shifted = shift_targets(t, d)[:, : head.shape[1]]
        per = language_kd_loss(head, shifted, reduction="none")[0]
        keep = shifted.mask[0].clone()
        keep[3 - d] = False
        torch.testing.assert_close(gated["lang_kd" + suffix], per[keep].mean())
        torch.testing.assert_close(gated["ce" + suffix], plain["ce" + suffix])


def test_gate_composes_with_the_generated_rows_weight():
    teacher, t = confident_and_flat(flat_at=(2,))
    t = SparseTargets(t.topk_ids.expand(2, -1, -1), t.topk_logprobs.expand(2, -1, -1),
                      t.tail_logprob.expand(2, -1), t.mask.expand(2, -1).clone(),
                      generated=torch.tensor([[False], [True]]).expand(2, 6))
    _, student = make_case(2, 6, 30, 1.0, 1.0, seed=9)
    per = language_kd_loss(student.float(), t, reduction="none")
    keep = t.mask.clone()
    keep[:, 2] = False
    expected = per[0][keep[0]].mean() + 0.5 * per[1][keep[1]].mean()
    got = language_kd_loss(student.float(), t, generated_weight=0.5, gate="entropy", gate_nats=1.0)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("override, key", [("loss.label_smoothing=1.0", "loss.label_smoothing"),
                                           ("loss.label_smoothing=-0.1", "loss.label_smoothing"),
                                           ("loss.kd_gate_nats=-1", "loss.kd_gate_nats"),
                                           ("loss.kd_gate=margin", "loss.kd_gate")])
def test_config_refuses_out_of_range_smoothing_and_gates(override, key):
    from distill.config import ConfigError, load_config
    cfg = load_config("configs/tiny.yaml", ["loss.label_smoothing=0.1", "loss.kd_gate=entropy"])
    assert cfg.loss.label_smoothing == 0.1 and cfg.loss.kd_gate.value == "entropy"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/tiny.yaml", [override])
