"""The distillation objective: the student, its loss terms and their balancer in one module.

DeepSpeed wraps this module, so learned balancing parameters (uncertainty's log-variances) are
optimised and checkpointed with the student, and balancer state (EMA means, GradNorm weights)
is saved and restored with every checkpoint.

Terms balanced against each other (a training stage switches each on or off): `language` (CE
mixed with sparse KD on the main head and the MTP depths, on the clean image), one term per vision
teacher (cosine + smooth-L1 on standardised features, on the masked view) and `contrastive`
(SigLIP's sigmoid loss between the clean image's `image` summary token and the caption pooled by
the decoder). `drafter` (distill/losses/drafters.py: the MTP modules learn the frozen main head's greedy tokens)
runs in a stage of its own. The shared trunk is the student's vision tower: the only part that every term trains.
`taps` measures each term's gradient on it during the training backward (see distill.losses.balance.TrunkTaps).
"""

from __future__ import annotations

import torch
from torch import nn

from distill.losses.balance import TrunkTaps, build_balancer
from distill.losses.chunked import chunked_language_loss
from distill.losses.drafters import drafter_loss, greedy_captions
from distill.losses.image import same_caption, siglip_loss, vision_kd_loss
from distill.losses.language import LanguageDistillLoss
from distill.losses.targets import SparseTargets, kd_gate_keep
from distill.train.stages import CONTRASTIVE, DRAFTER, LANGUAGE


def balancer_options(loss_cfg) -> dict:
    """The chosen balancer's options from the loss config."""
    strategy = getattr(loss_cfg.balance, "value", loss_cfg.balance)
    if strategy == "static":
        return {"weights": dict(loss_cfg.static_weights)}
    if strategy == "gradnorm":
        return {"alpha": loss_cfg.gradnorm_alpha, "lr": loss_cfg.gradnorm_lr}
    return {}


class DistillObjective(nn.Module):
    def __init__(self, student: nn.Module, loss_cfg, vision: list[str], use_language: bool,
                 use_contrastive: bool = False, use_drafter: bool = False):
        super().__init__()
        self.student = student
        depth = student.config.mtp_depth
        self.language = LanguageDistillLoss(loss_cfg.kd_kind, loss_cfg.temperature,
                                            alpha=loss_cfg.ce_weight, mtp_weights=[loss_cfg.mtp_weight] * depth,
                                            uld_weight=loss_cfg.uld_weight,
                                            generated_kind=loss_cfg.generated_kd_kind,
                                            generated_kd_weight=loss_cfg.generated_kd_weight,
                                            label_smoothing=loss_cfg.label_smoothing,
                                            kd_gate=getattr(loss_cfg.kd_gate, "value", loss_cfg.kd_gate),
                                            kd_gate_nats=loss_cfg.kd_gate_nats)
        self.chunk_size = loss_cfg.chunk_size  # > 0: distill/losses/chunked.py, no full-vocab logits
        self.drafter_prompt_tokens = loss_cfg.drafter_prompt_tokens
        self.use_language, self.use_contrastive, self.use_drafter = use_language, use_contrastive, use_drafter
        self.vision = list(vision)
        self.terms = (([LANGUAGE] if use_language else []) + list(vision) + ([CONTRASTIVE] if use_contrastive else [])
                      + ([DRAFTER] if use_drafter else []))
        strategy = getattr(loss_cfg.balance, "value", loss_cfg.balance)
        self.balancer = build_balancer(strategy, self.terms, **balancer_options(loss_cfg))
        self.masked_patch_weight = loss_cfg.masked_patch_weight
        self.taps = TrunkTaps()
        self.measure = True  # read the terms' gradient norms on the tower during backward (bench turns it off)
        self._graph_terms: list[str] = []

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and the figures to log (detached tensors): raw losses, their parts, weights."""
        dtype = next(self.student.parameters()).dtype
        decoder = self.use_language or self.use_drafter
        chunked = self.use_language and self.chunk_size > 0
        if self.use_drafter:  # the drafters learn the student's own greedy captions (distill/losses/drafters.py)
            ids, mask = greedy_captions(self.student, batch["pixel_values"].to(dtype), batch["input_ids"],
                                        batch["attention_mask"], self.drafter_prompt_tokens)
            batch = {**batch, "input_ids": ids, "attention_mask": mask}
        out = self.student(pixel_values=batch["pixel_values"].to(dtype),
                           input_ids=batch["input_ids"] if decoder or self.use_contrastive else None,
                           attention_mask=batch["attention_mask"], text_logits_only=True,
                           branch_hook=self.taps if self.training and self.measure else None,
                           language=decoder, contrastive=self.use_contrastive,
                           head_states=chunked or self.use_drafter,
                           teacher_heads=bool(self.vision))  # no masked view in a stage with no vision term
        losses, logs = {}, {}
        lang = SparseTargets.from_mapping(batch["lang"]) if self.use_language else None  # read once, here
        if chunked:
            parts = chunked_language_loss(self.language, out.head_states, self.student.get_output_embeddings().weight,
                                          lang, batch["labels"], self.chunk_size)
        elif self.use_language:
            parts = self.language(out.logits, lang, labels=batch["labels"], mtp_logits=out.mtp_logits)
        if self.use_language:
            losses[LANGUAGE] = parts.pop("loss")
            logs.update({f"loss/{k}": v.detach() for k, v in parts.items()})
            if self.language.kd_gate != "none" and self.language.alpha < 1:  # selective KD: the main head's share
                keep = kd_gate_keep(lang, self.language.kd_gate, self.language.kd_gate_nats)
                logs["kd_gate/kept"] = (keep.sum() / lang.mask.sum().clamp_min(1)).detach().float()
        for name in self.vision:  # teacher features arrive standardised (standardize_batch)
            teacher = batch["vision"][name]
            student = out.teacher_outputs[name]
            mask = out.mask[name] if out.mask is not None else None
            parts = vision_kd_loss(student["summary"], student["features"], teacher["summary"],
                                   teacher["features"], mask, masked_weight=self.masked_patch_weight)
            losses[name] = parts.pop("loss")
            logs.update({f"loss/vision/{name}/{k}": v.detach() for k, v in parts.items()})
        if self.use_contrastive:
            head = self.student.contrastive
            parts = siglip_loss(*out.image_text_embeds, head.logit_scale, head.logit_bias,
                                same_caption(batch["input_ids"], batch["attention_mask"]))
            losses[CONTRASTIVE] = parts.pop("loss")
            logs["contrastive/accuracy"] = parts["accuracy"]
            logs["contrastive/logit_scale"] = head.logit_scale.detach().exp().squeeze()
        if self.use_drafter:
            parts = drafter_loss(out.head_states, self.student.get_output_embeddings().weight,
                                 batch["attention_mask"], self.student.config.draft_vocab)
            losses[DRAFTER] = parts.pop("loss")
            logs.update(parts)
        total, weights = self.balancer(losses)
        self._graph_terms = [t for t, v in losses.items() if v.requires_grad and self.measure]
        for k, v in losses.items():
            logs[term_metric(k)] = v.detach()
        logs.update({f"weight/{k}": torch.tensor(w) for k, w in weights.items()})
        logs["loss/total"] = total.detach()
        return total, logs

    def trunk_norms(self, scale: float = 1.0) -> torch.Tensor:
        """[T] weighted gradient norms of the terms on the vision tower, from the backward just run."""
        return self.taps.pop(self.terms, self._graph_terms, scale)

    def first_bad_term(self, logs: dict) -> str | None:
        """The name of the first non-finite raw loss in `logs`, for error messages."""
        for k, v in logs.items():
            if k.startswith("loss/") and not torch.isfinite(torch.as_tensor(v)).all():
                return k
        return None


def term_metric(term: str) -> str:
    """The MLflow name of a balanced term's raw loss."""
    return f"loss/{term}" if term in (LANGUAGE, CONTRASTIVE, DRAFTER) else f"loss/vision/{term}"
