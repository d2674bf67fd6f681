"""Shared by the benchmarks: averaging accuracy curves over seeds, and plotting them."""

from __future__ import annotations

import statistics
from pathlib import Path


def mean_curve(runs: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Average runs point by point (they share the generation grid; the x values are averaged too)."""
    n = min(len(r) for r in runs)
    return [(int(statistics.mean(r[i][0] for r in runs)), statistics.mean(r[i][1] for r in runs)) for i in range(n)]


def save_accuracy_plot(curves: dict[str, list[tuple[int, float]]], baseline: tuple[str, float], xlabel: str,
                       title: str, path: Path) -> None:
    """Test accuracy (fractions, drawn in %) against spend, one line per method, a dashed baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([x for x, _ in curve], [100 * a for _, a in curve], label=name)
    ax.axhline(100 * baseline[1], color="grey", linestyle="--", label=baseline[0])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
