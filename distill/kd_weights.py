"""Per-position KD weights: selective KD (`loss.kd_gate`: keep a position's KD only where the teacher is confident,
from its own stored top-k + tail entropy) composed with the generated rows' weight (`loss.generated_kd_weight`).
distill/losses.py and distill/chunked.py apply them alike."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from distill.losses import SparseTargets

# The selective-KD gates (loss.kd_gate: distill/schema.py KDGate lists the same names; tests/distill/test_language_kd.py
# checks that they agree).
GATES = ("none", "entropy")


def teacher_entropy(targets: SparseTargets) -> Tensor:
    """[B, L] the teacher's entropy in nats at T = 1 over its k + 1 buckets (its own stored top-k, ids folded for a
    trimmed student included, and the tail taken as one outcome), renormalised over them; 0 at masked positions.
    Merging the tail tokens into one outcome can only lower an entropy, so this is a lower bound of the teacher's
    true entropy."""
    from distill.losses import LOGPROB_FLOOR  # here, not at the top: distill.losses imports this module
    mask = targets.mask.bool()
    top = torch.where(mask[..., None], targets.topk_logprobs.detach().float(), 0.0).clamp_min(LOGPROB_FLOOR)
    tail = torch.where(mask, targets.tail_logprob.detach().float(), 0.0).clamp_min(LOGPROB_FLOOR)
    log_p = torch.cat([top, tail[..., None]], -1).log_softmax(-1)
    return torch.where(mask, -(log_p.exp() * log_p).sum(-1), 0.0)


def kd_gate_keep(targets: SparseTargets, gate: str = "none", gate_nats: float = math.inf) -> Tensor | None:
    """[B, L] bool, the valid positions whose KD term the gate keeps, or None when `gate` is "none".
    "entropy": a hard gate, kept where the teacher's bucketed entropy (`teacher_entropy`, a lower bound) is at
    most `gate_nats`: the KD only where the teacher is confident."""
    if gate not in GATES:
        raise ValueError(f"unknown KD gate {gate!r}; expected one of {GATES}")
    if gate == "none":
        return None
    return targets.mask.bool() & (teacher_entropy(targets) <= gate_nats)


def kd_position_weights(targets: SparseTargets, generated_weight: float | None, gate: str = "none",
                        gate_nats: float = math.inf) -> Tensor | None:
    """Per-position weights [B, L] that hold the KD mean's denominators: the mean over the offline positions plus
    `generated_weight` times the mean over the generated ones (`targets.generated`), so the rows the student
    generated add a term instead of diluting the offline rows' mean; and with a selective-KD `gate`
    (`kd_gate_keep`) each mean is over the kept positions only (weight 0 elsewhere). None (one mean over every
    valid position) when there is neither a gate nor a `generated_weight` with a generated field."""
    keep = kd_gate_keep(targets, gate, gate_nats)
    split = generated_weight is not None and targets.generated is not None
    if keep is None and not split:
        return None
    mask = targets.mask.bool() if keep is None else keep
    if not split:
        return mask / mask.sum().clamp_min(1)
    generated = mask & targets.generated.bool()
    offline = mask & ~generated
    return offline / offline.sum().clamp_min(1) + generated_weight * generated / generated.sum().clamp_min(1)
