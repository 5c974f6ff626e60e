"""HF vision encoders as teachers (kind "hf_vision"): a summary vector and patch features per image.

Any AutoModel vision encoder from a local folder: CLIPVisionModel, SiglipVisionModel, Dinov2Model
(with or without registers), ViTModel. A full CLIP/SigLIP folder loads only its vision tower.

- summary: pooler_output when the model has one with trained weights (CLIP: post-LN CLS, SigLIP:
  attention-pool head, DINOv2: LN CLS, ViT: dense+tanh pooler), else the CLS token, else the
  mean of the patch tokens (a model with neither);
- features: last_hidden_state without its prefix tokens (CLS and DINOv2 registers). The prefix
  count is sequence length - grid h*w, measured by a dummy forward at image_size.

Images are resized (no crop) to image_size x image_size so the patch grid covers the whole
image, as the student sees it. The folder's image processor, when present, does the resize and
normalisation; otherwise bicubic resize and the config's image_mean/std (default 0.5).
"""
import inspect
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from data.devices import resolve_device
from data.identity import weights_digest
from data.images import decode_image

from .contract import Modality
from .registry import offline_error, resolve_source, teacher_config, torch_dtype


def as_rgb(images) -> list:
    out = []
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise TypeError(f"image {i} is a {type(im).__name__}, not a PIL.Image")
        out.append(im.convert("RGB"))
    return out


def resize_normalize(images, size: int, mean, std) -> torch.Tensor:
    """PIL images -> float32 [B, 3, size, size]: bicubic resize, scale to [0, 1], (x - mean) / std."""
    arrays = [np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0 for im in as_rgb(images)]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def vision_rows(summary: np.ndarray, features: np.ndarray) -> list[dict]:
    return [{"summary": s, "features": f} for s, f in zip(summary, features, strict=True)]


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def image_rows(teacher, samples: list[dict]) -> list[dict]:
    """A vision teacher's `rows` (teachers/contract.py): `prepare`, then `rows_from`."""
    return teacher.rows_from(teacher.prepare(samples))


def prepare_images(teacher, samples: list[dict]) -> torch.Tensor:
    """A vision teacher's `prepare`: PNG decoding and `preprocess`, which collection runs a batch ahead."""
    return teacher.preprocess([decode_image(s["image"]) for s in samples])


def rows_from_pixels(teacher, pixel_values: torch.Tensor) -> list[dict]:
    """A vision teacher's `rows_from`: the forward on prepared pixels, as target rows."""
    return vision_rows(*teacher.soft_targets(pixel_values))


class HFVisionTeacher:
    """A `VisionTeacher` (teachers/contract.py) over any AutoModel vision encoder."""
    modality = Modality.vision

    def __init__(self, cfg, cache_dir):
        self.cfg = tc = teacher_config(cfg)
        self.device = resolve_device(tc.device)  # once, before any weights load
        location, local = resolve_source(tc, cache_dir)
        self.location = location
        kwargs = dict(revision=tc.revision, trust_remote_code=tc.trust_remote_code)
        try:
            config = AutoConfig.from_pretrained(location, **kwargs)
            vision_config = getattr(config, "vision_config", None)
            if vision_config is not None:  # a full CLIP/SigLIP model: load only the vision tower
                model_cls, kwargs["config"] = MODEL_MAPPING[type(vision_config)], vision_config
            else:
                model_cls = AutoModel
            if local and any(Path(location).glob("*.safetensors")):
                kwargs["use_safetensors"] = True
            model, info = model_cls.from_pretrained(
                location, dtype=torch_dtype(tc.dtype), output_loading_info=True, **kwargs)
            self.processor = None
            if not local or (Path(location) / "preprocessor_config.json").is_file():
                try:
                    self.processor = AutoImageProcessor.from_pretrained(location, revision=tc.revision)
                except OSError:
                    if local:
                        raise
        except OSError as err:
            if local:
                raise
            raise offline_error(tc, err) from err

        missing = list(info["missing_keys"])
        # a checkpoint without trained pooler weights (e.g. ViT from a classifier) gets a random
        # pooler: use the CLS token instead
        self.use_pooler = not any(k.startswith("pooler.") for k in missing)
        missing = [k for k in missing if not k.startswith("pooler.")]
        if missing:
            raise ValueError(f"teacher {tc.name!r}: weights missing from {location}: {missing[:5]}")
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.config = model.config
        self.dtype = torch_dtype(tc.dtype)
        native = getattr(self.config, "image_size", tc.image_size)
        self._forward_kwargs = {}
        if _pair(native) != _pair(tc.image_size):
            if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
                self._forward_kwargs["interpolate_pos_encoding"] = True

        patch = _pair(self.config.patch_size)
        self.grid = [tc.image_size // patch[0], tc.image_size // patch[1]]
        out = self.forward(torch.zeros(1, 3, tc.image_size, tc.image_size))
        hidden = out.last_hidden_state
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_prefix_tokens = hidden.shape[1] - self.num_patches
        if self.num_prefix_tokens < 0:
            raise ValueError(f"teacher {tc.name!r}: {hidden.shape[1]} tokens for a {self.grid} patch grid")
        pooled = getattr(out, "pooler_output", None)
        self.use_pooler = self.use_pooler and pooled is not None
        if self.use_pooler:
            self.summary_from = "pooler_output"
        else:
            self.summary_from = "cls" if self.num_prefix_tokens > 0 else "mean"
        self.summary_dim = int(pooled.shape[-1]) if self.use_pooler else int(hidden.shape[-1])
        self.feature_dim = int(hidden.shape[-1])

        mean = getattr(self.config, "image_mean", None) or [0.5, 0.5, 0.5]
        std = getattr(self.config, "image_std", None) or [0.5, 0.5, 0.5]
        self.mean, self.std = list(mean), list(std)
        self._identity = None

    def identity(self) -> dict:
        if self._identity is None:
            tc = self.cfg
            self._identity = {
                "name": tc.name, "kind": tc.kind, "source": tc.source, "revision": tc.revision,
                "weights_digest": weights_digest(self.location) if Path(self.location).is_dir() else None,
                "image_size": tc.image_size, "summary_dim": self.summary_dim, "feature_dim": self.feature_dim,
                "num_patches": self.num_patches, "grid": list(self.grid), "dtype": tc.dtype,
                "summary_from": self.summary_from, "num_prefix_tokens": self.num_prefix_tokens,
                "model_type": self.config.model_type,
            }
        return dict(self._identity)

    # The contract's `rows`, split in two so that collection can prepare the next batch in a thread.
    rows, prepare, rows_from = image_rows, prepare_images, rows_from_pixels

    def preprocess(self, images) -> torch.Tensor:
        """PIL images -> float32 pixel values [B, 3, image_size, image_size]."""
        size = self.cfg.image_size
        images = as_rgb(images)
        if self.processor is None:
            return resize_normalize(images, size, self.mean, self.std)
        kwargs = {"size": {"height": size, "width": size}}
        if hasattr(self.processor, "do_center_crop"):
            kwargs["do_center_crop"] = False
        pixels = self.processor(images, return_tensors="pt", **kwargs)["pixel_values"]
        if tuple(pixels.shape[-2:]) != (size, size):
            raise ValueError(f"teacher {self.cfg.name!r}: image processor gave {tuple(pixels.shape)}, "
                             f"expected {size}x{size} images")
        return pixels.float()

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor):
        """The bare model forward (a HF ModelOutput)."""
        x = pixel_values.to(self.device, self.dtype)
        return self.model(pixel_values=x, **self._forward_kwargs)

    @torch.inference_mode()
    def soft_targets(self, pixel_values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """summary float32 [B, summary_dim], features float32 [B, num_patches, feature_dim]."""
        out = self.forward(pixel_values)
        hidden = out.last_hidden_state
        if self.use_pooler:
            summary = out.pooler_output
        elif self.num_prefix_tokens > 0:
            summary = hidden[:, 0]
        else:
            summary = hidden.mean(dim=1)
        features = hidden[:, self.num_prefix_tokens:]
        return summary.float().cpu().numpy(), features.float().cpu().numpy()
