"""The language teacher's stored targets as the losses read them: `SparseTargets` (a batch's top-k + tail,
aligned with the student's positions), their shift for an MTP depth, and the per-position KD weights: selective
KD (`loss.kd_gate`: keep a position's KD only where the teacher is confident, from its own stored top-k + tail
entropy) composed with the generated rows' weight (`loss.generated_kd_weight`). distill/losses/language.py (its
dense and chunked heads alike) and distill/losses/xtoken.py read them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

# Teacher log-probs are clamped here. A real softmax never gives exactly zero mass, so -inf in a
# non-empty bucket is a storage rounding artefact; left alone it would make reverse KL infinite.
LOGPROB_FLOOR = -100.0


@dataclass
class SparseTargets:
    """Stored language-teacher targets for a batch, aligned with the student's text positions.

    Teacher position j predicts token j+1 (the usual causal-LM convention).
    """
    topk_ids: Tensor  # [B, L, k] integer token ids, distinct per position
    topk_logprobs: Tensor  # [B, L, k] true log-probs at T=1
    tail_logprob: Tensor  # [B, L] log of the mass outside the top-k (-inf when k = vocab)
    mask: Tensor  # [B, L] bool, True where the position has a valid target
    # Optional: [B, L, n] log(U_tau / A_tau), the tempered tail over the tempered top-k mass, for each
    # temperature in `tail_temperatures`; the KD is exact at those temperatures (docs/losses.md).
    tempered_tail: Tensor | None = None
    tail_temperatures: tuple[float, ...] = ()
    # The teacher's vocabulary when it differs from the student's (trimmed or cross-tokenizer students):
    # the uniform-tail approximation spreads the tail over the teacher's outside tokens. 0: the same.
    teacher_vocab_size: int = 0
    # Cross-tokenizer students: [B, L] bool, positions whose next student token does not align 1:1 with a
    # teacher token (data/align.py); they take the ULD loss (distill/losses/xtoken.py), `mask` the sparse KD.
    approx: Tensor | None = None
    # Rows the student generated (on-policy rows, data/mix.py): [B, L] bool; they take the loss's
    # `generated_kind` divergence, the other rows its `kind`.
    generated: Tensor | None = None

    @classmethod
    def from_mapping(cls, targets: SparseTargets | Mapping[str, Tensor]) -> SparseTargets:
        """`targets` as SparseTargets: a batch's `lang` mapping (data/dataset.py collate) is read once, here."""
        if isinstance(targets, SparseTargets):
            return targets
        missing = [k for k in REQUIRED if k not in targets]
        if missing:
            raise KeyError(f"language targets are missing keys {missing}")
        return cls(**{k: targets.get(k) for k in POSITION_FIELDS},
                   tail_temperatures=tuple(targets.get("tail_temperatures", ())),
                   teacher_vocab_size=int(targets.get("teacher_vocab_size", 0)))

    def map(self, fn) -> SparseTargets:
        """The same targets with `fn` applied to each per-position tensor ([B, L, ...]; absent ones stay None)."""
        return replace(self, **{k: None if getattr(self, k) is None else fn(getattr(self, k))
                                for k in POSITION_FIELDS})

    def __getitem__(self, index) -> SparseTargets:
        """Index the batch/position dims, e.g. `targets[:, :n]`."""
        return self.map(lambda x: x[index])

    def flat(self) -> SparseTargets:
        """[B, L, ...] fields as [1, B * L, ...], so that a run of positions is a slice."""
        return self.map(lambda x: x.reshape(1, -1, *x.shape[2:]))


# The per-position tensors of SparseTargets ([B, L, ...]) and those every batch has.
POSITION_FIELDS = tuple(f.name for f in fields(SparseTargets) if f.name not in ("tail_temperatures",
                                                                                 "teacher_vocab_size"))
REQUIRED = ("topk_ids", "topk_logprobs", "tail_logprob", "mask")


def shift_targets(targets: SparseTargets, k: int) -> SparseTargets:
    """Targets for MTP depth k.

    The student's depth-k head at position i predicts token i+1+k, which is what the teacher
    predicts at position i+k. So position i gets the teacher's targets from i+k, and the last k
    positions (no teacher position to copy) are masked (`approx` too). k = 0 returns the targets unchanged.
    """
    if k < 0:
        raise ValueError(f"MTP depth must be >= 0, got {k}")
    if k == 0:
        return targets
    length = targets.mask.shape[1]

    def shift(x: Tensor) -> Tensor:
        out = torch.zeros_like(x)  # 0, 0.0 or False: masked
        if k < length:
            out[:, : length - k] = x[:, k:]
        return out

    return targets.map(shift)


# The selective-KD gates (loss.kd_gate: distill/config/schema.py KDGate lists the same names;
# tests/distill/test_language_kd.py checks that they agree).
GATES = ("none", "entropy")


def teacher_entropy(targets: SparseTargets) -> Tensor:
    """[B, L] the teacher's entropy in nats at T = 1 over its k + 1 buckets (its own stored top-k, ids folded for a
    trimmed student included, and the tail taken as one outcome), renormalised over them; 0 at masked positions.
    Merging the tail tokens into one outcome can only lower an entropy, so this is a lower bound of the teacher's
    true entropy."""
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
