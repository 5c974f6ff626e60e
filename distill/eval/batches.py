"""The evaluation batches: a split's rows in order, collated, standardised and on the device."""

import torch

from data.dataset import DistillDataset, collate
from data.devices import to_device
from data.standardize import standardize_batch


def eval_batches(dataset: DistillDataset, batch_size: int, pad_id: int, stds: dict, device: torch.device, cross=None):
    """(items, batch): collated and standardised on the CPU, then moved to `device` once; with `cross`, the
    items are first moved into the student tokenizer's positions."""
    for lo in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(lo, min(lo + batch_size, len(dataset)))]
        items = [cross(it) for it in items] if cross is not None else items
        yield items, to_device(standardize_batch(collate(items, pad_id), stds), device)
