"""The chunked language head: `LanguageDistillLoss`'s terms from the heads' hidden states, never holding
more than one chunk of positions' full-vocabulary logits, in the forward or the backward pass.

Each head's logits [B, T, V] are what dominates the memory of the language loss (V = 49,152 with the default
teacher). Here the positions of every head are cut into chunks of `chunk_size`; each chunk's logits are
made from the head's post-norm hidden states and the shared output weight, scored with the functions of
distill/losses.py, differentiated at once, and dropped. As in Liger-Kernel's fused linear losses, the
gradients w.r.t. the hidden states and the weight are thus computed in the forward pass and kept (their
size is that of the inputs); the backward only scales them. No logits are recomputed, so the matmuls are
the dense path's three. The per-term values are for logging: only "loss" carries a gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses import (
    LanguageDistillLoss,
    SparseTargets,
    causal_ce_loss,
    kd_position_weights,
    language_kd_loss,
    shift_targets,
)


def _flat(t: SparseTargets) -> SparseTargets:
    """[B, L, ...] fields as [1, B * L, ...], so that a chunk is a slice of positions."""
    def f(x):
        return None if x is None else x.reshape(1, -1, *x.shape[2:])
    return SparseTargets(f(t.topk_ids), f(t.topk_logprobs), f(t.tail_logprob), f(t.mask), f(t.tempered_tail),
                         t.tail_temperatures, t.teacher_vocab_size, f(t.approx), f(t.generated))


def _head_terms(spec: LanguageDistillLoss, depth: int, length: int, targets: SparseTargets,
                labels: Tensor | None) -> list[tuple[str, float, Tensor, object, Tensor | None]]:
    """Head `depth`'s terms as (key, weight in the depth's term, denominator, flat [1, B * length] target,
    flat per-position weights or None), the same terms, in the same order, as `LanguageDistillLoss.forward`."""
    suffix = "" if depth == 0 else f"/mtp{depth}"
    terms = []
    if spec.alpha > 0:  # labels[i + 1 + depth] for position i, as causal_ce_loss aligns them
        ce = labels.new_full((labels.shape[0], length), spec.ignore_index)
        n = min(length, labels.shape[1] - 1 - depth)
        if n > 0:
            ce[:, :n] = labels[:, 1 + depth: 1 + depth + n]
        ce = ce.reshape(1, -1)
        terms.append(("ce" + suffix, spec.alpha, (ce != spec.ignore_index).sum().clamp_min(1), ce, None))
    if spec.alpha < 1:
        shifted = _flat(shift_targets(targets, depth)[:, :length])
        # they hold the denominators; the selective-KD gate reads the teacher at i + depth, as the shift put it
        weights = kd_position_weights(shifted, spec.generated_kd_weight, spec.kd_gate, spec.kd_gate_nats)
        denom = shifted.mask.sum().clamp_min(1) if weights is None else torch.ones((), device=shifted.mask.device)
        terms.append(("lang_kd" + suffix, 1 - spec.alpha, denom, shifted, weights))
        if shifted.approx is not None:
            uld = replace(shifted, mask=shifted.approx)
            terms.append(("lang_uld" + suffix, (1 - spec.alpha) * spec.uld_weight, uld.mask.sum().clamp_min(1), uld,
                          None))
    return terms


def _term_sum(spec: LanguageDistillLoss, key: str, logits: Tensor, target, weights: Tensor | None) -> Tensor:
    """The sum over a chunk's positions (logits [1, c, V]) of one term (weighted by `weights` [1, c] if given),
    from the dense functions."""
    if key.startswith("ce"):  # causal_ce_loss shifts by one: a leading ignored label lines the chunk up
        labels = F.pad(target, (1, 0), value=spec.ignore_index)
        return (causal_ce_loss(logits, labels, 0, spec.ignore_index, spec.label_smoothing)
                * (target != spec.ignore_index).sum())
    if key.startswith("lang_kd"):
        per_position = language_kd_loss(logits, target, spec.kind, spec.temperature, reduction="none",
                                        generated_kind=spec.generated_kind)
        return (per_position if weights is None else per_position * weights).sum()
    from distill.xtoken import uld_loss  # imports distill.losses
    return uld_loss(logits, target, reduction="none").sum()


def _run(spec, heads, weight, hidden, chunk_size, need_w: bool = False, need_h: Sequence[bool] = ()):
    """Loss, per-term values [n], d loss / d weight (float32; None unless `need_w`) and d loss / d each
    hidden state (None where `need_h` is not set)."""
    keys = [key for terms in heads for key, *_ in terms]
    values = torch.zeros(len(keys), dtype=torch.float32, device=weight.device)
    total = values.new_zeros(())
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
    need_h = list(need_h) or [False] * len(hidden)
    grad_h = [torch.zeros_like(h) if need else None for h, need in zip(hidden, need_h, strict=True)]
    grads = need_w or any(need_h)
    for d, (terms, h, gh) in enumerate(zip(heads, hidden, grad_h, strict=True)):
        x_all = h.reshape(-1, h.shape[-1])
        first = keys.index(terms[0][0])
        n = x_all.shape[0]
        size = -(-n // max(1, -(-n // chunk_size)))  # equal chunks of at most chunk_size: no small last one
        for start in range(0, n, size):
            rows = slice(start, start + size)
            x = x_all[rows].detach()
            with torch.no_grad():
                logits = F.linear(x, weight.detach()).requires_grad_(grads)
            with torch.enable_grad():
                sums = [_term_sum(spec, key, logits[None], target[:, rows], None if w is None else w[:, rows])
                        for key, _, _, target, w in terms]
                loss = ([1.0, *spec.mtp_weights][d] *
                        sum(coef * s / denom for (_, coef, denom, *_), s in zip(terms, sums, strict=True)))
                g = torch.autograd.grad(loss, logits)[0].to(x.dtype) if grads else None
            if gh is not None:
                gh.view(-1, h.shape[-1])[rows] = g @ weight.detach()
            if grad_w is not None and grad_w.dtype == x.dtype:
                grad_w.addmm_(g.t(), x)  # no weight-sized temporary per chunk
            elif grad_w is not None:
                grad_w += g.t() @ x
            total += loss.detach()
            for i, ((_, _, denom, *_), s) in enumerate(zip(terms, sums, strict=True)):
                values[first + i] += s.detach() / denom
    return total, values, grad_w, grad_h


class _ChunkedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, heads, chunk_size, weight, *hidden):
        need_w, *need_h = ctx.needs_input_grad[3:]
        total, values, grad_w, grad_h = _run(spec, heads, weight, hidden, chunk_size, need_w, need_h)
        ctx.grads = (None if grad_w is None else grad_w.to(weight.dtype), *grad_h)
        ctx.mark_non_differentiable(values)
        return total, values

    @staticmethod
    def backward(ctx, grad_total, _):
        grads, ctx.grads = ctx.grads, None
        # in place: these tensors are this call's own, and a copy of the weight-sized one would raise the peak
        return None, None, None, *(None if g is None else g.mul_(grad_total.to(g.dtype)) for g in grads)


def chunked_language_loss(spec: LanguageDistillLoss, hidden: Sequence[Tensor], weight: Tensor,
                          targets: SparseTargets | dict, labels: Tensor | None = None,
                          chunk_size: int = 1024) -> dict[str, Tensor]:
    """`spec(logits, targets, labels, mtp_logits)` with each head's logits `F.linear(hidden[d], weight)`,
    computed `chunk_size` positions (of B * T) at a time. `hidden`: the post-norm states [B, T, d] of the
    main head and then each MTP depth, at the caption positions; `weight` [V, d]: the shared output head.
    Returns the same keys and values; only "loss" has a gradient (computed during this call)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if len(hidden) != 1 + len(spec.mtp_weights):
        raise ValueError(f"got {len(hidden)} head states but {len(spec.mtp_weights)} mtp_weights (+ the main head)")
    if spec.alpha > 0 and labels is None:
        raise ValueError(f"alpha={spec.alpha} mixes in CE, which needs labels")
    if not isinstance(targets, SparseTargets):
        targets = SparseTargets.from_mapping(targets)
    heads = [_head_terms(spec, d, h.shape[1], targets, labels) for d, h in enumerate(hidden)]
    if torch.is_grad_enabled() and (weight.requires_grad or any(h.requires_grad for h in hidden)):
        total, values = _ChunkedHead.apply(spec, heads, chunk_size, weight, *hidden)
    else:
        total, values, _, _ = _run(spec, heads, weight, hidden, chunk_size)
    keys = [key for terms in heads for key, *_ in terms]
    return {**dict(zip(keys, values.unbind(), strict=True)), "loss": total}
