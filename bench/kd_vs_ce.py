"""Distillation against training without teachers: the same student, the same data, several seeds.

    python bench/kd_vs_ce.py [--config configs/default.yaml --config configs/full.yaml] [--seeds 0 1 2]
                             [--out docs/results/kd_vs_ce.json] [key=value ...]
    python bench/kd_vs_ce.py --table docs/results/kd_vs_ce.json      # the markdown table of a results file

Collects the config's shards once (finished shards are reused), then for every seed trains
- `kd`: the config as it is (the staged recipe with both teachers), and
- `ce`: the same config with configs/baseline_ce.yaml on top: no teacher term (cross-entropy on the
  ground-truth captions, `loss.vision=false`); a stage left without a term is dropped, and the
  contrastive stage, which needs no teacher, stays, so the two arms differ by the teachers alone,
evaluates every student on the test split with the metrics of `mmtp evaluate`, and evaluates the kd
arm's stage exports of --ablation-seeds too (the ablation: what each stage adds, cumulatively). A killed
benchmark resumes: finished arms and seeds are read back from their bench_row.json, a half-trained run
continues from its last checkpoint. Prints one JSON object
(mean, std and values of every metric per arm, the teacher and pixel references, training wall time,
the goals and whether each is reached) and writes it to --out. Runs are logged to MLflow under the
experiment `mmtp-kd-vs-ce`.
"""

import argparse
import json
import math
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from distill.env import apply_env_defaults  # noqa: E402

apply_env_defaults()

from data.shards import atomic_write_json  # noqa: E402
from distill.config import load_config, output_path, shards_path, teacher_configs, to_container  # noqa: E402

# The figures the default run reached before this benchmark existed (docs/training.md, 150-step
# single-stage run, 2026-12-02): "teacher KL and agreement no worse than today".
TODAY = {"eval/kl/main": 0.60, "eval/agreement/main": 0.25}
REFERENCES = ("eval/probe/pixels",)  # plus eval/probe/<teacher>: they do not depend on the student


def stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def evaluate(cfg, folder: Path, out_dir: Path, mtp: bool) -> dict[str, float]:
    """`mmtp evaluate`'s metrics of the student in `folder` (its report goes to out_dir/eval)."""
    from omegaconf import OmegaConf

    from distill.evaluate import evaluate_run
    ev = {"student": str(folder), "baseline": None, **({} if mtp else {"mtp_prompts": 0})}
    ecfg = OmegaConf.merge(cfg, {"output_dir": str(out_dir), "evaluate": ev})
    targets = {t.name: shards_path(cfg, "targets", t.name) for t in teacher_configs(cfg)}
    return evaluate_run(ecfg, targets)["metrics"]


def train_and_evaluate(cfg, arm: str, seed: int, ablation: bool) -> dict:
    """Train (resuming a killed run of the same arm and seed), evaluate, and keep the figures in
    <output_dir>/bench_row.json, so that a re-run of the benchmark skips finished arms and seeds."""
    from distill.launch import run_training
    done = output_path(cfg, "bench_row.json")
    if done.exists():
        return json.loads(done.read_text())
    start = time.perf_counter()
    summary = run_training(cfg)
    seconds = time.perf_counter() - start
    folder = Path(summary["student_dir"])
    rows = {arm: evaluate(cfg, folder, output_path(cfg), mtp=True)}
    if ablation:  # the stage exports before the last: what the earlier stages alone give
        for stage in summary["stages"][:-1]:
            stage_dir = output_path(cfg, "stages", stage)
            rows[f"{arm} after {stage}"] = evaluate(cfg, stage_dir, stage_dir, mtp=False)
    print(json.dumps({"arm": arm, "seed": seed, "train_seconds": round(seconds, 1),
                      "probe": rows[arm].get("eval/probe/student")}), flush=True)
    result = {"seconds": seconds, "rows": rows}
    atomic_write_json(done, result)  # a killed run never leaves a half-written marker
    return result


def goals(arms: dict, refs: dict, teacher_probe: str) -> dict:
    kd, ce = arms["kd"], arms["ce"]

    def beats(metric: str, higher: bool = True) -> dict:
        noise = 2 * max(kd[metric]["std"], ce[metric]["std"])
        diff = (kd[metric]["mean"] - ce[metric]["mean"]) * (1 if higher else -1)
        return {"kd": kd[metric]["mean"], "ce": ce[metric]["mean"], "two_std": noise, "reached": diff > noise}

    out = {"probe_beats_ce_by_2std": beats("eval/probe/student"),
           "grounded_acc_beats_ce_by_2std": beats("eval/grounded_acc"),
           "grounding_gap_beats_ce_by_2std": beats("eval/grounding_gap")}
    ratio = kd["eval/probe/student"]["mean"] / refs[teacher_probe]
    out["probe_at_least_0.9x_teacher"] = {"ratio": ratio, "reached": ratio >= 0.9}
    ppl = kd["eval/perplexity"]["mean"] / ce["eval/perplexity"]["mean"]
    out["perplexity_at_most_1.05x_ce"] = {"ratio": ppl, "reached": ppl <= 1.05}
    out["teacher_kl_no_worse_than_today"] = {"kd": kd["eval/kl/main"]["mean"], "today": TODAY["eval/kl/main"],
                                             "reached": kd["eval/kl/main"]["mean"] <= TODAY["eval/kl/main"]}
    agree = kd["eval/agreement/main"]["mean"]
    out["agreement_no_worse_than_today"] = {"kd": agree, "today": TODAY["eval/agreement/main"],
                                            "reached": agree >= TODAY["eval/agreement/main"]}
    acc = beats("mtp/acceptance_at_1")  # "not below": no lower than CE by more than 2 std
    acc["reached"] = acc["kd"] >= acc["ce"] - acc["two_std"]
    out["mtp_acceptance_not_below_ce"] = acc
    return out


def training_figures(tracking_uri: str | None, experiment: str, work: str) -> dict:
    """Balance and stability of every training run of this benchmark, from its MLflow stage runs:
    - per teacher, the gradient-norm ratio on the shared tower against the language term in the joint
      stage after its warm-up: median and the share of logged steps inside [0.5, 2];
    - per loss term and stage, the largest value over its running mean (the mean of the stage's earlier
      logged values) after the stage's first 5 logged steps (goal: no term above 1.5x)."""
    import mlflow
    from mlflow.tracking import MlflowClient
    mlflow.set_tracking_uri(tracking_uri or f"sqlite:///{ROOT / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    out: dict[str, dict] = {}
    if exp is None:
        return out
    work = Path(work).name
    finished = "tags.`mmtp.stage` = 'train' and attributes.status = 'FINISHED'"
    for train in client.search_runs([exp.experiment_id], finished, order_by=["attributes.start_time ASC"]):
        folder = train.data.params.get("output_dir", "")
        if Path(folder).parent.name != work:
            continue
        figures: dict = {"balance": {}, "max_jump": {}}
        for stage in client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{train.info.run_id}'"):
            name = stage.info.run_name.removeprefix("stage/")
            for key in stage.data.metrics:
                history = [m.value for m in sorted(client.get_metric_history(stage.info.run_id, key),
                                                   key=lambda m: m.step)]
                if key.startswith("gradnorm_ratio/") and name == "joint":
                    tail = history[len(history) // 6:]  # after the warm-up (the first sixth of the stage)
                    figures["balance"][key] = {"median": statistics.median(tail),
                                               "inside_0.5_2": sum(0.5 <= v <= 2 for v in tail) / len(tail)}
                term = key.removeprefix("loss/")
                if key.startswith("loss/") and (term in ("language", "contrastive") or
                                                (term.startswith("vision/") and term.count("/") == 1)):
                    jumps = [history[i] / statistics.fmean(history[:i]) for i in range(5, len(history))]
                    figures["max_jump"][f"{name}/{term}"] = max(jumps, default=1.0)
        out[Path(folder).name] = figures
    return dict(sorted(out.items()))


def run(args) -> dict:
    from data.shards import digest
    from flows.collect import run_collect
    overrides = ["tracking.experiment=mmtp-kd-vs-ce", "train.progress=false", "collect.progress=false",
                 *args.overrides]
    base = load_config(args.config, overrides)
    run_collect(base)  # once; later calls reuse the finished shards
    per_arm: dict[str, list[dict]] = {}
    seconds: dict[str, list[float]] = {}
    for seed in args.seeds:
        for arm, extra in (("kd", []), ("ce", ["configs/baseline_ce.yaml"])):
            cfg = load_config([*args.config, *extra],
                              [*overrides, f"seed={seed}", f"shards_dir={shards_path(base)}", "train.resume=true",
                               f"output_dir={Path(args.work) / f'{arm}-seed{seed}'}"])
            result = train_and_evaluate(cfg, arm, seed, ablation=arm == "kd" and seed in args.ablation_seeds)
            seconds.setdefault(arm, []).append(result["seconds"])
            for name, metrics in result["rows"].items():
                per_arm.setdefault(name, []).append(metrics)
    teachers = [t.name for t in teacher_configs(base) if t is not base.teachers.language]
    teacher_probe = f"eval/probe/{teachers[0]}"
    refs = {k: per_arm["kd"][0][k] for k in (*REFERENCES, *(f"eval/probe/{t}" for t in teachers))
            if k in per_arm["kd"][0]}
    arms = {name: {k: stats([m[k] for m in rows]) for k in rows[0] if k not in refs and all(k in m for m in rows)}
            for name, rows in per_arm.items()}
    return {"command": "python bench/kd_vs_ce.py " + " ".join(sys.argv[1:]),
            "config": args.config, "config_digest": digest(to_container(base)), "seeds": args.seeds,
            "date": datetime.now(UTC).strftime("%Y-%m-%d"), "machine": args.machine,
            "train_seconds": {arm: stats(v) for arm, v in seconds.items()}, "references": refs,
            "arms": arms, "goals": goals(arms, refs, teacher_probe),
            "training": training_figures(base.tracking.uri, base.tracking.experiment, args.work)}


TABLE_METRICS = ["eval/probe/student", "eval/grounded_acc", "eval/grounded_acc_blank", "eval/grounding_gap",
                 "eval/perplexity", "eval/kl/main", "eval/agreement/main", "eval/agreement/mtp1",
                 "mtp/acceptance_at_1", "mtp/tau"]


def table(result: dict) -> str:
    """Markdown: one column per arm (mean ± std over the seeds), the references, the goals."""
    arms = list(result["arms"])
    n = {a: len(next(iter(result["arms"][a].values()))["values"]) for a in arms}
    lines = ["| metric (mean ± std over seeds) | " + " | ".join(f"{a} (n={n[a]})" for a in arms) + " |",
             "|---" * (len(arms) + 1) + "|"]
    vision = sorted({k for a in arms for k in result["arms"][a] if k.startswith("eval/vision/")})
    for metric in TABLE_METRICS + vision:
        cells = []
        for arm in arms:
            s = result["arms"][arm].get(metric)
            cells.append("–" if s is None else f"{s['mean']:.4f} ± {s['std']:.4f}")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    secs = result["train_seconds"]
    lines.append("| training wall time (s) | " + " | ".join(
        f"{secs[a]['mean']:.0f}" if a in secs else "–" for a in arms) + " |")
    lines += ["", "| reference | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in result["references"].items()]
    if result.get("training"):
        lines += ["", "| training run | gradient-norm ratio (joint, after warm-up): median, share in [0.5, 2] | "
                  "largest term / running mean |", "|---|---|---|"]
        for name, t in result["training"].items():
            balance = "; ".join(f"{k.split('/', 1)[1]} {v['median']:.2f}, {v['inside_0.5_2']:.0%}"
                                for k, v in t["balance"].items()) or "–"
            worst = max(t["max_jump"].items(), key=lambda kv: kv[1], default=("–", float("nan")))
            lines.append(f"| {name} | {balance} | {worst[1]:.2f} ({worst[0]}) |")
    lines += ["", "| goal | reached | figures |", "|---|---|---|"]
    for name, g in result["goals"].items():
        figures = ", ".join(f"{k} {v:.4f}" for k, v in g.items() if k != "reached" and isinstance(v, float))
        lines.append(f"| {name} | {'**yes**' if g['reached'] else 'no'} | {figures} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", help="repeatable (default: default.yaml + full.yaml)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ablation-seeds", type=int, nargs="*", default=[0],
                   help="seeds whose kd stage exports are evaluated too (the per-stage ablation rows)")
    p.add_argument("--work", default="outputs/kd_vs_ce", help="where each arm and seed trains")
    p.add_argument("--out", default="docs/results/kd_vs_ce.json")
    p.add_argument("--machine", default="2-core CPU, no GPU")
    p.add_argument("--table", metavar="RESULTS_JSON", help="print the markdown table of a results file and exit")
    p.add_argument("--add-training-figures", metavar="RESULTS_JSON",
                   help="add the balance and stability figures of the --work runs (from MLflow) to a results file")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    args.config = args.config or ["configs/default.yaml", "configs/full.yaml"]
    if args.add_training_figures:
        result = json.loads(Path(args.add_training_figures).read_text())
        base = load_config(args.config, args.overrides)
        result["training"] = training_figures(base.tracking.uri, "mmtp-kd-vs-ce", args.work)
        args.out = args.add_training_figures
    else:
        result = run(args)
    text = json.dumps(result, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(out)
    print(text)


if __name__ == "__main__":
    main()
