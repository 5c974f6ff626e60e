"""Distillation against training without teachers, made fair: the same student, data, steps and vision-tower
updates in every arm, a corrected and an uncorrected language teacher, a label-smoothing control, 5 seeds.

    python bench/kd_vs_ce.py [--config configs/default.yaml --config configs/full.yaml] [--seeds 0 1 2 3 4]
                             [--arms kd_corrected kd_uncorrected ce ce_ls] [--adapt folds=2 ...]
                             [--label-smoothing 0.1] [--out docs/results/kd_vs_ce.json] [key=value ...]
    python bench/kd_vs_ce.py --table docs/results/kd_vs_ce.json    # the markdown table of a results file
    python bench/kd_vs_ce.py --plot docs/results/kd_vs_ce.json     # docs/img/kd_vs_ce_curves.png from it

Arms, per seed:
- `kd_corrected`: the config with `teachers.language.adapt` set (the config's own adapt settings, else
  `{folds: 2}`; `--adapt key=value` overrides single keys): the collection first fits LoRA corrections of the
  language teacher on the train captions (cross-fitted), and the targets come from the corrected teacher;
- `kd_uncorrected`: the config with `teachers.language.adapt=null`: the teacher as shipped;
- `ce`: configs/baseline_ce.yaml on top (cross-entropy on the ground truth, no vision teacher) with the
  compute-matched stage list (below);
- `ce_ls`: `ce` with `loss.label_smoothing=--label-smoothing` (0.1): soft targets without a teacher, the
  control that tells distillation apart from plain smoothing.
The two KD arms need their own shards (another teacher, other targets): <work>/shards-corrected and
<work>/shards-uncorrected, each collected once by `flows.collect.run_collect` (finished shards are reused);
the CE arms read the uncorrected folder (they use its samples only).

Compute matching (COMPUTE_RULE, recorded in the results with each arm's resolved stage list): every arm runs
the same stages with the same steps, micro-batches, learning rates and trainable parts. The CE arms drop the
teacher terms (vision) from each stage, and a stage left with only teacher terms (the vision stage of
configs/full.yaml) takes the contrastive image-text term instead, same steps and parts (the teachers' adaptor
heads, which a CE student does not have, swapped for the contrastive head, that term's own head), so the vision
tower gets as many updates in every arm. The trainer's semantics are untouched: the CE arms' `train.stages` is
written out here (`ce_stages`) and checked against the KD arms' (`check_compute_matched`).

Learning curves: the trainer checkpoints every `train.checkpoint_every` steps of each stage (DeepSpeed
checkpoints, tagged by the global step). Each arm sets it to a third (`--curve-points`) of the curve stage (the
last stage with the language term: `joint`) and keeps just enough checkpoints (`train.keep_checkpoints`) that
those of the curve stage survive the stages after it; after training each is turned into a student folder
(`checkpoint_student`) and evaluated without probes and decoding (perplexity, agreement, KL, grounding), and the
last point is the final student (the drafter stage after `joint` trains only the MTP modules, so the main head
is the one `joint` ended with). No trainer option was needed; checkpointing does not change the training (the
same steps, seeds and data order), it only costs the writes. The checkpoints and curve students are deleted
once the run's row is saved (`--keep-checkpoints` keeps them).

Results (--out): per arm and metric mean, std and values over the seeds, the references (probes of the
teacher and of pixels), `eval/teacher_perplexity` per arm (the evaluator's exact teacher perplexity, when it
reports it), the kd_uncorrected students evaluated against the corrected teacher's shards too (row
`kd_uncorrected vs corrected`), the language weight the balancer gave in the curve stage (`weight/language`
from MLflow), the curves, each arm's stage list, training wall times, the collection and correction times, the
config digest and command, and the goals, each with its figures and a two-sided Welch t-test p-value over the
seeds (`welch_p`; a single reference value is a constant, so the test is then one-sample). "beats" = the mean
on the right side and p < 0.05; "by > 2 std" = the means differ by more than twice the larger seed std; "no
worse" = at most 2 such std on the wrong side. Runs are logged to MLflow under the experiment `mmtp-kd-vs-ce`.
A killed benchmark resumes: finished arms and seeds are read back from their bench_row.json, a half-trained
run continues from its last checkpoint.

Budget (BUDGET_RULE; configs/full.yaml is sized by it): 4 arms x 5 seeds in about 3 hours on the 2-core CPU.
From docs/training.md's figures (vision step 0.36 s, joint step 1.85 s, evaluation about 1 min) and what was
measured for this benchmark on this machine (2026-12-07, steps interleaved KD / CE, medians of 5): a vision
step 0.34 s and the CE arms' contrastive step in its place 0.36 s (batch 32, decoder frozen), a contrastive-stage
step 0.67 s / 0.60 s, a joint step 1.68 s / 1.53 s (CE: 0.91x KD), a drafter step about 1.2 s; an evaluation
50 s with the probes and the decoding figures, 24 s without (the curve points, the row against the corrected
shards); about 60 s a run for building the stages' engines, their checkpoints and exports. With full.yaml's
300 vision, 40 contrastive, 90 joint and 30 drafter steps:
    KD run: 300 x 0.36 + 40 x 0.67 + 90 x 1.85 + 30 x 1.2 + 60 = 397 s, + 50 + 2 x 24 s of evaluation
    CE run: 300 x 0.36 + 40 x 0.60 + 90 x 1.69 + 30 x 1.2 + 60 = 380 s, + the same
    10 KD runs x 495 s + 10 CE runs x 478 s + 5 x 24 s (kd_uncorrected against the corrected shards)
        = 9,850 s = 2 h 44 min,
plus two collections (about 2-3 min each on an idle machine) and the teacher correction (configs/default.yaml's
`adapt`: 2 folds of at most 30 LoRA steps of SmolLM2-135M, 80 s for `mmtp adapt` on an idle machine, budgeted
at 4 min): about 2 h 54 min. One seed of kd_uncorrected and
ce at this size (2026-12-07, the machine shared with other work) took 122 s for the vision stage in both arms (the
CE arm's contrastive steps in its place), 33-34 s for the contrastive stage and 53 s for the drafter stage. Step
times on this shared machine move by about 25 % from run to run. A run resumed after a kill reports only the
training time after the resume (`train_seconds`).
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from distill.env import apply_env_defaults  # noqa: E402

apply_env_defaults()

from data.shards import atomic_write_json  # noqa: E402
from distill.config import load_config, output_path, shards_path, teacher_configs, to_container  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compute_match import (  # noqa: E402
    COMPUTE_RULE,
    ce_stages,
    check_compute_matched,
    curve_plan,
    resolved_stages,
)
from kd_vs_ce_report import (  # noqa: E402  (the goals, the table and the plot of a results file)
    ARMS,
    CE_ARMS,
    CURVE_METRICS,
    VS_CORRECTED,
    curve_stats,
    goals,
    language_weights,
    plot,
    table,
    training_figures,
)
from seed_stats import stats  # noqa: E402

DEFAULT_ADAPT = {"folds": 2}
# the same in every arm and seed (plus eval/probe/<teacher>): figures of the data, not of a student or a teacher
REFERENCES = ("eval/probe/pixels", "eval/unigram_perplexity", "eval/trigram_perplexity")
BUDGET_RULE = (
    "4 arms x 5 seeds in about 3 hours on the 2-core CPU: configs/full.yaml's stage steps are chosen so that 10 KD "
    "runs and 10 CE runs (vision step 0.36 s, or a contrastive step in its place, 0.36 s; joint step 1.85 s, 1.69 s "
    "for CE) with their evaluations (50 s, plus 24 s per curve point) fit with the two collections and the teacher "
    "correction: about 2 h 54 min (bench/kd_vs_ce.py's docstring).")


# ---------------------------------------------------------------------------------------------- running

def evaluate(cfg, folder: Path, out_dir: Path, mtp: bool, probe: bool = True, shards_dir: str | None = None) -> dict:
    """`mmtp evaluate`'s metrics of the student in `folder` (its report goes to out_dir/eval), against the
    shards of `shards_dir` (default the config's)."""
    from omegaconf import OmegaConf

    from distill.eval import evaluate_run
    ev = {"student": str(folder), "baseline": None, "probe": probe, **({} if mtp else {"mtp_prompts": 0})}
    ecfg = OmegaConf.merge(cfg, {"output_dir": str(out_dir), "evaluate": ev,
                                 **({"shards_dir": shards_dir} if shards_dir else {})})
    targets = {t.name: shards_path(ecfg, "targets", t.name) for t in teacher_configs(ecfg)}
    return evaluate_run(ecfg, targets)["metrics"]


def checkpoint_student(ckpt_dir: Path, step: int, like: Path, out: Path, zero_stage: int) -> Path:
    """The student of the trainer's checkpoint at global `step` as an HF folder `out`: `like` (a student folder of
    the same run: config, tokenizer, processor) with the checkpoint's weights, saved as the trainer exports."""
    import torch

    import student
    from distill.train.engine import MARKER, _deepspeed_state_classes, tag_for, verify_checkpoint
    tag = Path(ckpt_dir) / tag_for(step)
    if not (tag / MARKER).exists():
        raise FileNotFoundError(f"{tag}: no complete checkpoint at step {step} (train.keep_checkpoints too low?)")
    if zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        module = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag.name)
    else:  # ZeRO 0-2 keep the whole module state in the model-states file
        verify_checkpoint(tag)
        with torch.serialization.safe_globals(_deepspeed_state_classes()):
            module = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    weights = {k.removeprefix("student."): v.detach().to(torch.float32) for k, v in module.items()
               if k.startswith("student.")}
    model = student.CogViTMTPForDistillation.from_pretrained(str(like), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())  # DeepSpeed stores a tied weight once
    if unexpected or set(missing) - tied:
        raise ValueError(f"{tag}: the checkpoint does not fit {like}: missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)}")
    model.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(like, tmp)  # tokenizer, processor, card; config and weights are written again below
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # as export_student saves them
    model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def train_and_evaluate(cfg, arm: str, seed: int, plan: dict, extra_shards: dict[str, str],
                       keep_checkpoints: bool = False) -> dict:
    """Train (resuming a killed run of the same arm and seed), evaluate the student, its curve checkpoints and,
    for each of `extra_shards` (row name -> shards folder), the student against those shards; keep the figures in
    <output_dir>/bench_row.json, so that a re-run of the benchmark skips finished arms and seeds."""
    from distill.train import run_training
    done = output_path(cfg, "bench_row.json")
    if done.exists():
        return json.loads(done.read_text())
    start = time.perf_counter()
    summary = run_training(cfg)
    seconds = time.perf_counter() - start
    folder = Path(summary["student_dir"])
    rows = {arm: evaluate(cfg, folder, output_path(cfg), mtp=True)}
    for name, shards in extra_shards.items():
        rows[name] = evaluate(cfg, folder, output_path(cfg, "eval-" + name.replace(" ", "-")), mtp=False,
                              probe=False, shards_dir=shards)
    curve = {}
    stage_dir = output_path(cfg, "stages", plan["stage"])
    like = stage_dir if stage_dir.is_dir() else folder
    for local, step in zip(plan["steps"], plan["global_steps"], strict=True):
        if local == plan["steps"][-1] and plan["final_is_last"]:
            metrics = rows[arm]  # the drafter stage after it leaves the main head as the curve stage ended it
        elif local == plan["steps"][-1] and stage_dir.is_dir():
            metrics = evaluate(cfg, stage_dir, stage_dir, mtp=False, probe=False)
        else:
            point = checkpoint_student(output_path(cfg, "checkpoints"), step, like,
                                       output_path(cfg, "curve", f"{plan['stage']}-{local:06d}"), cfg.train.zero_stage)
            metrics = evaluate(cfg, point, point, mtp=False, probe=False)
        curve[str(local)] = {k: metrics[k] for k in CURVE_METRICS if k in metrics}
    print(json.dumps({"arm": arm, "seed": seed, "train_seconds": round(seconds, 1),
                      "perplexity": rows[arm].get("eval/perplexity"), "probe": rows[arm].get("eval/probe/student")}),
          flush=True)
    result = {"seconds": seconds, "rows": rows, "curve": curve}
    atomic_write_json(done, result)  # a killed run never leaves a half-written marker
    if not keep_checkpoints:  # the row holds every figure; a finished run is never resumed
        shutil.rmtree(output_path(cfg, "checkpoints"), ignore_errors=True)
        shutil.rmtree(output_path(cfg, "curve"), ignore_errors=True)
    return result


def adapt_settings(base, pairs: list[str]) -> dict:
    """The corrected arm's `teachers.language.adapt`: the config's, else DEFAULT_ADAPT, with `key=value` pairs
    (values read as YAML) on top."""
    own = to_container(base)["teachers"]["language"].get("adapt")
    settings = dict(own) if own else dict(DEFAULT_ADAPT)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--adapt {pair!r} is not of the form key=value")
        settings[key] = yaml.safe_load(value)
    return settings


def arm_config(base: dict, arm: str, seed: int, work: Path, shards: dict[str, str], adapt: dict | None,
               label_smoothing: float, stages: list[dict], extra: tuple = ()):
    """The config of one arm and seed: the resolved base config with the arm's layers and `extra` overrides on
    top."""
    layers: list = [base]
    overrides = [f"seed={seed}", "train.resume=true", f"output_dir={work / f'{arm}-seed{seed}'}", *extra]
    if arm == "kd_corrected":
        layers.append({"teachers": {"language": {"adapt": adapt}}})
        overrides.append(f"shards_dir={shards['corrected']}")
    else:
        layers.append({"teachers": {"language": {"adapt": None}}})
        overrides.append(f"shards_dir={shards['uncorrected']}")
    if arm in CE_ARMS:
        layers += [str(ROOT / "configs" / "baseline_ce.yaml"), {"train": {"stages": ce_stages(stages)}}]
        if arm == "ce_ls":
            overrides.append(f"loss.label_smoothing={label_smoothing}")
    return load_config(layers, overrides)


def collect(base: dict, folder: Path, adapt: dict | None) -> float:
    """Collect the base config's shards into `folder` with the language teacher's `adapt` (None: uncorrected);
    returns the seconds it took (about 0 when the shards are already there)."""
    from flows.collect import run_collect
    layers: list = [base, {"teachers": {"language": {"adapt": adapt}}}]
    cfg = load_config(layers, [f"output_dir={folder}", f"shards_dir={folder}"])
    start = time.perf_counter()
    run_collect(cfg)
    return time.perf_counter() - start


def run(args) -> dict:
    from data.shards import digest
    overrides = ["tracking.experiment=mmtp-kd-vs-ce", "train.progress=false", "collect.progress=false",
                 *args.overrides]
    base_cfg = load_config(args.config, overrides)
    base = to_container(base_cfg)
    work = Path(args.work)
    arms = list(dict.fromkeys(args.arms))
    adapt = adapt_settings(base_cfg, args.adapt) if "kd_corrected" in arms else None
    shards, collect_seconds = {}, {}
    if any(a != "kd_corrected" for a in arms):
        shards["uncorrected"] = str(work / "shards-uncorrected")
        collect_seconds["uncorrected"] = collect(base, Path(shards["uncorrected"]), None)
    if "kd_corrected" in arms:
        shards["corrected"] = str(work / "shards-corrected")
        collect_seconds["corrected"] = collect(base, Path(shards["corrected"]), adapt)
    stages = base["train"]["stages"]

    def config(arm, seed, extra=()):
        return arm_config(base, arm, seed, work, shards, adapt, args.label_smoothing, stages, extra)

    stage_lists = {arm: resolved_stages(config(arm, args.seeds[0])) for arm in arms}
    check_compute_matched(stage_lists)
    plan = curve_plan(stage_lists[arms[0]], args.curve_points, args.curve_stage)
    checkpoints = (f"train.checkpoint_every={plan['checkpoint_every']}",
                   f"train.keep_checkpoints={plan['keep_checkpoints']}")
    extra = {"kd_uncorrected": {VS_CORRECTED: shards["corrected"]}} if "corrected" in shards else {}
    per_arm: dict[str, list[dict]] = {}
    seconds: dict[str, list[float]] = {}
    curves: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for arm in arms:
            result = train_and_evaluate(config(arm, seed, checkpoints), arm, seed, plan, extra.get(arm, {}),
                                        args.keep_checkpoints)
            seconds.setdefault(arm, []).append(result["seconds"])
            curves.setdefault(arm, []).append(result.get("curve", {}))
            for name, metrics in result["rows"].items():
                per_arm.setdefault(name, []).append(metrics)
    first = per_arm[arms[0]][0]
    teachers = [t.name for t in teacher_configs(base_cfg) if t is not base_cfg.teachers.language]
    refs = {k: first[k] for k in (*REFERENCES, *(f"eval/probe/{t}" for t in teachers)) if k in first}
    arms_stats = {name: {k: stats([m[k] for m in rows]) for k in rows[0] if k not in refs and all(k in m for m in rows)}
                  for name, rows in per_arm.items()}
    training = training_figures(base_cfg.tracking.uri, base_cfg.tracking.experiment, args.work)
    result = {"command": "python bench/kd_vs_ce.py " + " ".join(sys.argv[1:]),
              "config": args.config, "config_digest": digest(base), "seeds": args.seeds,
              "date": datetime.now(UTC).strftime("%Y-%m-%d"), "machine": args.machine, "arms_run": arms,
              "compute_matching": {"rule": COMPUTE_RULE, "budget": BUDGET_RULE, "stages": stage_lists},
              "adapt": adapt, "label_smoothing": args.label_smoothing, "shards": shards,
              "collect_seconds": collect_seconds,
              "train_seconds": {arm: stats(v) for arm, v in seconds.items()}, "references": refs,
              "arms": arms_stats,
              "teacher_perplexity": {a: s["eval/teacher_perplexity"] for a, s in arms_stats.items()
                                     if "eval/teacher_perplexity" in s},
              "language_weight": language_weights(training, plan["stage"], arms),
              "curves": curve_stats(curves, plan), "training": training}
    result["goals"] = goals(result)
    return result




def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", help="repeatable (default: default.yaml + full.yaml)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="the arms to run (default: all four)")
    p.add_argument("--adapt", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the corrected arm's teachers.language.adapt (repeatable; default: the "
                        f"config's, else {DEFAULT_ADAPT})")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="loss.label_smoothing of the ce_ls arm")
    p.add_argument("--curve-points", type=int, default=3, help="step counts of the curve stage evaluated")
    p.add_argument("--curve-stage", default=None, help="default: the last stage with the language term")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints and curve students")
    p.add_argument("--work", default="outputs/kd_vs_ce", help="where the shards are collected and each arm trains")
    p.add_argument("--out", default="docs/results/kd_vs_ce.json")
    p.add_argument("--machine", default="2-core CPU, no GPU")
    p.add_argument("--table", metavar="RESULTS_JSON", help="print the markdown table of a results file and exit")
    p.add_argument("--plot", metavar="RESULTS_JSON", help="plot the learning curves of a results file and exit")
    p.add_argument("--plot-out", default="docs/img/kd_vs_ce_curves.png")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if args.plot:
        print(plot(json.loads(Path(args.plot).read_text()), Path(args.plot_out)))
        return
    if not 0 <= args.label_smoothing < 1:
        p.error("--label-smoothing must be in [0, 1)")
    args.config = args.config or ["configs/default.yaml", "configs/full.yaml"]
    result = run(args)
    text = json.dumps(result, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
    atomic_write_json(Path(args.out), json.loads(text))
    print(text)


if __name__ == "__main__":
    main()
