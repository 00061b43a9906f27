"""Log-log plots of the measured rates with their bounds (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter

__all__ = ["FIGURES", "plot_rates"]

FIGURES = {
    "gd-rate": (
        "gd_rate.png",
        r"PSI GD, $\eta = 1/L$",
        r"$\min_{t<T}\ \|\mathrm{grad}\, f(w_t)\|_g^2$",
        r"bound $2(f(w_0) - f^*)/(\eta T)$",
    ),
    "sgd-rate": (
        "sgd_rate.png",
        r"PSI SGD, constant $\eta = 1/L$",
        r"$\min_{t<T}\ E\|\mathrm{grad}\, f(w_t)\|_g^2$",
        r"bound $2(f(w_0) - f^*)/(\eta T) + L\eta\sigma^2$",
    ),
    "sgd-schedule": (
        "sgd_schedule.png",
        r"PSI SGD, $\eta_T = \sqrt{T_0/T}\,/L$",
        r"$\min_{t<T}\ E\|\mathrm{grad}\, f(w_t)\|_g^2$",
        r"bound $2(f(w_0) - f^*)/(\eta_T T) + L\eta_T\sigma^2$",
    ),
}
"""Per kind of rate check: file name, title, y-axis label and the bound's legend entry
(matplotlib mathtext)."""


def _positive(values: Sequence[float]) -> np.ndarray:
    """Values with non-positive entries masked, for a log axis."""
    array = np.asarray(values, dtype=float)
    return np.where(array > 0, array, np.nan)


def plot_rates(records: Sequence[dict], directory: Path) -> list[Path]:
    """One PNG per kind of rate check (:data:`FIGURES`), one panel per problem, with the
    measured curve and the bound on log-log axes; returns the files written."""
    written = []
    for kind, (filename, title, ylabel, bound_label) in FIGURES.items():
        selected = [r for r in records if r["name"].startswith(kind + "/") and "series" in r]
        if not selected:
            continue
        columns = min(3, len(selected))
        rows = math.ceil(len(selected) / columns)
        figure, axes = plt.subplots(
            rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False
        )
        for axis, record in zip(axes.flat, selected, strict=False):
            series = record["series"]
            marker = "o" if kind == "sgd-schedule" else None
            axis.loglog(series["T"], _positive(series["observed"]), marker=marker, label="observed")
            axis.loglog(
                series["T"], _positive(series["bound"]), "--", marker=marker, label=bound_label
            )
            status = "pass" if record["passed"] else "FAIL"
            axis.set_title(f"{record['problem']} ({status})", fontsize=9)
            axis.set_xlabel("horizon $T$" if kind == "sgd-schedule" else "$T$")
            axis.set_ylabel(ylabel, fontsize=8)
            if kind == "sgd-schedule":
                axis.xaxis.set_minor_formatter(NullFormatter())
                axis.set_xticks(series["T"], [str(t) for t in series["T"]])
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
        for axis in list(axes.flat)[len(selected) :]:
            axis.set_visible(False)
        figure.suptitle(title)
        figure.tight_layout()
        path = directory / filename
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written
