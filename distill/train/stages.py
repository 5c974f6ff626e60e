"""The stages of a training recipe: which loss terms each one switches on and which parameters it trains.

GLM-5V-Turbo trains its CogViT encoder in stages: masked-image distillation from the vision teachers
first, then contrastive image-text training, then the whole model. Here a recipe is the list
`train.stages`; each stage gets its own optimizer and LR schedule over the parameters it trains, and
starts from the weights the previous stage exported. An empty list is one stage, `joint`, of
`train.max_steps` with the language and vision terms (the single-stage recipe).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import student

log = logging.getLogger(__name__)

LANGUAGE, VISION, CONTRASTIVE, DRAFTER = "language", "vision", "contrastive", "drafter"
TERMS = (LANGUAGE, VISION, CONTRASTIVE, DRAFTER)
DEFAULT_STEPS = 100  # the single `joint` stage's, when neither train.stages nor train.max_steps is set
# Parameter groups of the student, by name prefix. Every parameter belongs to exactly one.
PARTS = {"vision": ("vision.",), "heads": ("teacher_heads.",), "merger": ("merger.",),
         "decoder": ("decoder.", "lm_head."), "mtp": ("mtp.", "image_token_embedding"),
         "contrastive": ("contrastive.",)}
# The parts each loss term sends gradient to: a part no active term reaches is frozen, whatever the
# stage asks, so no optimizer holds parameters that never get a gradient.
REACHES = {LANGUAGE: {"vision", "merger", "decoder", "mtp"}, VISION: {"vision", "heads"},
           CONTRASTIVE: {"vision", "decoder", "contrastive"}, DRAFTER: {"mtp"}}


@dataclass
class Stage:
    name: str
    index: int
    start: int  # global optimizer steps done before this stage
    steps: int
    terms: tuple[str, ...]  # of TERMS
    parts: tuple[str, ...]  # trained parameter groups
    lr: float
    micro_batch_size: int
    warmup_steps: int

    @property
    def end(self) -> int:
        return self.start + self.steps


def _value(x):
    return getattr(x, "value", x)


def resolve_stages(cfg, has_vision_teachers: bool) -> list[Stage]:
    """The config's stages with the terms that `loss.language/vision/contrastive` leave on; a stage left
    with no term is dropped (the CE-only baseline drops the vision-only stage)."""
    tr = cfg.train
    raw = list(tr.stages) or [{"name": "joint", "steps": tr.max_steps or DEFAULT_STEPS, "losses": [LANGUAGE, VISION],
                                "trainable": ["all"], "lr": None, "micro_batch_size": None,
                                "warmup_steps": None}]
    allowed = {LANGUAGE: cfg.loss.language, VISION: cfg.loss.vision and has_vision_teachers,
               CONTRASTIVE: cfg.loss.contrastive, DRAFTER: True}
    stages, start = [], 0
    cap = tr.max_steps if tr.stages and tr.max_steps is not None else math.inf
    for s in raw:
        if start >= cap:
            log.info("stage %s dropped: train.max_steps=%d is reached before it", s["name"], cap)
            continue
        wanted = {_value(x) for x in s["losses"]}
        terms = tuple(t for t in TERMS if t in wanted and allowed[t])
        if DRAFTER in terms and len(terms) > 1:  # its targets are the main head's: they must not move under it
            raise ValueError(f"stage {s['name']}: the drafter term trains the MTP modules on the frozen main "
                             f"head's tokens and runs alone; move {[t for t in terms if t != DRAFTER]} to another "
                             "stage")
        if not terms:
            log.info("stage %s has no loss term left on (loss.* flags): skipped", s["name"])
            continue
        asked = {_value(p) for p in s["trainable"]}
        asked = set(PARTS) if "all" in asked else asked
        parts = tuple(p for p in PARTS if p in asked and any(p in REACHES[t] for t in terms))
        if not parts:
            raise ValueError(f"stage {s['name']}: none of the trainable parts {sorted(asked)} is reached by its "
                             f"loss terms {list(terms)}")
        steps = min(s["steps"], cap - start)
        stages.append(Stage(s["name"], len(stages), start, steps, terms, parts, s["lr"] or tr.lr,
                            s["micro_batch_size"] or tr.micro_batch_size,
                            tr.warmup_steps if s["warmup_steps"] is None else s["warmup_steps"]))
        start += steps
    if not stages:
        raise ValueError("train.stages: every stage was left without a loss term by the loss.* switches")
    return stages


def part_of(name: str) -> str:
    for part, prefixes in PARTS.items():
        if name.startswith(prefixes):
            return part
    raise ValueError(f"student parameter {name!r} belongs to no part of distill.train.stages.PARTS")


def freeze_for(student: nn.Module, stage: Stage) -> dict[str, int]:
    """Freeze every parameter outside the stage's parts (LoRA's own freezing inside them is kept);
    returns the trainable parameter count per part."""
    counts: dict[str, int] = {}
    for name, p in student.named_parameters():
        part = part_of(name)
        if part not in stage.parts:
            p.requires_grad_(False)
        elif p.requires_grad:
            counts[part] = counts.get(part, 0) + p.numel()
    return counts


def stage_student(config, previous: str | Path | None) -> nn.Module:
    """A stage's starting student: a new one built from `config`, or the saved student in `previous` (the last
    stage's export, or `train.init_from` for the first stage), whose token space and MTP depth must match."""
    if previous is None:
        return student.build_student(config)
    model = student.CogViTMTPForDistillation.from_pretrained(str(Path(previous).expanduser()), dtype=torch.float32)
    for key in ("vocab_size", "mtp_depth"):
        if getattr(model.config, key) != getattr(config, key):
            raise ValueError(f"{previous}: the student has {key}={getattr(model.config, key)}, this run builds "
                             f"{getattr(config, key)} (train.init_from or a stage export)")
    return model
