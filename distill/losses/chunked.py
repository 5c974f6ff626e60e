"""The chunked language head: `LanguageDistillLoss`'s terms from the heads' hidden states, never holding
more than one chunk of positions' full-vocabulary logits, in the forward or the backward pass.

Each head's logits [B, T, V] are what dominates the memory of the language loss (V = 49,152 with the default
teacher). Here the positions of every head are cut into chunks of `chunk_size`; each chunk's logits are
made from the head's post-norm hidden states and the shared output weight, scored by the terms of the one
plan (`LanguageDistillLoss.plan` and `term_sum`, distill/losses/language.py), differentiated at once, and
dropped. As in Liger-Kernel's fused linear losses, the gradients w.r.t. the hidden states and the weight are
thus computed in the forward pass and kept (their size is that of the inputs); the backward only scales them.
No logits are recomputed, so the matmuls are the dense path's three. The per-term values are for logging:
only "loss" carries a gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.language import LanguageDistillLoss, LossTerm
from distill.losses.targets import SparseTargets


def _run(spec, heads, weight, hidden, chunk_size, need_w: bool = False, need_h: Sequence[bool] = ()):
    """Loss, per-term values [n], d loss / d weight (float32; None unless `need_w`) and d loss / d each
    hidden state (None where `need_h` is not set)."""
    keys = [t.key for terms in heads for t in terms]
    values = torch.zeros(len(keys), dtype=torch.float32, device=weight.device)
    total = values.new_zeros(())
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
    need_h = list(need_h) or [False] * len(hidden)
    grad_h = [torch.zeros_like(h) if need else None for h, need in zip(hidden, need_h, strict=True)]
    grads = need_w or any(need_h)
    for d, (terms, h, gh) in enumerate(zip(heads, hidden, grad_h, strict=True)):
        x_all = h.reshape(-1, h.shape[-1])
        first = keys.index(terms[0].key)
        n = x_all.shape[0]
        size = -(-n // max(1, -(-n // chunk_size)))  # equal chunks of at most chunk_size: no small last one
        for start in range(0, n, size):
            rows = slice(start, start + size)
            x = x_all[rows].detach()
            with torch.no_grad():
                logits = F.linear(x, weight.detach()).requires_grad_(grads)
            with torch.enable_grad():
                sums = [spec.term_sum(_rows(t, rows), logits[None]) for t in terms]
                loss = ([1.0, *spec.mtp_weights][d] *
                        sum(t.coef * s / t.denom for t, s in zip(terms, sums, strict=True)))
                g = torch.autograd.grad(loss, logits)[0].to(x.dtype) if grads else None
            if gh is not None:
                gh.view(-1, h.shape[-1])[rows] = g @ weight.detach()
            if grad_w is not None and grad_w.dtype == x.dtype:
                grad_w.addmm_(g.t(), x)  # no weight-sized temporary per chunk
            elif grad_w is not None:
                grad_w += g.t() @ x
            total += loss.detach()
            for i, (t, s) in enumerate(zip(terms, sums, strict=True)):
                values[first + i] += s.detach() / t.denom
    return total, values, grad_w, grad_h


def _rows(term: LossTerm, rows: slice) -> LossTerm:
    """A flat term cut to a chunk's positions."""
    return LossTerm(term.key, term.kind, term.coef, term.target[:, rows],
                None if term.weights is None else term.weights[:, rows], term.denom)


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
    spec.check_call(len(hidden), labels)
    targets = SparseTargets.from_mapping(targets)
    heads = [[t.flat() for t in spec.plan(d, h.shape[1], targets, labels)] for d, h in enumerate(hidden)]
    if torch.is_grad_enabled() and (weight.requires_grad or any(h.requires_grad for h in hidden)):
        total, values = _ChunkedHead.apply(spec, heads, chunk_size, weight, *hidden)
    else:
        total, values, _, _ = _run(spec, heads, weight, hidden, chunk_size)
    keys = [t.key for terms in heads for t in terms]
    return {**dict(zip(keys, values.unbind(), strict=True)), "loss": total}
