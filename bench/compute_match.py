"""Compute matching of bench/kd_vs_ce.py's arms (COMPUTE_RULE): the CE arms' stage list from the KD config's,
the check that every arm trains the same steps, batches and parts, and the curve stage's checkpoint plan."""

import math

TEACHER_TERMS = ("vision",)  # the terms that need a teacher once configs/baseline_ce.yaml makes language CE-only
COMPUTE_RULE = (
    "Every arm runs the same list of stages with the same steps, micro-batches, learning rates, warm-ups and "
    "trainable parts. The CE arms (configs/baseline_ce.yaml: cross-entropy on the ground truth, no vision teacher) "
    "drop the teacher terms (vision) from each stage; a stage whose terms are all teacher terms gets the "
    "contrastive image-text term instead, with the same steps and trainable parts (the teachers' adaptor heads, "
    "which a CE student does not have, replaced by the contrastive head, that term's own head), so the vision "
    "tower gets the same number of updates in every arm.")

def _names(values) -> list[str]:
    return [str(getattr(v, "value", v)) for v in values]


def ce_stages(stages: list[dict]) -> list[dict]:
    """The CE arms' `train.stages` from the KD config's (COMPUTE_RULE): teacher terms removed, and a stage with
    only teacher terms gets the contrastive term, its steps and batches kept, `heads` (the teachers' adaptor
    heads) swapped for `contrastive` (that term's head). An empty list (one default joint stage) stays empty."""
    out = []
    for stage in stages:
        stage = dict(stage, losses=_names(stage["losses"]), trainable=_names(stage.get("trainable") or ["all"]))
        kept = [t for t in stage["losses"] if t not in TEACHER_TERMS]
        if kept:
            stage["losses"] = kept
        else:
            stage["losses"] = ["contrastive"]
            stage["trainable"] = list(dict.fromkeys("contrastive" if p == "heads" else p for p in stage["trainable"]))
        out.append(stage)
    return out


def resolved_stages(cfg) -> list[dict]:
    """What the trainer will run for `cfg` (distill.train.stages.resolve_stages), as plain dicts."""
    from distill.train import resolve_stages
    return [{"name": s.name, "start": s.start, "steps": s.steps, "terms": list(s.terms), "parts": list(s.parts),
             "lr": s.lr, "micro_batch_size": s.micro_batch_size, "warmup_steps": s.warmup_steps}
            for s in resolve_stages(cfg, bool(cfg.teachers.vision))]


def check_compute_matched(stage_lists: dict[str, list[dict]]) -> None:
    """Raise ValueError unless every arm's resolved stages have the same names, steps, micro-batches, learning
    rates and warm-ups, and train the vision tower in the same stages."""
    def key(stage):
        return (stage["name"], stage["steps"], stage["micro_batch_size"], stage["lr"], stage["warmup_steps"],
                "vision" in stage["parts"])
    reference = None
    for arm, stages in stage_lists.items():
        keys = [key(s) for s in stages]
        if reference is None:
            reference = (arm, keys)
        elif keys != reference[1]:
            raise ValueError(f"arms {reference[0]} and {arm} are not compute-matched: {reference[1]} against {keys} "
                             "(name, steps, micro-batch, lr, warm-up, trains the vision tower)")


def curve_plan(stages: list[dict], points: int, stage_name: str | None = None) -> dict:
    """Where the learning curve is read: `points` step counts of the curve stage (default: the last stage with
    the language term), the checkpoint interval that lands on them, and how many checkpoints to keep so that
    they outlive the later stages' checkpoints. `final_is_last`: the later stages train only the MTP modules, so
    the final student's main head is the one the curve stage ended with."""
    names = [s["name"] for s in stages]
    if stage_name is None:
        language = [s["name"] for s in stages if "language" in s["terms"]]
        if not language:
            raise ValueError("no stage has the language term: there is no language learning curve to read")
        stage_name = language[-1]
    if stage_name not in names:
        raise ValueError(f"curve stage {stage_name!r} is not one of the stages {names}")
    index = names.index(stage_name)
    stage, later = stages[index], stages[index + 1:]
    every = max(1, math.ceil(stage["steps"] / points))
    steps = sorted({min(every * m, stage["steps"]) for m in range(1, points + 1)})
    after = sum(len({s for s in range(1, x["steps"] + 1) if s % every == 0 or s == x["steps"]}) for x in later)
    return {"stage": stage_name, "start": stage["start"], "steps": steps,
            "global_steps": [stage["start"] + s for s in steps], "checkpoint_every": every,
            "keep_checkpoints": len(steps) + after, "final_is_last": all(set(x["parts"]) <= {"mtp"} for x in later)}
