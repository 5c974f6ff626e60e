"""Losses on image features: the vision feature KD against each teacher's standardised features, and the
contrastive image-text term (docs/losses.md, "Vision KD" and "Contrastive image-text term")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _feature_terms(student: Tensor, teacher: Tensor, weight: Tensor | None,
                   beta: float) -> tuple[Tensor, Tensor]:
    """Weighted means of (1 - cosine) and smooth-L1 (mean over D) over all leading dims."""
    if student.shape != teacher.shape:
        raise ValueError(f"student features {tuple(student.shape)} and teacher features "
                         f"{tuple(teacher.shape)} differ in shape")
    s, t = student.float(), teacher.detach().float()
    cos = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-6)
    l1 = F.smooth_l1_loss(s, t, reduction="none", beta=beta).mean(-1)
    if weight is None:
        return cos.mean(), l1.mean()
    total = weight.sum().clamp_min(1e-12)
    return (cos * weight).sum() / total, (l1 * weight).sum() / total


def vision_kd_loss(student_summary: Tensor | None, student_patches: Tensor | None,
                   teacher_summary: Tensor | None, teacher_patches: Tensor | None,
                   patch_mask: Tensor | None = None, *, masked_weight: float = 1.0,
                   summary_weight: float = 1.0, patch_weight: float = 1.0, cos_weight: float = 1.0,
                   l1_weight: float = 1.0, beta: float = 1.0) -> dict[str, Tensor]:
    """Feature KD for one vision teacher: cosine + smooth-L1 between the adaptor outputs and the
    teacher's standardised features (see data.standardize), on the summary [B, D] and on the
    patches [B, P, D].

    `patch_mask` [B, P] marks what was hidden from the student (masked-image distillation): a bool
    per patch, or the masked fraction of each teacher cell in [0, 1] (the student's mask pooled to
    the teacher's grid). All patches count; a patch weighs 1 + (masked_weight - 1) * fraction, so a
    fully masked one weighs `masked_weight` times a visible one. Pass None for a part
    the teacher does not have. Returns {"loss", "summary/cos", "summary/smooth_l1",
    "patches/cos", "patches/smooth_l1"} for the parts present.
    """
    out: dict[str, Tensor] = {}
    loss = None
    if (student_summary is None) != (teacher_summary is None):
        raise ValueError("summary features given for only one of student and teacher")
    if (student_patches is None) != (teacher_patches is None):
        raise ValueError("patch features given for only one of student and teacher")
    if student_summary is not None:
        cos, l1 = _feature_terms(student_summary, teacher_summary, None, beta)
        out["summary/cos"], out["summary/smooth_l1"] = cos, l1
        loss = summary_weight * (cos_weight * cos + l1_weight * l1)
    if student_patches is not None:
        weight = None
        if patch_mask is not None:
            if patch_mask.shape != student_patches.shape[:-1]:
                raise ValueError(f"patch_mask has shape {tuple(patch_mask.shape)}, expected "
                                 f"{tuple(student_patches.shape[:-1])}")
            weight = 1.0 + (float(masked_weight) - 1.0) * patch_mask.float().to(student_patches.device)
        cos, l1 = _feature_terms(student_patches, teacher_patches, weight, beta)
        out["patches/cos"], out["patches/smooth_l1"] = cos, l1
        part = patch_weight * (cos_weight * cos + l1_weight * l1)
        loss = part if loss is None else loss + part
    if loss is None:
        raise ValueError("vision_kd_loss needs the summary, the patches, or both")
    out["loss"] = loss
    return out


def siglip_loss(image: Tensor, text: Tensor, logit_scale: Tensor, logit_bias: Tensor,
                positives: Tensor | None = None) -> dict[str, Tensor]:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023) over a batch of L2-normalised image [B, C] and
    caption [B, C] embeddings: -1/B sum_ij log sigmoid(z_ij (t <x_i, y_j> + b)), t = exp(logit_scale),
    z_ij = +1 for a matching pair and -1 otherwise. `positives` [B, B] bool marks the matching pairs
    (default: the diagonal); templated captions repeat, so pairs with identical captions should count as
    matches rather than as negatives. Returns {"loss", "accuracy"}: accuracy is the share of images whose
    highest-scoring caption in the batch is a match."""
    if image.shape != text.shape or image.dim() != 2:
        raise ValueError(f"image {tuple(image.shape)} and caption {tuple(text.shape)} embeddings must both be [B, C]")
    n = image.shape[0]
    if positives is None:
        positives = torch.eye(n, dtype=torch.bool, device=image.device)
    logits = image.float() @ text.float().T * logit_scale.float().exp() + logit_bias.float()
    z = positives.float() * 2 - 1
    loss = -F.logsigmoid(z * logits).sum() / n
    accuracy = positives.gather(1, logits.argmax(1, keepdim=True)).float().mean()
    return {"loss": loss, "accuracy": accuracy.detach()}


def same_caption(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, B] bool: rows i, j hold the same caption (the same tokens over the same length)."""
    ids = input_ids.masked_fill(attention_mask == 0, -1)
    return (ids[:, None, :] == ids[None, :, :]).all(-1)
