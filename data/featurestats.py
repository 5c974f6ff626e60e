"""Running statistics of teacher features (count, mean, per-dim std, covariance), gathered at
collection time and stored beside the target shards; data.standardize turns them into a
z-score or PHI-S standardiser for the vision KD loss.

`FeatureStatsAccumulator` keeps count, sum and sum of outer products in float64 over batches,
merges partial statistics from several shards, and finalises to mean, std and covariance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FeatureStats:
    count: int
    mean: Tensor  # [D] float64
    std: Tensor  # [D] float64, unbiased
    cov: Tensor  # [D, D] float64, unbiased


class FeatureStatsAccumulator:
    """Running count, sum and sum of outer products (float64) of [..., D] features."""

    def __init__(self) -> None:
        self.count = 0
        self.sum: Tensor | None = None
        self.outer: Tensor | None = None

    def update(self, x: Tensor) -> FeatureStatsAccumulator:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        if self.sum is None:
            self.sum = x.new_zeros(x.shape[1])
            self.outer = x.new_zeros(x.shape[1], x.shape[1])
        elif x.shape[1] != self.sum.shape[0]:
            raise ValueError(f"feature dim {x.shape[1]} differs from the accumulated dim {self.sum.shape[0]}")
        self.count += x.shape[0]
        self.sum += x.sum(0).to(self.sum.device)
        self.outer += (x.T @ x).to(self.outer.device)
        return self

    def merge(self, other: FeatureStatsAccumulator) -> FeatureStatsAccumulator:
        """Add another accumulator's statistics into this one (e.g. per-shard partials)."""
        if other.sum is None:
            return self
        if self.sum is None:
            self.sum, self.outer = other.sum.clone(), other.outer.clone()
        elif other.sum.shape != self.sum.shape:
            raise ValueError(f"cannot merge feature dim {other.sum.shape[0]} into {self.sum.shape[0]}")
        else:
            self.sum += other.sum.to(self.sum.device)
            self.outer += other.outer.to(self.outer.device)
        self.count += other.count
        return self

    def finalize(self) -> FeatureStats:
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for statistics, have {self.count}")
        mean = self.sum / self.count
        cov = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        cov = (cov + cov.T) / 2
        return FeatureStats(self.count, mean, cov.diagonal().clamp_min(0).sqrt(), cov)

    def state_dict(self) -> dict:
        return {"count": self.count, "sum": self.sum, "outer": self.outer}

    @classmethod
    def from_state_dict(cls, state: dict) -> FeatureStatsAccumulator:
        acc = cls()
        acc.count, acc.sum, acc.outer = int(state["count"]), state["sum"], state["outer"]
        return acc

