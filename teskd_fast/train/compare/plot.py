"""compare.png: per arm, the teacher's test top-1 per epoch (the mean over seeds with a +-1 std band), and each
seed's final top-1 with the arm's mean and 95% t-interval against its training time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from teskd_fast.train.compare.options import arm_label
from teskd_fast.train.stats import mean, mean_interval, std


def plot_report(report: dict[str, Any], results: list[dict[str, Any]], path: Path) -> Path:
    """compare.png: the curves per arm (left, and from the middle epoch on) and accuracy against time (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    colors = plt.get_cmap("tab10").colors
    arms = [a["arm"] for a in report["arms"]]
    for i, arm in enumerate(arms):
        color = colors[i % len(colors)]  # more arms than colours: the colours repeat, no arm is left out
        rows = [r for r in results if r["arm"] == arm]
        if not rows:
            continue  # every run of the arm left out of the report
        curves = [r["curve"] for r in rows]
        epochs = min(len(c) for c in curves)
        x = list(range(1, epochs + 1))
        # The seeds' curves may differ in length (a run stopped early): up to the shortest.
        mu = [mean(c) for c in zip(*curves, strict=False)][:epochs]
        sd = [std(c) if len(curves) > 1 else 0.0 for c in zip(*curves, strict=False)][:epochs]
        name = arm_label(arm)
        for ax, lo in ((axes[0], 0), (axes[1], epochs // 2)):
            ax.plot(x[lo:], mu[lo:], color=color, lw=2, label=f"{name}: mean of {len(curves)} seeds")
            if len(curves) > 1:
                band = list(zip(mu, sd, strict=True))[lo:]
                ax.fill_between(x[lo:], [a - b for a, b in band], [a + b for a, b in band],
                                color=color, alpha=0.2, lw=0)
        # Right: each seed's last-epoch top-1 at its time, and the arm's mean with its 95% interval.
        times = [r["time_s"] for r in rows]
        tops = [r["teacher_top1_last"] for r in rows]
        axes[2].scatter(times, tops, color=color, alpha=0.6, s=25)
        # The 95% interval of the mean, inside [0, 100] (an accuracy's mean cannot lie outside).
        low, high = mean_interval(tops, 0.95, (0.0, 100.0)) or (mean(tops),) * 2
        mid = mean(tops)
        axes[2].errorbar([mean(times)], [mid], yerr=[[mid - low], [high - mid]], color=color, marker="D", capsize=5,
                         lw=2, label=f"{name}: mean, 95% interval" if len(tops) > 1 else f"{name}: one seed")
    paper = report["paper"]
    if paper:
        for m, color in (("teskd", colors[arms.index("teskd")]), ("baseline", colors[arms.index("baseline")])):
            for ax in axes[:2]:
                ax.axhline(paper[m], color=color, ls="--", lw=1, label=f"{arm_label(m)}: paper's {paper[m]:.2f}")
    axes[0].set(title="teacher test top-1 (%)", xlabel="epoch")
    axes[1].set(title=f"from epoch {report['epochs'] // 2 + 1}", xlabel="epoch")
    axes[2].set(title="teacher top-1 (last epoch) against training time", xlabel="run time (s)",
                ylabel="top-1 (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[:2]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{', '.join(map(arm_label, arms))}: {report['preset']}, seeds "
                 f"{', '.join(map(str, report['seeds']))}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
