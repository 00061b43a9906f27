"""Figures of the experiments (matplotlib, Agg backend): loss curves and accuracy heatmaps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

__all__ = ["Curve", "Heatmap", "plot_heatmaps", "plot_loss_curves"]


@dataclass(frozen=True)
class Curve:
    """One loss curve: ``losses[i]`` is the mean loss over steps ``(i * log_every, (i+1) *
    log_every]``; ``linestyle`` and ``linewidth`` tell apart runs drawn on top of each other."""

    label: str
    losses: Sequence[float]
    log_every: int
    color: str | None = None
    linestyle: str = "-"
    linewidth: float = 1.5


@dataclass(frozen=True)
class Heatmap:
    """Mean test accuracy (in %) over a learning-rate × initial-scale grid; NaN = no run."""

    title: str
    learning_rates: Sequence[float]
    init_scales: Sequence[float]
    accuracy: np.ndarray  # shape (len(learning_rates), len(init_scales))


def plot_loss_curves(
    curves: Sequence[Curve], path: Path, *, title: str, target_loss: float | None = None
) -> Path:
    """Training-loss curves on a log scale, the target loss as a dotted line; saved as PNG."""
    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for curve in curves:
        steps = curve.log_every * np.arange(1, len(curve.losses) + 1)
        axes.plot(
            steps,
            curve.losses,
            label=curve.label,
            color=curve.color,
            linestyle=curve.linestyle,
            linewidth=curve.linewidth,
        )
    if target_loss is not None:
        axes.axhline(target_loss, color="gray", linestyle=":", linewidth=1, label="target loss")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel(f"training loss (mean over {curves[0].log_every} steps)" if curves else "")
    axes.set_title(title)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_heatmaps(heatmaps: Sequence[Heatmap], path: Path, *, title: str) -> Path:
    """One accuracy heatmap per optimizer (rows: learning rate, columns: initial scale), on one
    colour scale from the lowest accuracy (rounded down to 5 %, at least 50 %) to 100 %."""
    lowest = min(
        (np.nanmin(h.accuracy) for h in heatmaps if np.isfinite(h.accuracy).any()), default=50.0
    )
    floor = max(50.0, 5 * np.floor(lowest / 5))
    columns = min(3, len(heatmaps))
    rows = -(-len(heatmaps) // columns)
    figure, grid = plt.subplots(
        rows,
        columns,
        figsize=(3.1 * columns, 2.6 * rows),
        dpi=72,
        squeeze=False,
        layout="constrained",
    )
    for axes, heatmap in zip(grid.flat, heatmaps, strict=False):
        image = axes.imshow(heatmap.accuracy, cmap="viridis", vmin=floor, vmax=100, aspect="auto")
        axes.set_xticks(range(len(heatmap.init_scales)), [f"{s:g}" for s in heatmap.init_scales])
        axes.set_yticks(
            range(len(heatmap.learning_rates)), [f"{lr:.3g}" for lr in heatmap.learning_rates]
        )
        axes.set_xlabel("initial scale", fontsize=8)
        axes.set_ylabel("learning rate", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.set_title(heatmap.title, fontsize=9)
        for (row, column), value in np.ndenumerate(heatmap.accuracy):
            if np.isfinite(value):
                axes.text(
                    column,
                    row,
                    f"{value:.1f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value < (floor + 100) / 2 else "black",
                )
    for axes in list(grid.flat)[len(heatmaps) :]:
        axes.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.colorbar(image, ax=grid.ravel().tolist(), shrink=0.8, label="test accuracy (%)")
    figure.savefig(path)
    plt.close(figure)
    return path
