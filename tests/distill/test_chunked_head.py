"""The chunked language head (distill/losses/chunked.py) against the dense LanguageDistillLoss: the same terms and
the same gradients w.r.t. the heads' hidden states and the output weight, with no more than one chunk of
positions' full-vocabulary logits ever made."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from distill.losses import LanguageDistillLoss, SparseTargets, chunked_language_loss

B, T, V, D, K = 2, 7, 50, 8, 5  # 14 positions per head: chunk sizes 3 and 5 do not divide them


def case(variant="plain", tempered=False, depths=2, seed=0):
    """Random head states and output weight, and targets cut from a random dense teacher: `trimmed` keeps
    V of the teacher's 64 tokens (the others' top-k ids are -1, folded into the tail), `xtoken` also marks
    unaligned positions for ULD. Some positions are masked, some labels ignored."""
    g = torch.Generator().manual_seed(seed)
    vt = 64 if variant != "plain" else V
    teacher = (torch.randn(B, T, vt, generator=g) * 2).log_softmax(-1)
    top, ids = teacher.topk(K, -1)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
    tempered_tail = None
    if tempered:  # log(U_tau / A_tau) at tau = 2
        outside = teacher.scatter(-1, ids, -math.inf)
        tempered_tail = ((outside / 2).logsumexp(-1) - (top / 2).logsumexp(-1))[..., None]
    ids = torch.where(ids < V, ids, -1)  # teacher tokens outside the student's V fold into the tail
    mask = torch.rand(B, T, generator=g) > 0.2
    approx = (~mask & (torch.rand(B, T, generator=g) > 0.3)) if variant == "xtoken" else None
    targets = SparseTargets(ids, top, tail, mask, tempered_tail, (2.0,) if tempered else (),
                            vt if variant != "plain" else 0, approx)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.2] = -100
    hidden = [torch.randn(B, T, D, generator=g, requires_grad=True) for _ in range(1 + depths)]
    weight = torch.randn(V, D, generator=g, requires_grad=True)
    return hidden, weight, targets, labels


def both(spec, hidden, weight, targets, labels, chunk_size):
    """(dense terms, dense grads, chunked terms, chunked grads); grads w.r.t. (weight, *hidden) of "loss"."""
    logits = [F.linear(h, weight) for h in hidden]
    dense = spec(logits[0], targets, labels, logits[1:])
    dense_grads = torch.autograd.grad(dense["loss"], [weight, *hidden])
    chunked = chunked_language_loss(spec, hidden, weight, targets, labels, chunk_size)
    chunked_grads = torch.autograd.grad(chunked["loss"], [weight, *hidden])
    return dense, dense_grads, chunked, chunked_grads


def assert_same(dense, dense_grads, chunked, chunked_grads):
    assert list(chunked) == list(dense)
    for key in dense:
        torch.testing.assert_close(chunked[key], dense[key], atol=1e-5, rtol=1e-5, msg=key)
    for got, want in zip(chunked_grads, dense_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["plain", "trimmed", "xtoken"])
@pytest.mark.parametrize("temperature, tempered", [(1.0, False), (2.0, False), (2.0, True)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_head_matches_the_dense_loss_and_its_gradients(kind, alpha, temperature, tempered, variant):
    hidden, weight, targets, labels = case(variant, tempered)
    spec = LanguageDistillLoss(kind, temperature, alpha, mtp_weights=[0.5, 0.25], uld_weight=0.7)
    dense, dense_grads, chunked, chunked_grads = both(spec, hidden, weight, targets, labels, chunk_size=5)
    assert ("lang_uld/mtp2" in dense) == (variant == "xtoken" and alpha < 1)
    assert all(g.abs().sum() > 0 for g in dense_grads)  # every head and the weight are reached
    assert_same(dense, dense_grads, chunked, chunked_grads)


@pytest.mark.parametrize("chunk_size", [1, 3, 14, 100])
@pytest.mark.parametrize("depths", [0, 1, 3])
def test_any_chunk_size_and_number_of_mtp_depths(chunk_size, depths):
    hidden, weight, targets, labels = case("xtoken", depths=depths, seed=1)
    spec = LanguageDistillLoss("forward_kl", 1.0, 0.5, mtp_weights=[0.5] * depths)
    assert_same(*both(spec, hidden, weight, targets, labels, chunk_size))


def test_generated_rows_match_the_dense_loss():
    hidden, weight, targets, labels = case("plain", seed=3)
    targets.generated = torch.tensor([[True], [False]]).expand(B, T)
    spec = LanguageDistillLoss("forward_kl", 1.0, 0.5, mtp_weights=[0.5, 0.25], generated_kind="reverse_kl")
    dense, dense_grads, chunked, chunked_grads = both(spec, hidden, weight, targets, labels, chunk_size=3)
    assert_same(dense, dense_grads, chunked, chunked_grads)
    plain = LanguageDistillLoss("forward_kl", 1.0, 0.5, mtp_weights=[0.5, 0.25])(
        F.linear(hidden[0], weight), targets, labels, [F.linear(h, weight) for h in hidden[1:]])
    assert not torch.isclose(plain["lang_kd"], dense["lang_kd"])  # the generated row's divergence counts


def test_generated_kd_weight_matches_the_dense_loss():
    hidden, weight, targets, labels = case("plain", seed=4)
    targets.generated = torch.tensor([[True], [False]]).expand(B, T)
    spec = LanguageDistillLoss("forward_kl", 1.0, 0.5, mtp_weights=[0.5, 0.25], generated_kind="reverse_kl",
                               generated_kd_weight=2.0)
    dense, dense_grads, chunked, chunked_grads = both(spec, hidden, weight, targets, labels, chunk_size=3)
    assert_same(dense, dense_grads, chunked, chunked_grads)
    pooled = LanguageDistillLoss("forward_kl", 1.0, 0.5, mtp_weights=[0.5, 0.25], generated_kind="reverse_kl")(
        F.linear(hidden[0], weight), targets, labels, [F.linear(h, weight) for h in hidden[1:]])
    assert not torch.isclose(pooled["lang_kd"], dense["lang_kd"])  # the weight counts


@pytest.mark.parametrize("variant", ["plain", "trimmed"])
@pytest.mark.parametrize("generated", [False, True])
def test_label_smoothing_and_the_selective_kd_gate_match_the_dense_loss(variant, generated):
    """`loss.label_smoothing` on every depth's CE and the entropy gate on every depth's KD (the teacher at
    i + depth): the chunked head gives the dense terms and gradients, and the gate does drop positions."""
    from distill.losses import shift_targets, teacher_entropy
    hidden, weight, targets, labels = case(variant, seed=5)
    if generated:
        targets.generated = torch.tensor([[True], [False]]).expand(B, T)
    nats = float(teacher_entropy(targets)[targets.mask].median())  # about half the positions kept
    spec = LanguageDistillLoss("forward_kl", 1.0, 0.5, mtp_weights=[0.5, 0.25], label_smoothing=0.1,
                               kd_gate="entropy", kd_gate_nats=nats, generated_kd_weight=0.7 if generated else None)
    dense, dense_grads, chunked, chunked_grads = both(spec, hidden, weight, targets, labels, chunk_size=3)
    assert_same(dense, dense_grads, chunked, chunked_grads)
    main = F.linear(hidden[0], weight)[:, :-1].reshape(-1, V)  # position i predicts labels[i + 1]
    torch.testing.assert_close(chunked["ce"], F.cross_entropy(main, labels[:, 1:].reshape(-1), label_smoothing=0.1))
    ungated = LanguageDistillLoss("forward_kl", 1.0, 0.5, mtp_weights=[0.5, 0.25],
                                  generated_kd_weight=0.7 if generated else None)
    plain = ungated(F.linear(hidden[0], weight), targets, labels, [F.linear(h, weight) for h in hidden[1:]])
    for d in range(3):
        suffix = "" if d == 0 else f"/mtp{d}"
        assert not torch.isclose(plain["lang_kd" + suffix], dense["lang_kd" + suffix])
        assert not torch.isclose(plain["ce" + suffix], dense["ce" + suffix])
        kept = shift_targets(targets, d).mask & (teacher_entropy(shift_targets(targets, d)) <= nats)
        assert 0 < kept.sum() < shift_targets(targets, d).mask.sum()


def test_without_gradients_the_values_are_the_same():
    hidden, weight, targets, labels = case("trimmed", seed=2)
    spec = LanguageDistillLoss("jsd", 1.0, 0.5, mtp_weights=[0.5, 0.5])
    with torch.no_grad():
        dense = spec(F.linear(hidden[0], weight), targets, labels, [F.linear(h, weight) for h in hidden[1:]])
        chunked = chunked_language_loss(spec, hidden, weight, targets, labels, 4)
    assert list(chunked) == list(dense) and not chunked["loss"].requires_grad
    torch.testing.assert_close(torch.stack(list(chunked.values())), torch.stack(list(dense.values())))
    with pytest.raises(ValueError, match="needs labels"):
        chunked_language_loss(spec, hidden, weight, targets, None, 4)
    with pytest.raises(ValueError, match="head states"):
        chunked_language_loss(spec, hidden[:2], weight, targets, labels, 4)


def vocab_rows(t: torch.Tensor) -> int:
    """Positions of logits in `t`: its size over V, 0 without a V dim or for the weight (or its gradient)."""
    return 0 if V not in t.shape or sorted(t.shape) == sorted((V, D)) else t.numel() // V


class VocabRows(TorchDispatchMode):
    """The most positions (rows of V) of any vocabulary-sized tensor an op makes, the weight's shape aside."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.rows = max(self.rows, vocab_rows(t))
        return out


@pytest.mark.parametrize("chunk_size", [0, 3])
def test_no_more_than_one_chunk_of_logits_exists_in_the_forward_or_the_backward(chunk_size):
    """Every op output of the loss's forward and backward, and every tensor autograd saves, holds at most
    `chunk_size` positions' logits; the dense path (chunk_size 0 here) holds all of them, B * T."""
    hidden, weight, targets, labels = case("xtoken", tempered=True, seed=3)
    spec = LanguageDistillLoss("forward_kl", 2.0, 0.5, mtp_weights=[0.5, 0.5])
    saved = []

    def pack(t):
        saved.append(vocab_rows(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), VocabRows() as made:
        if chunk_size:
            loss = chunked_language_loss(spec, hidden, weight, targets, labels, chunk_size)["loss"]
        else:
            loss = spec(F.linear(hidden[0], weight), targets, labels, [F.linear(h, weight) for h in hidden[1:]])["loss"]
        loss.backward()
    bound = chunk_size or B * T
    assert made.rows == bound and max(saved) == bound


def test_the_trainer_takes_the_same_first_step_with_loss_chunk_size(train_cfg, monkeypatch):
    """A tiny run with `loss.chunk_size` set: the same first-step losses and trunk gradient norms as dense."""
    import distill.train.objective
    from distill.train import DistillRecipe
    calls = []
    real = distill.train.objective.chunked_language_loss
    monkeypatch.setattr(distill.train.objective, "chunked_language_loss", lambda *a: calls.append(a[-1]) or real(*a))

    def first_step(*overrides):
        recipe = DistillRecipe(train_cfg("train.max_steps=1", *overrides))
        recipe.setup()
        torch.manual_seed(0)
        figures, bad = recipe.train_step(recipe.micro_batches())
        assert bad is None
        return figures

    dense = first_step()
    assert not calls
    chunked = first_step("loss.chunk_size=37")
    assert calls == [37]
    assert {"loss/language", "loss/ce", "loss/lang_kd/mtp2", "gradnorm/language"} <= set(dense)
    assert set(chunked) == set(dense)
    for key, value in dense.items():
        assert chunked[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert "kd_gate/kept" not in dense


def test_the_trainer_logs_the_selective_kd_share_kept(train_cfg):
    """With loss.kd_gate=entropy a step logs `kd_gate/kept`, the share of the main head's KD positions kept: all
    of them at a threshold above any entropy of k + 1 buckets, fewer at the batch's median entropy (the tiny
    random teacher is flat, its mass in the tail bucket: bucketed entropies of about 0.28 nats), and the KD
    changes."""
    from distill.losses import teacher_entropy
    from distill.train import DistillRecipe

    def first_step(*overrides, median=False):
        recipe = DistillRecipe(train_cfg("train.max_steps=1", "loss.chunk_size=37", *overrides))
        recipe.setup()
        if median:
            lang = SparseTargets.from_mapping(next(recipe.micro_batches())["lang"])
            return float(teacher_entropy(lang)[lang.mask.bool()].median())
        torch.manual_seed(0)
        figures, bad = recipe.train_step(recipe.micro_batches())
        assert bad is None
        return figures

    plain = first_step()
    median = first_step(median=True)
    everything = first_step("loss.kd_gate=entropy", "loss.kd_gate_nats=100")
    assert everything["kd_gate/kept"] == 1.0
    assert everything["loss/lang_kd"] == pytest.approx(plain["loss/lang_kd"], rel=1e-5)
    some = first_step("loss.kd_gate=entropy", f"loss.kd_gate_nats={median}")
    assert 0.3 < some["kd_gate/kept"] < 1.0
    assert some["loss/lang_kd"] != pytest.approx(plain["loss/lang_kd"], rel=1e-3)
