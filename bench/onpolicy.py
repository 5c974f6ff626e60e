"""On-policy rounds against offline-only rounds from the same trained student, several seeds.

    python bench/onpolicy.py [--config configs/default.yaml --config configs/full.yaml]
                             [--student outputs/kd_vs_ce/kd_corrected-seed0/student] [--seeds 0 1 2]
                             [--out docs/results/onpolicy.json] [key=value ...]
    python bench/onpolicy.py --table docs/results/onpolicy.json      # the markdown table of a results file

Both arms start from the same trained student (--student; by default the config's output_dir/student) and
run the flow `onpolicy-distill` with the same rounds, steps, divergence, learning rate and offline shards:
- `onpolicy`: the config's onpolicy.mix of the student's own continuations, scored by the language teacher;
- `offline`: onpolicy.mix=0, the offline shards alone (no generation, no new teacher forwards).
Every round's student is evaluated with the evaluation metrics and eval/onpolicy_kl (the teacher's KL to the
student on the student's own continuations of onpolicy.eval_prompts test prompts; for a given seed both arms
continue the same prompts). The starting student is evaluated once. Finished arms and seeds are read back from
their bench_row.json; a killed flow resumes at its round and stage. Prints one JSON object and writes it to --out.
Runs are logged to MLflow under the experiment `mmtp-onpolicy`.
"""

import argparse
import json
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from distill.env import apply_env_defaults  # noqa: E402

apply_env_defaults()

from data.shards import atomic_write_json  # noqa: E402
from distill.config import load_config, output_path, shards_path, teacher_configs, to_container  # noqa: E402

ARMS = {"onpolicy": [], "offline": ["onpolicy.mix=0"]}
TABLE_METRICS = ["eval/onpolicy_kl", "eval/onpolicy_agreement", "eval/kl/main", "eval/agreement/main",
                 "eval/perplexity", "eval/probe/student", "eval/grounded_acc", "mtp/acceptance_at_1"]
# "no worse": the on-policy mean is not worse than the offline mean by more than two seed std
NO_WORSE = {"eval/kl/main": False, "eval/agreement/main": True, "eval/perplexity": False,
            "eval/probe/student": True, "eval/grounded_acc": True, "mtp/acceptance_at_1": True}


def stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def run_arm(cfg, student: Path) -> dict:
    """The flow's summary for one arm and seed, kept in <output_dir>/bench_row.json."""
    from flows.onpolicy import run_onpolicy
    done = output_path(cfg, "bench_row.json")
    if done.exists():
        return json.loads(done.read_text())
    start = output_path(cfg, "student")
    start.parent.mkdir(parents=True, exist_ok=True)
    if not start.exists():
        start.symlink_to(student.resolve(), target_is_directory=True)
    summary = run_onpolicy(cfg)
    atomic_write_json(done, summary)  # a killed run never leaves a half-written marker
    return summary


def goals(arms: dict) -> dict:
    op, off = arms["onpolicy"], arms["offline"]
    out = {}
    kl = "eval/onpolicy_kl"
    noise = 2 * max(op[kl]["std"], off[kl]["std"])
    out["onpolicy_kl_below_offline_by_2std"] = {"onpolicy": op[kl]["mean"], "offline": off[kl]["mean"],
                                                "two_std": noise,
                                                "reached": off[kl]["mean"] - op[kl]["mean"] > noise}
    for metric, higher in NO_WORSE.items():
        if metric in op and metric in off:
            noise = 2 * max(op[metric]["std"], off[metric]["std"])
            worse = (off[metric]["mean"] - op[metric]["mean"]) * (1 if higher else -1)
            out[f"{metric.split('/', 1)[1]}_no_worse"] = {"onpolicy": op[metric]["mean"],
                                                          "offline": off[metric]["mean"], "two_std": noise,
                                                          "reached": worse <= noise}
    return out


def run(args) -> dict:
    from omegaconf import OmegaConf

    from data.shards import digest
    from distill.eval import evaluate_run
    overrides = ["tracking.experiment=mmtp-onpolicy", "train.progress=false", "collect.progress=false",
                 *args.overrides]
    base = load_config(args.config, overrides)
    student = Path(args.student or output_path(base, "student"))
    work = Path(args.work)
    start_file = work / "start_metrics.json"
    if not start_file.exists():  # the starting student's evaluation metrics, once
        ecfg = OmegaConf.merge(base, {"output_dir": str(work / "start"),
                                      "evaluate": {"student": str(student), "baseline": None}})
        targets = {t.name: shards_path(base, "targets", t.name) for t in teacher_configs(base)}
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_json(start_file, evaluate_run(ecfg, targets)["metrics"])
    start_metrics = json.loads(start_file.read_text())
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for arm, extra in ARMS.items():
            cfg = load_config(args.config, [*overrides, *extra, f"seed={seed}", f"shards_dir={shards_path(base)}",
                                            f"output_dir={work / f'{arm}-seed{seed}'}"])
            summary = run_arm(cfg, student)
            rows.setdefault(arm, []).append(summary)
            print(json.dumps({"arm": arm, "seed": seed,
                              "onpolicy_kl": summary["rounds"][-1]["metrics"].get("eval/onpolicy_kl")}), flush=True)
    arms, curves, budget = {}, {}, {}
    for arm, summaries in rows.items():
        finals = [s["rounds"][-1]["metrics"] for s in summaries]
        arms[arm] = {k: stats([m[k] for m in finals]) for k in finals[0] if all(k in m for m in finals)}
        # eval/onpolicy_kl after each round (round 0: the starting student on the same seed's prompts)
        curves[arm] = [stats([s["start"]["eval/onpolicy_kl"] for s in summaries])] + [
            stats([s["rounds"][r]["metrics"]["eval/onpolicy_kl"] for s in summaries])
            for r in range(len(summaries[0]["rounds"]))]
        budget[arm] = {"teacher_forwards_per_seed": sum(x["rows_scored"] for x in summaries[0]["rounds"])}
    return {"command": "python bench/onpolicy.py " + " ".join(sys.argv[1:]), "config": args.config,
            "config_digest": digest(to_container(base)), "student": str(student), "seeds": args.seeds,
            "date": datetime.now(UTC).strftime("%Y-%m-%d"), "machine": args.machine,
            "onpolicy": dict(to_container(base)["onpolicy"]), "start": start_metrics,
            "arms": arms, "onpolicy_kl_by_round": curves, "teacher_forwards": budget,
            "offline_rows_scored": _offline_rows(base), "goals": goals(arms)}


def _offline_rows(cfg) -> int:
    """Rows the language teacher scored in the offline collection (every split)."""
    from data.shards import load_manifest
    return load_manifest(shards_path(cfg, "targets", cfg.teachers.language.name), verify=False)["rows"]


def table(result: dict) -> str:
    arms = list(result["arms"])
    n = len(result["seeds"])
    lines = ["| metric (after the last round; mean ± std over seeds) | start | " +
             " | ".join(f"{a} (n={n})" for a in arms) + " |", "|---" * (len(arms) + 2) + "|"]
    for metric in TABLE_METRICS:
        start = result["start"].get(metric)
        cells = [("–" if (s := result["arms"][a].get(metric)) is None else f"{s['mean']:.4f} ± {s['std']:.4f}")
                 for a in arms]
        lines.append(f"| {metric} | {'–' if start is None else f'{start:.4f}'} | " + " | ".join(cells) + " |")
    forwards = " | ".join(str(result["teacher_forwards"][a]["teacher_forwards_per_seed"]) for a in arms)
    lines.append(f"| new teacher forwards (rows) per seed | – | {forwards} |")
    rounds = len(result["onpolicy_kl_by_round"][arms[0]])
    lines += ["", "| eval/onpolicy_kl by round | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for r in range(rounds):
        by_round = [result["onpolicy_kl_by_round"][a][r] for a in arms]
        cells = [f"{s['mean']:.4f} ± {s['std']:.4f}" for s in by_round]
        lines.append(f"| {'start' if r == 0 else f'round {r}'} | " + " | ".join(cells) + " |")
    lines += ["", "| goal | reached | figures |", "|---|---|---|"]
    for name, g in result["goals"].items():
        figures = ", ".join(f"{k} {v:.4f}" for k, v in g.items() if k != "reached")
        lines.append(f"| {name} | {'**yes**' if g['reached'] else 'no'} | {figures} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", help="repeatable (default: default.yaml + full.yaml)")
    p.add_argument("--student", help="the trained student both arms start from (default: <output_dir>/student)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work", default="outputs/onpolicy_bench", help="where each arm and seed runs its rounds")
    p.add_argument("--out", default="docs/results/onpolicy.json")
    p.add_argument("--machine", default="2-core CPU, no GPU")
    p.add_argument("--table", metavar="RESULTS_JSON", help="print the markdown table of a results file and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    args.config = args.config or ["configs/default.yaml", "configs/full.yaml"]
    result = run(args)
    from data.shards import atomic_write_json
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
