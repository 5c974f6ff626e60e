"""The figures of a bench/kd_vs_ce.py results file: learning-curve statistics, the balancer's language weight and
the training figures from MLflow, the goals with their Welch p-values, the markdown table and the curves plot."""

import os
import statistics
from pathlib import Path

from seed_stats import stats, welch_p

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("kd_corrected", "kd_uncorrected", "ce", "ce_ls")
KD_ARMS, CE_ARMS = ("kd_corrected", "kd_uncorrected"), ("ce", "ce_ls")
VS_CORRECTED = "kd_uncorrected vs corrected"  # the uncorrected students against the corrected teacher's shards
CURVE_METRICS = ("eval/perplexity", "eval/agreement/main", "eval/kl/main", "eval/grounded_acc")


def curve_stats(curves: dict[str, list[dict]], plan: dict) -> dict:
    """Per arm: the curve stage's step counts and, per metric, mean and std over the seeds at each."""
    out = {}
    for arm, runs in curves.items():
        steps = [s for s in plan["steps"] if all(str(s) in r for r in runs)]
        figures = {"stage": plan["stage"], "steps": steps, "global_steps": [plan["start"] + s for s in steps]}
        for metric in CURVE_METRICS:
            if steps and all(metric in r[str(s)] for r in runs for s in steps):
                per_step = [stats([r[str(s)][metric] for r in runs]) for s in steps]
                figures[metric] = {"mean": [p["mean"] for p in per_step], "std": [p["std"] for p in per_step],
                                   "values": [p["values"] for p in per_step]}
        out[arm] = figures
    return out


def language_weights(training: dict, stage: str, arms: list[str]) -> dict:
    """Per arm: the mean over seeds of the balancer's `weight/language` in the curve stage (each run's mean after
    its warm-up sixth), from training_figures (runs named <arm>-seed<k>)."""
    per: dict[str, list[float]] = {}
    for run_name, figures in training.items():
        arm = run_name.rsplit("-seed", 1)[0]
        value = figures.get("language_weight", {}).get(stage)
        if arm in arms and value is not None:
            per.setdefault(arm, []).append(value)
    return {arm: stats(v) for arm, v in per.items()}


def compare(arms: dict, a: str, b: str, metric: str, higher: bool, rule: str, a_metric: str | None = None) -> dict:
    """Arm `a` against arm `b` on `metric` (`a_metric` for a's side when it differs) over the seeds: both means,
    twice the larger std, the two-sided Welch p-value and whether `rule` holds, the better side being higher or
    lower: "beats" (better mean and p < 0.05), "by_2std" (better by more than twice the larger std), "no_worse"
    (worse by at most twice the larger std) or "at_least_as_good" (the means alone)."""
    va = arms.get(a, {}).get(a_metric or metric, {}).get("values")
    vb = arms.get(b, {}).get(metric, {}).get("values")
    if not va or not vb:
        return {"reached": None, "p_value": None,
                "note": f"not measured ({a} {a_metric or metric} or {b} {metric} missing)"}
    ma, mb = statistics.fmean(va), statistics.fmean(vb)
    noise = 2 * max(statistics.stdev(v) if len(v) > 1 else 0.0 for v in (va, vb))
    diff = (ma - mb) * (1 if higher else -1)
    p = welch_p(va, vb)
    reached = {"beats": diff > 0 and p is not None and p < 0.05, "by_2std": diff > noise,
               "no_worse": diff >= -noise, "at_least_as_good": diff >= 0}[rule]
    return {a: ma, b: mb, "two_std": noise, "p_value": p, "reached": reached}


def against_reference(values: list[float] | None, reference: float | None, factor: float, at_most: bool,
                      what: str) -> dict:
    """mean(values) / reference against `factor` (at most or at least), with the one-sample Welch p-value of the
    values against factor x reference."""
    if not values or not reference:
        return {"reached": None, "p_value": None, "note": f"not measured ({what} missing)"}
    ratio = statistics.fmean(values) / reference
    return {"ratio": ratio, "reference": reference, "p_value": welch_p(values, [factor * reference]),
            "reached": ratio <= factor if at_most else ratio >= factor}


def goals(result: dict) -> dict:
    """The benchmark's goals from a results dict; each has its figures, `p_value` (two-sided Welch over the seeds,
    None when not computable) and `reached` (None: not measured)."""
    arms, refs = result["arms"], result["references"]
    out = {}
    # teacher: the corrected teacher's exact test perplexity against the CE student and a trigram of the captions
    out["teacher_ppl_at_most_ce_ppl"] = compare(arms, "kd_corrected", "ce", "eval/perplexity", False,
                                                "at_least_as_good", a_metric="eval/teacher_perplexity")
    out["teacher_ppl_at_most_1.2x_trigram"] = against_reference(
        arms.get("kd_corrected", {}).get("eval/teacher_perplexity", {}).get("values"),
        refs.get("eval/trigram_perplexity"), 1.2, True, "eval/teacher_perplexity or eval/trigram_perplexity")
    # language
    out["perplexity_beats_ce"] = compare(arms, "kd_corrected", "ce", "eval/perplexity", False, "beats")
    out["perplexity_beats_ce_ls"] = compare(arms, "kd_corrected", "ce_ls", "eval/perplexity", False, "beats")
    out["grounded_acc_no_worse_than_ce"] = compare(arms, "kd_corrected", "ce", "eval/grounded_acc", True, "no_worse")
    # both against the corrected teacher: kd_corrected's own evaluation, kd_uncorrected's against those shards
    for metric, higher, name in (("eval/agreement/main", True, "agreement_corrected_beats_uncorrected"),
                                 ("eval/kl/main", False, "kl_corrected_beats_uncorrected")):
        g = compare(arms, "kd_corrected", VS_CORRECTED, metric, higher, "beats")
        own = arms.get("kd_uncorrected", {}).get(metric)
        if own:  # for the record: against its own (uncorrected) teacher
            g["kd_uncorrected_own_teacher"] = own["mean"]
        out[name] = g
    # vision
    out["probe_beats_ce_by_2std"] = compare(arms, "kd_corrected", "ce", "eval/probe/student", True, "by_2std")
    teacher_probe = next((v for k, v in refs.items() if k.startswith("eval/probe/") and k != "eval/probe/pixels"),
                         None)
    out["probe_at_least_0.9x_teacher"] = against_reference(
        arms.get("kd_corrected", {}).get("eval/probe/student", {}).get("values"), teacher_probe, 0.9, False,
        "eval/probe/student or the vision teacher's probe")
    return out


def training_figures(tracking_uri: str | None, experiment: str, work: str) -> dict:
    """Balance and stability of every training run of this benchmark, from its MLflow stage runs:
    - per teacher, the gradient-norm ratio on the shared tower against the language term in the joint
      stage after its warm-up: median and the share of logged steps inside [0.5, 2];
    - per loss term and stage, the largest value over its running mean (the mean of the stage's earlier
      logged values) after the stage's first 5 logged steps (goal: no term above 1.5x);
    - per stage, the mean of the balancer's `weight/language` after the stage's first sixth."""
    import mlflow
    from mlflow.tracking import MlflowClient
    mlflow.set_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'mlflow.db'}")
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
        figures: dict = {"balance": {}, "max_jump": {}, "language_weight": {}}
        for stage in client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{train.info.run_id}'"):
            name = stage.info.run_name.removeprefix("stage/")
            for key in stage.data.metrics:
                history = [m.value for m in sorted(client.get_metric_history(stage.info.run_id, key),
                                                   key=lambda m: m.step)]
                tail = history[len(history) // 6:]  # after the warm-up (the first sixth of the stage)
                if key.startswith("gradnorm_ratio/") and name == "joint":
                    figures["balance"][key] = {"median": statistics.median(tail),
                                               "inside_0.5_2": sum(0.5 <= v <= 2 for v in tail) / len(tail)}
                if key == "weight/language" and tail:
                    figures["language_weight"][name] = statistics.fmean(tail)
                term = key.removeprefix("loss/")
                if key.startswith("loss/") and (term in ("language", "contrastive") or
                                                (term.startswith("vision/") and term.count("/") == 1)):
                    jumps = [history[i] / statistics.fmean(history[:i]) for i in range(5, len(history))]
                    figures["max_jump"][f"{name}/{term}"] = max(jumps, default=1.0)
        out[Path(folder).name] = figures
    return dict(sorted(out.items()))


TABLE_METRICS = ["eval/perplexity", "eval/teacher_perplexity", "eval/teacher_top1_acc", "eval/teacher_perplexity_bound",
                 "eval/agreement/main", "eval/kl/main", "eval/agreement/mtp1", "eval/grounded_acc",
                 "eval/grounded_acc_blank", "eval/grounding_gap", "eval/probe/student", "mtp/acceptance_at_1",
                 "mtp/tau"]


def _cell(s: dict | None) -> str:
    return "–" if s is None else f"{s['mean']:.4f} ± {s['std']:.4f}"


def table(result: dict) -> str:
    """Markdown: one column per arm (mean ± std over the seeds), the references, the curves, the goals with their
    p-values."""
    arms = list(result["arms"])
    n = {a: len(next(iter(result["arms"][a].values()))["values"]) for a in arms}
    lines = ["| metric (mean ± std over seeds) | " + " | ".join(f"{a} (n={n[a]})" for a in arms) + " |",
             "|---" * (len(arms) + 1) + "|"]
    vision = sorted({k for a in arms for k in result["arms"][a] if k.startswith("eval/vision/")})
    for metric in TABLE_METRICS + vision:
        if any(metric in result["arms"][a] for a in arms):
            lines.append(f"| {metric} | " + " | ".join(_cell(result["arms"][a].get(metric)) for a in arms) + " |")
    weights = result.get("language_weight", {})
    if weights:
        lines.append("| weight/language (curve stage, after warm-up) | " + " | ".join(
            _cell(weights.get(a)) for a in arms) + " |")
    secs = result["train_seconds"]
    lines.append("| training wall time (s) | " + " | ".join(
        f"{secs[a]['mean']:.0f}" if a in secs else "–" for a in arms) + " |")
    lines += ["", "| reference | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in result["references"].items()]
    curves = result.get("curves", {})
    if curves:
        first = next(iter(curves.values()))
        lines += ["", f"| {first['stage']} step | " + " | ".join(
            f"{a} perplexity | {a} agreement" for a in curves) + " |", "|---" * (1 + 2 * len(curves)) + "|"]
        for i, step in enumerate(first["steps"]):
            cells = []
            for c in curves.values():
                for metric in ("eval/perplexity", "eval/agreement/main"):
                    m = c.get(metric)
                    cells.append("–" if not m or i >= len(m["mean"]) else f"{m['mean'][i]:.3f} ± {m['std'][i]:.3f}")
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", "| goal | reached | p (Welch) | figures |", "|---|---|---|---|"]
    for name, g in result["goals"].items():
        reached = "not measured" if g.get("reached") is None else "**yes**" if g["reached"] else "no"
        p = g.get("p_value")
        figures = ", ".join(f"{k} {v:.4f}" for k, v in g.items()
                            if k not in ("reached", "p_value") and isinstance(v, float))
        lines.append(f"| {name} | {reached} | {'–' if p is None else f'{p:.3g}'} | {figures or g.get('note', '')} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    """Caption perplexity and agreement with the teacher against the curve stage's steps, per arm: the mean over
    the seeds with a ± std band (distill/train/plots.py's style); the KD arms' teachers' perplexity as grey lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in ((axes[0], "eval/perplexity", "caption perplexity (test)"),
                              (axes[1], "eval/agreement/main", "top-1 agreement with its teacher (test)")):
        for arm, c in result["curves"].items():
            if metric not in c:
                continue
            mean, std = c[metric]["mean"], c[metric]["std"]
            line, = ax.plot(c["steps"], mean, marker="o", label=f"{arm} (n={len(c[metric]['values'][0])})")
            ax.fill_between(c["steps"], [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)], color=line.get_color(), alpha=0.2)
        if metric == "eval/perplexity":  # each KD arm's teacher on the same test captions, for reference
            for arm, t in result.get("teacher_perplexity", {}).items():
                if arm in KD_ARMS:
                    ax.axhline(t["mean"], color="grey", lw=0.8, ls="--" if arm == "kd_corrected" else ":")
                    ax.annotate(f"teacher ({arm.removeprefix('kd_')})", (0.01, t["mean"]), fontsize=7,
                                xycoords=("axes fraction", "data"), color="grey")
        stage = next(iter(result["curves"].values()))["stage"]
        ax.set_title(title)
        ax.set_xlabel(f"{stage} stage step")
        if metric == "eval/perplexity":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
