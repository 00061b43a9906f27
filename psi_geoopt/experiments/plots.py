"""Figures of the experiments (matplotlib, Agg backend): loss curves and accuracy heatmaps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

__all__ = ["HEATMAP_CELL_INCHES", "Curve", "Heatmap", "plot_heatmaps", "plot_loss_curves"]


@dataclass(frozen=True)
class Curve:
    """One loss curve: ``losses[i]`` is the mean loss over steps ``(i * log_every, (i+1) *
    log_every]``, the last window cut at ``steps`` (the run's length; ``None``: whole
    windows); ``linestyle`` and ``linewidth`` tell apart runs drawn on top of each other."""

    label: str
    losses: Sequence[float]
    log_every: int
    color: str | None = None
    linestyle: str = "-"
    linewidth: float = 1.5
    steps: int | None = None

    def window_ends(self) -> np.ndarray:
        """The step at which each window of :attr:`losses` ends."""
        ends = self.log_every * np.arange(1, len(self.losses) + 1)
        return ends if self.steps is None else np.minimum(ends, self.steps)


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
        axes.plot(
            curve.window_ends(),
            curve.losses,
            label=curve.label,
            color=curve.color,
            linestyle=curve.linestyle,
            linewidth=curve.linewidth,
            marker="o" if len(curve.losses) <= 10 else None,  # a short run is still visible
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


HEATMAP_CELL_INCHES = (0.8, 0.45)
"""Width and height of one heatmap cell; a panel grows with its grid so that the cell labels
keep their size."""


def plot_heatmaps(heatmaps: Sequence[Heatmap], path: Path, *, title: str) -> Path:
    """One accuracy heatmap per optimizer (rows: learning rate, columns: initial scale), on one
    colour scale from the lowest accuracy (rounded down to 5 %, at least 50 %) to 100 %.

    Each panel is sized from its grid (:data:`HEATMAP_CELL_INCHES` per cell, plus room for the
    axes' labels), and the figure is saved at 120 dpi, so that a cell's label is about 15
    pixels high whatever the grid.
    """
    lowest = min(
        (np.nanmin(h.accuracy) for h in heatmaps if np.isfinite(h.accuracy).any()), default=50.0
    )
    floor = max(50.0, 5 * np.floor(lowest / 5))
    columns = min(3, len(heatmaps))
    rows = -(-len(heatmaps) // columns)
    cell_width, cell_height = HEATMAP_CELL_INCHES
    panel_width = 1.4 + cell_width * max(len(h.init_scales) for h in heatmaps)
    panel_height = 1.2 + cell_height * max(len(h.learning_rates) for h in heatmaps)
    figure, grid = plt.subplots(
        rows,
        columns,
        # wide enough for the title (about 0.1 inch per character at 12 points)
        figsize=(max(panel_width * columns + 1.3, 0.1 * len(title)), panel_height * rows + 0.5),
        dpi=120,
        squeeze=False,
        layout="constrained",
    )
    for axes, heatmap in zip(grid.flat, heatmaps, strict=False):
        image = axes.imshow(heatmap.accuracy, cmap="viridis", vmin=floor, vmax=100, aspect="auto")
        axes.set_xticks(range(len(heatmap.init_scales)), [f"{s:g}" for s in heatmap.init_scales])
        axes.set_yticks(
            range(len(heatmap.learning_rates)), [f"{lr:.3g}" for lr in heatmap.learning_rates]
        )
        axes.set_xlabel("initial scale", fontsize=10)
        axes.set_ylabel("learning rate", fontsize=10)
        axes.tick_params(labelsize=9)
        axes.set_title(heatmap.title, fontsize=11)
        for (row, column), value in np.ndenumerate(heatmap.accuracy):
            if np.isfinite(value):
                axes.text(
                    column,
                    row,
                    f"{value:.1f}",
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if value < (floor + 100) / 2 else "black",
                )
    for axes in list(grid.flat)[len(heatmaps) :]:
        axes.axis("off")
    figure.suptitle(title, fontsize=12)
    colorbar = figure.colorbar(image, ax=grid.ravel().tolist(), shrink=0.8)
    colorbar.set_label("test accuracy (%)", fontsize=10)
    colorbar.ax.tick_params(labelsize=9)
    figure.savefig(path)
    plt.close(figure)
    return path
