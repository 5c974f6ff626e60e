"""Image helpers shared by the source adapters, the shard writer, the teachers and the student.

Samples carry their image as PNG bytes (RGB). `encode_png` makes those bytes, `decode_image`
turns them back into an RGB PIL image and fails loudly on bad data. The student's pixel tensors are
made by its image processor (`student.pixels.image_tensor`, which the trainer passes to the dataset), the
teachers' by each teacher.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}


def to_pil(img: Image.Image | np.ndarray) -> Image.Image:
    """An RGB PIL image from a PIL image or an array (H×W, H×W×1, H×W×3 or H×W×4; uint8, or floats in [0, 1])."""
    if isinstance(img, Image.Image):
        return img if img.mode == "RGB" else img.convert("RGB")
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"image array must be uint8 or float in [0, 1], got dtype {arr.dtype}")
        arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or 0 in arr.shape:
        raise ValueError(f"image array must be H×W, H×W×3 or H×W×4 and non-empty, got shape {arr.shape}")
    return Image.fromarray(arr).convert("RGB")


def resize(img: Image.Image, size: int | None, resample: str = "bilinear") -> Image.Image:
    """Plain resize to size×size (no crop, aspect not kept); None or the same size leaves it as is."""
    if size is None or img.size == (size, size):
        return img
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
    return img.resize((size, size), RESAMPLE[resample])


def encode_png(img: Image.Image | np.ndarray) -> bytes:
    """RGB PNG bytes. Same pixels give the same bytes (PIL writes no timestamps)."""
    buf = io.BytesIO()
    to_pil(img).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_image(data: bytes) -> Image.Image:
    """An RGB PIL image from encoded bytes; ValueError naming the problem if they are not a usable image."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"image data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("image data is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"image data ({len(data)} bytes, starts {bytes(data[:8])!r}) cannot be decoded: {e}") from e
    if img.width == 0 or img.height == 0:
        raise ValueError(f"image has zero size ({img.width}×{img.height})")
    return img.convert("RGB")
