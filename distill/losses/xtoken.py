"""Cross-tokenizer distillation where the tokens do not line up: the ULD loss.

ULD (Universal Logit Distillation, Boizard et al. 2024, arXiv 2402.12030) compares two next-token
distributions over different vocabularies without matching tokens: with both probability vectors sorted in
descending order (the shorter padded with zeros), the Wasserstein-1 distance under a cost that is the same
for any pair of distinct tokens has the closed form

    W1(p, q) = sum_r |p_(r) - q_(r)|

over ranks r. It matches the shape of the distribution (how peaked, how spread) but not which token gets
which mass. So it is only used where the student's next token starts a group of tokens that does not align
1:1 with a teacher token (data/align.py, `approx` positions); where it does (`exact` positions), the sparse
KD of distill/losses/language.py carries strictly more: the mass of each token.

The teacher side is the stored top-k plus the tail. The tail is a bucket, not a token, so it is not sorted
among the top-k but kept as the last entry, compared with the student's mass outside its own top-k:

    loss = sum_{r <= k} |p_(r) - q_(r)| + |tail_p - tail_q|

The true sum over the unseen ranks r > k is at least |tail_p - tail_q|, so this is the tightest value the
stored targets determine (a lower bound of the full-vocabulary W1; exact when k covers the vocabulary).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from distill.losses.targets import SparseTargets


def uld_loss(student_logits: Tensor, targets: SparseTargets | Mapping[str, Tensor], reduction: str = "mean") -> Tensor:
    """ULD between the student's full logits [B, L, V] and the teacher's stored top-k + tail at the
    positions of `targets.mask` (the `approx` positions); `targets.topk_ids` are not used.

    The teacher's k + 1 entries are renormalised (absorbs storage rounding); the student's top-k comes from
    its softmax (zeros when V < k) and its tail is the rest. float32; the teacher carries no gradient.
    reduction="mean": mean over valid positions (0 when there are none); "none": [B, L], 0 elsewhere.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    targets = SparseTargets.from_mapping(targets)
    if student_logits.dim() != 3:
        raise ValueError(f"student logits must be [B, L, V], got shape {tuple(student_logits.shape)}")
    B, L, V = student_logits.shape
    k = targets.topk_logprobs.shape[-1]
    if targets.topk_logprobs.shape != (B, L, k) or targets.tail_logprob.shape != (B, L) or \
            targets.mask.shape != (B, L):
        raise ValueError(f"targets do not match student logits {tuple(student_logits.shape)}")
    mask = targets.mask.bool()

    top = torch.where(mask[..., None], targets.topk_logprobs.detach().float(), 0.0)
    tail = torch.where(mask, targets.tail_logprob.detach().float(), 0.0)
    if (top.isnan() | top.isposinf()).any() or (tail.isnan() | tail.isposinf()).any():
        raise ValueError("teacher top-k or tail log-probs contain NaN or +inf at valid positions")
    p = torch.cat([top.sort(-1, descending=True).values, tail[..., None]], -1).softmax(-1)

    z = student_logits.float()
    s_top = (z.topk(min(k, V), -1).values - z.logsumexp(-1, keepdim=True)).exp()  # sorted, descending
    s_top = torch.nn.functional.pad(s_top, (0, k - s_top.shape[-1]))
    q = torch.cat([s_top, (1.0 - s_top.sum(-1, keepdim=True)).clamp_min(0.0)], -1)

    per_position = torch.where(mask, (p - q).abs().sum(-1), 0.0)
    if reduction == "none":
        return per_position
    return per_position.sum() / mask.sum().clamp_min(1)
