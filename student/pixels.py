"""The student's pixels from a shard's PNG bytes: the image transform the trainer gives the dataset.

data/ knows nothing of the student, so training, evaluation and the on-policy rounds pass
`image_transform(size)` to `data.dataset.DistillDataset`. It runs the student's own image processor
(`CogViTMTPImageProcessor`, saved with an exported student), so the shards' images and a user's images
go through the same code.
"""

from functools import lru_cache, partial

import torch

from data.images import decode_image

from .image_processing_cogvit_mtp import CogViTMTPImageProcessor


def image_tensor(png: bytes, size: int) -> torch.Tensor:
    """PNG bytes -> [3, size, size] float32, the student's preprocessing."""
    return torch.from_numpy(_processor(size).pixels(decode_image(png)))


@lru_cache(maxsize=8)
def _processor(size: int) -> CogViTMTPImageProcessor:
    return CogViTMTPImageProcessor.for_size(size)


def image_transform(size: int):
    """`image_tensor` at one size, picklable for DataLoader workers."""
    return partial(image_tensor, size=int(size))
