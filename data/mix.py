"""Offline shards mixed with other shard sets (e.g. the student's on-policy generations, scored by the teacher).

`MixedDataset` puts the rows of the extra sets after the base dataset's and builds a training order in which a
fixed share `fraction` of every run of rows comes from the extra sets (GKD's lambda): position j of the order is
an extra row exactly when floor((j + 1) * fraction) > floor(j * fraction), so any window of n rows holds
n * fraction of them, +-1. Extra rows cycle in a shuffled order when there are fewer than the order needs;
the epoch is as long as the base dataset's order.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from data.dataset import DistillDataset, ManifestMismatchError, check_manifests


class MixedDataset(torch.utils.data.Dataset):
    """`base` (it keeps the manifests, the teachers and the vocabulary the recipe reads) plus `extra` sets."""

    def __init__(self, base: DistillDataset, extra: list[DistillDataset], fraction: float):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"mix fraction must be in [0, 1), got {fraction}")
        producer = base.targets[base.language]["producer"] if base.language else None
        for ds in extra:
            if set(ds.targets) != set(base.targets):
                raise ManifestMismatchError(f"{ds.samples_dir}: targets of {sorted(ds.targets)}, the training shards "
                                            f"have {sorted(base.targets)}; mixed shards need the same teachers")
            got = ds.targets[ds.language]["producer"] if ds.language else None
            if (got or {}).get("weights_digest") != (producer or {}).get("weights_digest"):
                raise ManifestMismatchError(f"{ds.samples_dir}: scored by another language teacher than the "
                                            "training shards")
        self.base, self.extra, self.fraction = base, extra, fraction
        self.offsets = np.cumsum([len(base)] + [len(ds) for ds in extra]).tolist()

    def __getattr__(self, name):  # samples, targets, language, vision, target_dirs, ...: the base's
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def epoch_rows(self) -> int:  # the length of `block_order`
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        part = next(p for p, end in enumerate(self.offsets) if i < end)
        if part == 0:
            return self.base[i]
        # the extra sets' captions are not ground truth (e.g. the student's own tokens): collate drops their CE labels
        return {**self.extra[part - 1][i - self.offsets[part - 1]], "ground_truth": False}

    def block_order(self, seed: int, epoch: int, window: int | None = None) -> list[int]:
        base = self.base.block_order(seed, epoch, window)
        n_extra = len(self) - len(base) if self.extra else 0
        if n_extra == 0 or self.fraction == 0:
            return base
        rng = np.random.default_rng([seed, epoch, 1])
        cycles = math.ceil(len(base) * self.fraction / n_extra) + 1
        extra = iter((len(base) + np.concatenate([rng.permutation(n_extra) for _ in range(cycles)])).tolist())
        rows = iter(base)
        return [next(extra) if math.floor((j + 1) * self.fraction) > math.floor(j * self.fraction) else next(rows)
                for j in range(len(base))]


def mixed_dataset(base: DistillDataset, folders, fraction: float, student_vocab: int | None,
                  expected_digests: dict) -> MixedDataset:
    """`base` mixed with shard folders (each with samples/ and targets/<base's language teacher>/), every folder
    checked as the training shards are."""
    extra = []
    for folder in map(Path, folders):
        folder, dirs = folder.expanduser(), {base.language: folder.expanduser() / "targets" / base.language}
        ds = DistillDataset(folder / "samples", dirs, "train", transform=base.transform)
        check_manifests(ds.samples, ds.targets, student_vocab=student_vocab, expected_digests=expected_digests,
                        where={"samples": folder / "samples", **dirs})
        extra.append(ds)
    return MixedDataset(base, extra, fraction)
