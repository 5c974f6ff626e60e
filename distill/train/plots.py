"""Training plots logged to MLflow: loss curves, and the balance between teachers."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _panel(ax, history: list[dict], keys: list[str], title: str, log_y: bool = False) -> None:
    steps = [h["step"] for h in history]
    values = {k: [h.get(k, float("nan")) for h in history] for k in keys}
    for k in keys:
        ax.plot(steps, values[k], label=k.split("/", 1)[1])
    ax.set_title(title)
    ax.set_xlabel("step")
    if log_y and any(v > 0 for vs in values.values() for v in vs):  # an empty or all-zero panel stays linear
        ax.set_yscale("log")
    if keys:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def training_plots(history: list[dict], out_dir: str | Path) -> list[Path]:
    """Write losses.png and balance.png from per-step metric dicts; returns their paths."""
    if not history:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for h in history for k in h})
    terms = [k for k in keys if k in ("loss/total", "loss/language", "loss/ce", "loss/lang_kd")
             or (k.startswith("loss/vision/") and k.count("/") == 2)]
    mtp = [k for k in keys if k.startswith(("loss/lang_kd/mtp", "loss/ce/mtp"))]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _panel(axes[0], history, terms, "losses", log_y=True)
    _panel(axes[1], history, mtp, "MTP depths", log_y=True)
    fig.tight_layout()
    paths = [out_dir / "losses.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    weights = [k for k in keys if k.startswith("weight/")]
    ratios = [k for k in keys if k.startswith("gradnorm_ratio/")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _panel(axes[0], history, weights, "balancer weights")
    ratio_hist = [h for h in history if any(r in h for r in ratios)]
    _panel(axes[1], ratio_hist, ratios, "gradient-norm ratio on the shared trunk (vs language)", log_y=True)
    if ratios:
        axes[1].axhline(1.0, color="grey", lw=0.8, ls="--")
    fig.tight_layout()
    paths.append(out_dir / "balance.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths
