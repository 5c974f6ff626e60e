"""Language distillation losses (the image-feature ones are in distill/losses/image.py).

Language KD is computed from the teacher's stored top-k log-probs plus one tail bucket (the
mass outside the top-k), against the student's full logits. Both sides become distributions over
k+1 buckets and the divergence is taken between those. Direction names are explicit:

    forward_kl = KL(teacher || student)   (mean-seeking, the usual KD loss)
    reverse_kl = KL(student || teacher)   (mode-seeking)
    jsd        = Jensen-Shannon divergence (symmetric)

The maths, the temperature approximation for the tail and its error bound are in docs/losses.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.targets import GATES, LOGPROB_FLOOR, SparseTargets, kd_position_weights, shift_targets
from distill.losses.xtoken import uld_loss


def _check_targets(logits: Tensor, t: SparseTargets) -> None:
    if logits.dim() != 3:
        raise ValueError(f"student logits must be [B, L, V], got shape {tuple(logits.shape)}")
    B, L, V = logits.shape
    k = t.topk_ids.shape[-1]
    expected = {"topk_ids": (B, L, k), "topk_logprobs": (B, L, k), "tail_logprob": (B, L), "mask": (B, L)}
    for name, shape in expected.items():
        got = tuple(getattr(t, name).shape)
        if got != shape:
            raise ValueError(f"targets.{name} has shape {got}, expected {shape} to match student logits "
                             f"{tuple(logits.shape)}")
    if t.topk_ids.dtype.is_floating_point or t.topk_ids.dtype == torch.bool:
        raise TypeError(f"targets.topk_ids must be integer, got {t.topk_ids.dtype}")


def _buckets(logits: Tensor, t: SparseTargets, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(teacher log-probs, student log-probs, bucket is non-empty), each [B, L, k+1]; the last
    bucket is the tail. A top-k id of -1 is a teacher token outside the student vocabulary: its
    mass folds into the tail bucket. Everything in float32; teacher values carry no gradient."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    V = z.shape[-1]
    mask = t.mask.bool()
    raw = t.topk_ids.long()
    col = mask[..., None] & (raw >= 0)  # top-k columns that are student tokens
    top = torch.where(mask[..., None], t.topk_logprobs.detach().float(), 0.0)
    tail = torch.where(mask, t.tail_logprob.detach().float(), 0.0)
    _check_buckets(raw, mask, col, top, tail, V)
    ids = torch.where(col, raw, 0)
    has_tail = V - col.sum(-1) > 0  # student tokens left for the tail bucket
    s_top, s_tail = _student_buckets(z, ids, col, has_tail)
    log_p = _teacher_buckets(t, top, tail, mask, col, has_tail, temperature, V)
    valid = torch.cat([col, has_tail[..., None]], -1)
    log_p = log_p.masked_fill(~valid, 0.0)
    log_q = torch.cat([s_top, s_tail[..., None]], -1)
    return log_p, log_q, valid


def _check_buckets(raw: Tensor, mask: Tensor, col: Tensor, top: Tensor, tail: Tensor, V: int) -> None:
    """Ids inside the student vocab and distinct per position; no NaN at valid positions."""
    bad_ids = mask[..., None] & ((raw < -1) | (raw >= V))
    if bad_ids.any():
        raise ValueError(f"teacher top-k ids outside the student vocab [0, {V}): "
                         f"{raw[bad_ids].unique()[:8].tolist()}")
    # Distinct ids among the student tokens; padding and folded columns get distinct negatives.
    ordered = torch.where(col, raw, -1 - torch.arange(raw.shape[-1], device=raw.device)).sort(-1).values
    checks = torch.stack([(ordered[..., 1:] == ordered[..., :-1]).any(),
                          (mask[..., None] & top.isnan()).any() | (mask & tail.isnan()).any()]).tolist()
    if checks[0]:
        raise ValueError("teacher top-k ids repeat within a position; each position needs k distinct ids")
    if checks[1]:
        raise ValueError("teacher top-k or tail log-probs contain NaN at valid positions")


def _student_buckets(z: Tensor, ids: Tensor, col: Tensor, has_tail: Tensor) -> tuple[Tensor, Tensor]:
    """The student's log-probs of the top-k columns and of the tail, exact, at temperature.

    The tail's log-mass is lse_all + log1p(-p_K) from the top-k mass p_K, which needs no pass over the
    vocab; where p_K > 1/2 that subtraction would lose precision, so those positions take the exact
    logsumexp over the outside tokens instead."""
    lse_all = torch.logsumexp(z, -1)
    z_top = z.gather(-1, ids)
    s_top = z_top - lse_all[..., None]
    frac = (torch.logsumexp(z_top.masked_fill(~col, -math.inf), -1) - lse_all).exp()
    lse_out = lse_all + torch.log1p(-frac.clamp(max=0.5))
    exact = has_tail & (frac > 0.5)
    if exact.any():
        rows = z[exact]
        hit = torch.zeros_like(rows).scatter_add(-1, ids[exact], col[exact].float()) > 0
        lse_out = lse_out.masked_scatter(exact, torch.logsumexp(rows.masked_fill(hit, -math.inf), -1))
    return s_top, torch.where(has_tail, lse_out - lse_all, 0.0)


def _teacher_buckets(t: SparseTargets, top: Tensor, tail: Tensor, mask: Tensor, col: Tensor, has_tail: Tensor,
                     temperature: float, V: int) -> Tensor:
    """The teacher's log-probs of the k+1 buckets at temperature.

    The top-k tempered exactly (t_i / tau, renormalised with the tail). At a stored temperature the tempered
    tail is log A_tau + log(U_tau / A_tau), exact. Otherwise treat the tail mass m as spread uniformly over
    the n outside tokens: n * (m / n)^(1/tau). Renormalising also absorbs fp16 rounding. Folded columns
    then join the tail exactly."""
    top = top.clamp_min(LOGPROB_FLOOR)
    stored = [i for i, s in enumerate(t.tail_temperatures) if math.isclose(s, temperature, rel_tol=1e-6)]
    if temperature != 1.0 and stored and t.tempered_tail is not None:
        want = (*mask.shape, len(t.tail_temperatures))
        if tuple(t.tempered_tail.shape) != want:
            raise ValueError(f"targets.tempered_tail has shape {tuple(t.tempered_tail.shape)}, expected {want}")
        ratio = torch.where(mask, t.tempered_tail[..., stored[0]].detach().float(), 0.0)
        if (mask & ratio.isnan()).any():
            raise ValueError("teacher tempered tail contains NaN at valid positions")
        tail = torch.logsumexp(top / temperature, -1) + ratio.clamp_min(LOGPROB_FLOOR)
    else:
        tail = tail.clamp_min(LOGPROB_FLOOR)
        log_n = torch.full_like(tail, float(max((t.teacher_vocab_size or V) - top.shape[-1], 1))).log()
        tail = (1.0 - 1.0 / temperature) * log_n + tail / temperature
    folded = mask[..., None] & ~col
    if folded.any():
        tail = torch.logaddexp(tail, torch.logsumexp((top / temperature).masked_fill(~folded, -math.inf), -1))
    tail = torch.where(has_tail, tail, -math.inf)
    return torch.cat([(top / temperature).masked_fill(~col, -math.inf), tail[..., None]], -1).log_softmax(-1)


def _forward_kl(log_p: Tensor, log_q: Tensor) -> Tensor:  # KL(teacher || student)
    return log_p.exp() * (log_p - log_q)


def _reverse_kl(log_p: Tensor, log_q: Tensor) -> Tensor:  # KL(student || teacher)
    return log_q.exp() * (log_q - log_p)


def _jsd(log_p: Tensor, log_q: Tensor) -> Tensor:  # (KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    return 0.5 * (log_p.exp() * (log_p - log_m) + log_q.exp() * (log_q - log_m))


# The KD kinds: per-bucket divergence terms of teacher p and student q (log-probs). The config's
# loss.kd_kind enum (distill/config/schema.py KDKind) is checked against these names by tests/test_config.py.
DIVERGENCES = {"forward_kl": _forward_kl, "reverse_kl": _reverse_kl, "jsd": _jsd}
KINDS = tuple(DIVERGENCES)


def _divergence(log_p: Tensor, log_q: Tensor, valid: Tensor, kind: str) -> Tensor:
    """Per-position divergence between teacher p and student q over the valid buckets."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown KD kind {kind!r}; expected one of {KINDS}")
    return torch.where(valid, DIVERGENCES[kind](log_p, log_q), 0.0).sum(-1)


def language_kd_loss(student_logits: Tensor, targets: SparseTargets | Mapping[str, Tensor],
                     kind: str = "forward_kl", temperature: float = 1.0,
                     reduction: str = "mean", generated_kind: str | None = None,
                     generated_weight: float | None = None, gate: str = "none",
                     gate_nats: float = math.inf) -> Tensor:
    """Sparse KD between stored teacher top-k + tail and the student's full logits [B, L, V].

    `kind`: forward_kl = KL(teacher||student), reverse_kl = KL(student||teacher), or jsd.
    `generated_kind` (None = `kind`): the divergence at `targets.generated` positions (rows the student
    generated), as GKD takes reverse KL or JSD on student samples while the offline rows keep `kind`.
    `generated_weight` (None = one mean): the mean reduces to offline mean + generated_weight x generated mean
    (`kd_position_weights`); `gate` ("none" | "entropy", with `gate_nats`): selective KD, the mean over the
    positions where the teacher's entropy is at most `gate_nats` (`kd_gate_keep`). reduction="none" leaves the
    positions unweighted (and ungated).
    The result is multiplied by temperature**2 (keeps gradient scale independent of tau).
    reduction="mean": mean over valid positions (0 when there are none); "none": [B, L], 0 at
    masked positions. Computed in float32 whatever the input dtypes.
    """
    for name in (kind, generated_kind or kind):
        if name not in KINDS:
            raise ValueError(f"unknown KD kind {name!r}; expected one of {KINDS}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    targets = SparseTargets.from_mapping(targets)
    _check_targets(student_logits, targets)
    log_p, log_q, valid = _buckets(student_logits, targets, temperature)
    mask = targets.mask.bool()
    divergence = _divergence(log_p, log_q, valid, kind)
    if generated_kind not in (None, kind) and targets.generated is not None and targets.generated.any():
        divergence = torch.where(targets.generated.bool(), _divergence(log_p, log_q, valid, generated_kind),
                                 divergence)
    per_position = torch.where(mask, divergence, 0.0) * temperature**2
    if reduction == "none":
        return per_position
    weights = kd_position_weights(targets, generated_weight, gate, gate_nats)
    if weights is not None:
        return (per_position * weights).sum()
    return per_position.sum() / mask.sum().clamp_min(1)


def causal_ce_loss(logits: Tensor, labels: Tensor, depth: int = 0, ignore_index: int = -100,
                   label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of head `depth` on ground truth: position i predicts labels[i + 1 + depth].

    `labels` [B, L] are the input ids (HF convention, shifted here); `ignore_index` entries (e.g.
    image positions, padding) are skipped. `logits` may be shorter than L (MTP heads). Returns 0
    when nothing is left to predict. `label_smoothing` s in [0, 1): the target is (1 - s) one-hot + s uniform
    over the vocabulary, as `F.cross_entropy(..., label_smoothing=s)`.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    n = min(logits.shape[1], labels.shape[1] - 1 - depth)
    if n <= 0:
        return logits.sum() * 0.0
    target = labels[:, 1 + depth: 1 + depth + n].long()
    return _ce_sum(logits[:, :n], target, ignore_index, label_smoothing) / (target != ignore_index).sum().clamp_min(1)


def _ce_sum(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float) -> Tensor:
    """The summed CE of logits [B, n, V] against target ids [B, n] (`ignore_index` skipped), in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten().long(), ignore_index=ignore_index,
                           reduction="sum", label_smoothing=label_smoothing)


@dataclass
class LossTerm:
    """One term of the language loss at one head: the plan both heads (dense and chunked) read.
    Its value is (sum over positions of `kind` at `target`, times `weights` when given) / `denom`."""
    key: str  # "ce", "lang_kd" or "lang_uld", with "/mtp{d}" for depth d >= 1
    kind: str  # ce | kd | uld
    coef: float  # its weight in its depth's term
    target: Tensor | SparseTargets  # ce: the label each position predicts [B, T]; kd, uld: the teacher's
    weights: Tensor | None  # kd: per-position weights [B, T] that hold the denominators (kd_position_weights)
    denom: Tensor

    def flat(self) -> LossTerm:
        """The same term over positions [1, B * T], so that a chunk of positions is a slice."""
        target = self.target.flat() if isinstance(self.target, SparseTargets) else self.target.reshape(1, -1)
        return replace(self, target=target, weights=None if self.weights is None else self.weights.reshape(1, -1))


class LanguageDistillLoss(nn.Module):
    """CE on ground truth mixed with sparse KD, on the main head and on each MTP depth.

        depth_d = alpha * CE_d + (1 - alpha) * (KD_d + uld_weight * ULD_d)
        loss    = depth_0 + sum_{d>=1} mtp_weights[d-1] * depth_d

    Head d (0 = main) at position i predicts token i+1+d; its KD target is the teacher at i+d.
    `generated_kind` (None = `kind`): the KD divergence on rows the student generated (`SparseTargets.generated`);
    `generated_kd_weight` (None = one mean over every row): KD_d = offline mean + weight x generated mean.
    ULD_d (distill/losses/xtoken.py) only with targets that carry `approx` positions (a cross-tokenizer student);
    KD_d then covers the `mask` (exact) positions alone.
    `label_smoothing`: of CE_d, every depth. `kd_gate` ("none" | "entropy") with `kd_gate_nats`: selective KD,
    KD_d is the mean over the positions where the teacher (at i + d) has an entropy of at most `kd_gate_nats`
    (`kd_gate_keep`; ULD is not gated).
    Returns {"loss", "ce", "lang_kd", "lang_uld", "ce/mtp{d}", "lang_kd/mtp{d}", "lang_uld/mtp{d}"} (CE keys
    only when alpha > 0, KD keys only when alpha < 1, ULD keys only with `approx` targets).
    The terms are planned once (`plan`, `term_sum`); `forward` scores them on full logits and
    distill/losses/chunked.py on chunks of positions.
    """

    def __init__(self, kind: str = "forward_kl", temperature: float = 1.0, alpha: float = 0.0,
                 mtp_weights: Sequence[float] = (), ignore_index: int = -100, uld_weight: float = 1.0,
                 generated_kind: str | None = None, generated_kd_weight: float | None = None,
                 label_smoothing: float = 0.0, kd_gate: str = "none", kd_gate_nats: float = math.inf):
        super().__init__()
        _check_settings(kind, generated_kind, alpha, mtp_weights, uld_weight, generated_kd_weight, label_smoothing,
                        kd_gate, kd_gate_nats)
        self.kind, self.temperature, self.alpha, self.uld_weight = kind, temperature, alpha, uld_weight
        self.label_smoothing = label_smoothing  # of the ground-truth CE of every depth
        self.kd_gate, self.kd_gate_nats = kd_gate, kd_gate_nats  # selective KD (`kd_gate_keep`)
        self.generated_kind = generated_kind  # the KD on generated rows (`SparseTargets.generated`); None: kind
        self.generated_kd_weight = generated_kd_weight  # None: one KD mean; else offline + weight x generated mean
        self.mtp_weights = list(mtp_weights)
        self.ignore_index = ignore_index

    def check_call(self, heads: int, labels: Tensor | None) -> None:
        if heads != 1 + len(self.mtp_weights):
            raise ValueError(f"got {heads} head states or logits (the main head's and {heads - 1} MTP heads') but "
                             f"{len(self.mtp_weights)} mtp_weights")
        if self.alpha > 0 and labels is None:
            raise ValueError(f"alpha={self.alpha} mixes in CE, which needs labels")

    def plan(self, depth: int, length: int, targets: SparseTargets, labels: Tensor | None) -> list[LossTerm]:
        """Head `depth`'s terms over its `length` positions, in the order of the returned keys."""
        suffix = "" if depth == 0 else f"/mtp{depth}"
        terms = []
        if self.alpha > 0:  # labels[i + 1 + depth] for position i, as causal_ce_loss aligns them
            ce = labels.new_full((labels.shape[0], length), self.ignore_index)
            n = min(length, labels.shape[1] - 1 - depth)
            if n > 0:
                ce[:, :n] = labels[:, 1 + depth: 1 + depth + n]
            denom = (ce != self.ignore_index).sum().clamp_min(1)
            terms.append(LossTerm("ce" + suffix, "ce", self.alpha, ce, None, denom))
        if self.alpha < 1:
            # MTP heads may be shorter than L (no input token beyond the sequence end); the weights hold the
            # denominators, and the selective-KD gate reads the teacher at i + depth, as the shift put it
            shifted = shift_targets(targets, depth)[:, :length]
            weights = kd_position_weights(shifted, self.generated_kd_weight, self.kd_gate, self.kd_gate_nats)
            denom = shifted.mask.sum().clamp_min(1) if weights is None else torch.ones((), device=shifted.mask.device)
            terms.append(LossTerm("lang_kd" + suffix, "kd", 1 - self.alpha, shifted, weights, denom))
            if shifted.approx is not None:  # the teacher's distribution where tokens do not line up
                uld = replace(shifted, mask=shifted.approx)
                terms.append(LossTerm("lang_uld" + suffix, "uld", (1 - self.alpha) * self.uld_weight, uld, None,
                                  uld.mask.sum().clamp_min(1)))
        return terms

    def term_sum(self, term: LossTerm, logits: Tensor) -> Tensor:
        """The sum of `term` over the positions of `logits` [B, T, V] (a chunk's [1, c, V] with a flat term)."""
        if term.kind == "ce":
            return _ce_sum(logits, term.target, self.ignore_index, self.label_smoothing)
        if term.kind == "kd":
            per_position = language_kd_loss(logits, term.target, self.kind, self.temperature, reduction="none",
                                            generated_kind=self.generated_kind)
            return (per_position if term.weights is None else per_position * term.weights).sum()
        return uld_loss(logits, term.target, reduction="none").sum()

    def forward(self, logits: Tensor, targets: SparseTargets | Mapping[str, Tensor],
                labels: Tensor | None = None, mtp_logits: Sequence[Tensor] = ()) -> dict[str, Tensor]:
        self.check_call(1 + len(mtp_logits), labels)
        targets = SparseTargets.from_mapping(targets)
        out: dict[str, Tensor] = {}
        total = logits.new_zeros((), dtype=torch.float32)
        for depth, (head, weight) in enumerate(zip([logits, *mtp_logits], [1.0, *self.mtp_weights], strict=True)):
            term = total.new_zeros(())
            for t in self.plan(depth, head.shape[1], targets, labels):
                out[t.key] = value = self.term_sum(t, head) / t.denom
                term = term + t.coef * value
            total = total + weight * term
        out["loss"] = total
        return out


def _check_settings(kind, generated_kind, alpha, mtp_weights, uld_weight, generated_kd_weight, label_smoothing,
                    kd_gate, kd_gate_nats) -> None:
    for name in (kind, generated_kind or kind):
        if name not in KINDS:
            raise ValueError(f"unknown KD kind {name!r}; expected one of {KINDS}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (CE weight) must be in [0, 1], got {alpha}")
    if any(w < 0 for w in mtp_weights):
        raise ValueError(f"mtp_weights must be >= 0, got {list(mtp_weights)}")
    if not uld_weight >= 0:
        raise ValueError(f"uld_weight must be >= 0, got {uld_weight}")
    if generated_kd_weight is not None and not generated_kd_weight >= 0:
        raise ValueError(f"generated_kd_weight must be >= 0 or None, got {generated_kd_weight}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if kd_gate not in GATES:
        raise ValueError(f"unknown KD gate {kd_gate!r}; expected one of {GATES}")
    if kd_gate != "none" and not kd_gate_nats >= 0:
        raise ValueError(f"kd_gate_nats must be >= 0, got {kd_gate_nats}")
