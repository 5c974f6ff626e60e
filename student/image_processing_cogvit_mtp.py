"""Image processor of the CogViT MTP student: the one preprocessing used in training, evaluation and inference.

RGB, bilinear resize to `size` x `size` (PIL), rescale by 1/255, normalise with mean 0.5 and std 0.5 per
channel. `student.pixels.image_tensor` (the dataset's transform) calls `pixels` below, so the shards'
training images and a user's images go through the same code.
"""

import numpy as np
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling

IMAGE_MEAN, IMAGE_STD = 0.5, 0.5


class CogViTMTPImageProcessor(PilBackend):
    r"""Constructs the student's image processor (a PIL-backend `BaseImageProcessor`).

    `processor(images, return_tensors="pt")["pixel_values"]` is [B, 3, size, size] float32. The size must be
    a multiple of the student's `patch_size * spatial_merge_size`; `from_student_config` sets it from the
    training image size.
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BILINEAR
    image_mean = [IMAGE_MEAN] * 3
    image_std = [IMAGE_STD] * 3
    size = {"height": 56, "width": 56}
    default_to_square = True
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    @classmethod
    def for_size(cls, image_size: int) -> "CogViTMTPImageProcessor":
        return cls(size={"height": int(image_size), "width": int(image_size)})

    def pixels(self, image: Image.Image) -> np.ndarray:
        """One PIL image -> [3, H, W] float32, the same numbers as `self(image)["pixel_values"][0]`."""
        return self(image, return_tensors="np")["pixel_values"][0]


__all__ = ["CogViTMTPImageProcessor"]
