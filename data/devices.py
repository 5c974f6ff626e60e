"""Devices: one rule for turning a config's device name into a torch device, and for moving
batches there. `auto` is CUDA when present, else CPU."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: config validation checks device names in well under a second.
DEVICE_NAMES = "auto | cpu | cuda | cuda:N"
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: str | None) -> str:
    """The normalised name when it is one of DEVICE_NAMES, else ValueError. Syntax only: a config may be
    checked on a machine without CUDA for a run elsewhere; `resolve_device` checks CUDA is there."""
    if name is not None and not isinstance(name, str):
        raise ValueError(f"device must be a string, got {name!r}; expected {DEVICE_NAMES}")
    norm = (name or "auto").strip().lower()
    if not _DEVICE_RE.fullmatch(norm):
        raise ValueError(f"unknown device {name!r}; expected {DEVICE_NAMES}")
    return norm


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto` (or None): cuda when available, else cpu; otherwise the named device, checked."""
    import torch

    if isinstance(name, torch.device):
        return name
    name = check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but CUDA is not available here; use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} was asked for, but only {torch.cuda.device_count()} CUDA device(s) "
                         "are visible here")
    return device


def model_on(model, device=None) -> torch.device:
    """`device` (default: where the model is); the model is moved there."""
    import torch

    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    return device


def pin(batch):
    """The batch with every CPU tensor in pinned memory (for non-blocking copies to CUDA)."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.pin_memory() if batch.device.type == "cpu" else batch
    if isinstance(batch, Mapping):
        return {k: pin(v) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(pin(v) for v in batch)
    return batch


def to_device(batch, device: torch.device | str):
    """Move every tensor in a (nested) batch to `device`; pinned CPU tensors copy without blocking.

    On CUDA the batch is pinned first, so a single call per micro-batch overlaps the copy with
    the previous step's compute. Non-tensors pass through unchanged.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        batch = pin(batch)
    return _move(batch, device)


def _move(batch, device):
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, Mapping):
        return {k: _move(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_move(v, device) for v in batch)
    return batch
