"""The evaluation report (Markdown, readable without MLflow) and its plots."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# For these metrics lower is better; for every other one higher is better.
LOWER_IS_BETTER = ("eval/kl/", "eval/perplexity")


# Not a property of the student: teacher and pixel probes, token counts, the blank-image control, the share
# of positions a student tokenizer aligns 1:1 with the teacher's, where the teacher's top-1 is a student token,
# and the language teacher's own figures and their n-gram references.
REFERENCE = re.compile(r"eval/probe/(?!student$)|eval/grounded_tokens$|eval/grounded_acc_blank$|eval/aligned_fraction$"
                       r"|eval/teacher_top1_in_vocab$|eval/teacher_perplexity|eval/teacher_top1_acc$"
                       r"|eval/(uni|tri)gram_perplexity$")


def better(key: str, kd: float, base: float) -> bool:
    return kd < base if key.startswith(LOWER_IS_BETTER) else kd > base


def verdict(key: str, kd: float, base: float) -> str:
    if REFERENCE.match(key):
        return "reference"
    return "yes" if better(key, kd, base) else "tie" if kd == base else "**no**"


def teacher_note(metrics: dict[str, float]) -> str:
    """The report's line on the language teacher: its exact test figures (the headline teacher figure) against
    the n-gram references, its perplexity at the grounded tokens and at the others where there are grounded
    words, and the bound from its stored top-k + tail as a secondary figure."""
    def fig(key: str, fmt: str = ".2f") -> str:
        return format(metrics[key], fmt) if key in metrics else "n/a"
    bound = (f"perplexity bound {fig('eval/teacher_perplexity_bound')} (a lower bound from the stored top-k + "
             "tail, secondary)")
    if "eval/teacher_perplexity" not in metrics:
        return (f"language teacher on the test captions: {bound}; no exact figures, its shards predate "
                "token_logprob: re-run `mmtp collect`")
    split = ""  # at the tokens of the words only the image tells, and elsewhere (captions with grounded words)
    if "eval/teacher_perplexity_grounded" in metrics:
        split = (f"; at the grounded tokens {fig('eval/teacher_perplexity_grounded')}, at the others "
                 f"{fig('eval/teacher_perplexity_other')} (a teacher that cannot see: the first far above)")
    return (f"language teacher on the test captions: perplexity {fig('eval/teacher_perplexity')} (exact: the headline "
            f"teacher figure), top-1 accuracy {fig('eval/teacher_top1_acc', '.3f')}{split}; n-gram references fitted "
            f"on the train captions: unigram {fig('eval/unigram_perplexity')}, trigram "
            f"{fig('eval/trigram_perplexity')}; {bound}")


def report(metrics: dict[str, float], baseline: dict[str, float] | None, title: str, notes: list[str]) -> str:
    lines = [f"# {title}", ""] + [f"- {n}" for n in notes] + [""]
    if baseline:
        lines += ["| metric | distilled | CE-only baseline | KD helps? |", "|---|---|---|---|"]
        for k in sorted(metrics):
            if k in baseline:
                lines.append(f"| {k} | {metrics[k]:.4f} | {baseline[k]:.4f} | {verdict(k, metrics[k], baseline[k])} |")
        hurt = [k for k in sorted(metrics) if k in baseline and verdict(k, metrics[k], baseline[k]) == "**no**"]
        lines += ["", f"KD does not help on: {', '.join(hurt)}." if hurt else "KD helps on every shared metric."]
    else:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())]
    return "\n".join(lines) + "\n"


def eval_plots(metrics: dict[str, float], baseline: dict[str, float] | None, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    probe = sorted(k for k in metrics if k.startswith("eval/probe/"))
    if probe:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = [k.rsplit("/", 1)[1] for k in probe]
        ax.bar(names, [metrics[k] for k in probe], color=["tab:blue" if n == "student" else "tab:grey" for n in names])
        if baseline and "eval/probe/student" in baseline:
            ax.axhline(baseline["eval/probe/student"], color="tab:red", ls="--", label="CE-only student")
            ax.legend()
        ax.set_ylabel("linear-probe accuracy (test)")
        ax.set_ylim(0, 1)
        paths.append(_save(fig, out_dir / "probe.png"))
    accept = sorted(k for k in metrics if k.startswith("mtp/acceptance_at_"))
    if accept:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.bar([k.rsplit("_", 1)[1] for k in accept], [metrics[k] for k in accept])
        ax.set_xlabel("MTP depth")
        ax.set_ylabel("draft acceptance rate")
        ax.set_ylim(0, 1)
        paths.append(_save(fig, out_dir / "acceptance.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
