"""The distillation objective: the student, its loss terms and their balancer in one module.

DeepSpeed wraps this module, so learned balancing parameters (uncertainty's log-variances) are
optimised and checkpointed with the student, and balancer state (EMA means, GradNorm weights)
is saved and restored with every checkpoint.

Terms balanced against each other: `language` (CE mixed with sparse KD on the main head and the
MTP depths) and one term per vision teacher (cosine + smooth-L1 on standardised features).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from distill.balance import build_balancer, gradient_norms
from distill.losses import LanguageDistillLoss, vision_kd_loss
from distill.standardize import FeatureStandardizer

LANGUAGE = "language"


def standardizers(manifest: dict, folder: str | Path, mode: str) -> dict[str, FeatureStandardizer]:
    """Summary and patch standardisers of one vision teacher, from the stats its collection stored.

    They run on the batch in fp32 before the engine (a data transform), so bf16 training does not
    round the PHI-S rotation.
    """
    from data.shards import ShardError, sha256_file
    path = Path(folder) / manifest["feature_stats"]["file"]
    if not path.exists() or sha256_file(path) != manifest["feature_stats"]["sha256"]:
        raise ShardError(f"{path}: feature statistics missing or not matching the manifest's sha256; "
                         "re-run `mmtp collect`")
    stats = load_file(str(path))
    out = {}
    for part in ("summary", "features"):
        mean = stats[f"{part}_mean"].double()
        extra = {"cov": stats[f"{part}_cov"].double()} if mode == "phis" else {"std": stats[f"{part}_std"].double()}
        out[part] = FeatureStandardizer.from_stats(mean, mode=mode, **extra)
    return out


def standardize_batch(batch: dict, stds: dict[str, dict[str, FeatureStandardizer]]) -> dict:
    """Replace each vision teacher's raw features in `batch` by standardised ones."""
    with torch.no_grad():
        batch["vision"] = {name: {part: stds[name][part](x) for part, x in parts.items()}
                           for name, parts in batch["vision"].items() if name in stds}
    return batch


class DistillObjective(nn.Module):
    def __init__(self, student: nn.Module, loss_cfg, vision: list[str], use_language: bool):
        super().__init__()
        self.student = student
        depth = student.config.mtp_depth
        self.language = LanguageDistillLoss(loss_cfg.kd_kind, loss_cfg.temperature,
                                            alpha=loss_cfg.ce_weight, mtp_weights=[loss_cfg.mtp_weight] * depth)
        self.use_language = use_language
        self.vision = list(vision)
        self.terms = ([LANGUAGE] if use_language else []) + list(vision)
        strategy = getattr(loss_cfg.balance, "value", loss_cfg.balance)
        opts = {"weights": dict(loss_cfg.static_weights)} if strategy == "static" else {}
        self.balancer = build_balancer(strategy, self.terms, **opts)
        self.masked_patch_weight = loss_cfg.masked_patch_weight

    def forward(self, batch: dict, measure_gradnorm: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and the figures to log: raw losses, weights, and (on request) the gradient norm
        each term puts on the shared trunk (the vision tower's output) and its ratio to the language term.
        """
        dtype = next(self.student.parameters()).dtype
        out = self.student(pixel_values=batch["pixel_values"].to(dtype), input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"], text_logits_only=True)
        losses, logs = {}, {}
        if self.use_language:
            parts = self.language(out.logits, batch["lang"], labels=batch["labels"], mtp_logits=out.mtp_logits)
            losses[LANGUAGE] = parts.pop("loss")
            logs.update({f"loss/{k}": v.detach() for k, v in parts.items()})
        for name in self.vision:  # teacher features arrive standardised (standardize_batch)
            teacher = batch["vision"][name]
            student = out.teacher_outputs[name]
            mask = out.mask[name] if out.mask is not None else None
            parts = vision_kd_loss(student["summary"], student["features"], teacher["summary"],
                                   teacher["features"], mask, masked_weight=self.masked_patch_weight)
            losses[name] = parts.pop("loss")
            logs.update({f"loss/vision/{name}/{k}": v.detach() for k, v in parts.items()})
        shared = out.vision_hidden_states
        total, weights = self.balancer(losses, shared)
        if measure_gradnorm and len(losses) > 1:
            norms = gradient_norms(losses, shared, weights)  # of each weighted term, on the shared trunk
            ref = norms.get(LANGUAGE) or sum(norms.values()) / len(norms)
            logs.update({f"gradnorm/{k}": v for k, v in norms.items()})
            logs.update({f"gradnorm_ratio/{k}": v / max(ref, 1e-12) for k, v in norms.items() if k != LANGUAGE})
        for k, v in losses.items():
            logs[f"loss/{k}" if k == LANGUAGE else f"loss/vision/{k}"] = v.detach()
        logs.update({f"weight/{k}": w for k, w in weights.items()})
        logs["loss/total"] = total.detach()
        return total, logs

    def first_bad_term(self, logs: dict) -> str | None:
        """The name of the first non-finite raw loss in `logs`, for error messages."""
        for k, v in logs.items():
            if k.startswith("loss/") and not torch.isfinite(torch.as_tensor(v)).all():
                return k
        return None
