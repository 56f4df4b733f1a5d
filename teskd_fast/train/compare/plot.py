"""compare.png: the teacher's test top-1 per epoch for both methods, the mean over seeds with a +-1 std band."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from teskd_fast.train.compare.options import METHOD_LABEL
from teskd_fast.train.config import METHODS
from teskd_fast.train.stats import mean, std


def plot_curves(report: dict[str, Any], results: list[dict[str, Any]], path: Path) -> Path:
    """compare.png: the teacher's test top-1 per epoch, per method the mean over seeds with a +-1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    epochs = report["epochs"]
    x = list(range(1, epochs + 1))
    first_zoomed = epochs // 2
    for m, color in zip(METHODS, ("tab:red", "tab:blue")):
        curves = [r["curve"] for r in results if r["method"] == m]
        mu = [mean(c) for c in zip(*curves)]
        sd = [std(c) if len(curves) > 1 else 0.0 for c in zip(*curves)]
        for ax, lo in ((axes[0], 0), (axes[1], first_zoomed)):
            ax.plot(x[lo:], mu[lo:], color=color, lw=2, label=f"{METHOD_LABEL[m]}: mean of {len(curves)} seeds")
            if len(curves) > 1:
                ax.fill_between(x[lo:], [a - b for a, b in zip(mu, sd)][lo:], [a + b for a, b in zip(mu, sd)][lo:],
                                color=color, alpha=0.2, lw=0, label=f"{METHOD_LABEL[m]}: ± 1 std")
    paper = report["paper"]
    if paper:
        for m, color in zip(METHODS, ("tab:red", "tab:blue")):
            for ax in axes:
                ax.axhline(paper[m], color=color, ls="--", lw=1, label=f"{METHOD_LABEL[m]}: paper's {paper[m]:.2f}")
    axes[0].set(title="teacher test top-1 (%)", xlabel="epoch")
    axes[1].set(title=f"from epoch {first_zoomed + 1}", xlabel="epoch")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"TESKD against its baseline: {report['preset']}, seeds {', '.join(map(str, report['seeds']))}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
