r"""Compare PSI, Euclidean and related optimizers over learning rates, initial scales and seeds.

Every run builds a model from its seed, multiplies all its positively scale-invariant weights
(those :func:`psi_geoopt.find_scale_invariant` finds) by the initial scale, and trains it with
one optimizer at one learning rate (see :mod:`psi_geoopt.experiments.optimizers` for the
optimizers and their reference learning rates, :mod:`psi_geoopt.experiments.training` for the
loop and what it measures). The initial scale does not change the network's training-mode
function, only the representative: Euclidean optimizers see a different effective learning
rate, optimizers on the PSI manifold should not.

Writes, in DIR: results.json ({"runs": [...]}, one entry per run, rewritten atomically after
each run), summary.md (tables of mean ± std over seeds), loss-curves-MODEL-DATASET.png (mean
curve of each optimizer at its best grid cell) and heatmap-MODEL-DATASET.png (mean test
accuracy over learning rate × initial scale, one panel per optimizer).

Summary definitions, per model, dataset and optimizer, on the mean test accuracy (eval mode)
over seeds of each grid cell (learning rate, initial scale): best = the best cell; robustness
= share of cells within 1 point of the best; eval gap = accuracy with batch statistics minus
accuracy with running statistics, on the test set (large when BN's running statistics no
longer match the weights).

With --resume, runs already in DIR/results.json are skipped; Ctrl-C stops after writing the
finished runs and the summary of what is there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..commandline import (
    add_common_arguments,
    check_output_directory,
    machine_description,
    positive_float,
    positive_int,
    write_json_atomically,
)
from .data import DATASETS, check_batch_size, load_dataset
from .models import MODELS
from .optimizers import OPTIMIZERS, missing_packages
from .plots import Curve, Heatmap, plot_heatmaps, plot_loss_curves
from .training import train_from_scratch

ROBUSTNESS_TOLERANCE = 1.0  # accuracy points

PRESETS: dict[str, dict] = {
    "default": {
        "optimizers": list(OPTIMIZERS),
        "models": ["mlp-bn"],
        "datasets": ["digits"],
        "lr_factors": [0.1, 1.0, 10.0],
        "init_scales": [0.1, 1.0, 10.0],
        "seeds": 3,
        "steps": 300,
        "title": "Optimizer comparison",
    },
    "results": {
        "optimizers": list(OPTIMIZERS),
        "models": ["mlp-bn"],
        "datasets": ["digits"],
        "lr_factors": [0.1, 0.3, 1.0, 3.0, 10.0],
        "init_scales": [0.1, 1.0, 10.0],
        "seeds": 5,
        "steps": 200,
        "title": "Digits comparison",
    },
}
_GRID_OPTIONS = (
    "optimizers",
    "models",
    "datasets",
    "lr_factors",
    "lrs",
    "init_scales",
    "seeds",
    "steps",
    "title",
)


@dataclass(frozen=True)
class RunSpec:
    """The settings of one training run; two runs with equal specs give equal results."""

    model: str
    dataset: str
    optimizer: str
    lr: float
    lr_factor: float | None
    init_scale: float
    seed: int
    steps: int
    batch_size: int
    target_loss: float

    def key(self) -> tuple:
        return tuple(asdict(self).values())

    @classmethod
    def from_record(cls, record: dict) -> RunSpec:
        return cls(**{name: record[name] for name in cls.__dataclass_fields__})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = PRESETS["default"]
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default="default",
        help="grid to start from; the options below override it (default: %(default)s; "
        "'results' is the grid of benchmarks/RESULTS.md)",
    )
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=OPTIMIZERS,
        metavar="NAME",
        help=f"optimizers to compare, from: {', '.join(OPTIMIZERS)} (default: all; sgdp and "
        "adamp need the package adamp)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=MODELS,
        metavar="NAME",
        help=f"models, from: {', '.join(MODELS)} (default: {' '.join(defaults['models'])})",
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        choices=DATASETS,
        metavar="NAME",
        help=f"datasets, from: {', '.join(DATASETS)} (default: {' '.join(defaults['datasets'])})",
    )
    learning_rates = parser.add_mutually_exclusive_group()
    learning_rates.add_argument(
        "--lr-factors",
        nargs="+",
        type=positive_float,
        metavar="F",
        help="learning rates as multiples of each optimizer's reference learning rate "
        f"(default: {' '.join(f'{f:g}' for f in defaults['lr_factors'])})",
    )
    learning_rates.add_argument(
        "--lrs",
        nargs="+",
        type=positive_float,
        metavar="LR",
        help="the same absolute learning rates for every optimizer",
    )
    parser.add_argument(
        "--init-scales",
        nargs="+",
        type=positive_float,
        metavar="S",
        help="factors applied to all PSI weights of the initialization "
        f"(default: {' '.join(f'{s:g}' for s in defaults['init_scales'])})",
    )
    parser.add_argument(
        "--seeds",
        type=positive_int,
        metavar="N",
        help=f"number of seeds, 0 … N-1 (default: {defaults['seeds']})",
    )
    parser.add_argument(
        "--steps", type=positive_int, help=f"training steps per run (default: {defaults['steps']})"
    )
    parser.add_argument(
        "--target-loss",
        type=positive_float,
        default=0.1,
        help="training loss whose first crossing is reported as steps to target "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("psi-geoopt-out/compare"),
        metavar="DIR",
        help="output directory (default: %(default)s)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in DIR/results.json and run only the missing ones",
    )
    parser.add_argument(
        "--update-markdown",
        type=Path,
        metavar="FILE",
        help="also write the summary as the section '## TITLE' of FILE (replacing it if "
        "present) and copy the heatmaps next to FILE",
    )
    parser.add_argument("--title", help="title of the summary (default: from the preset)")
    add_common_arguments(parser)


def _resolve(args: argparse.Namespace) -> dict:
    """The grid: the preset's values, overridden by the options given."""
    grid = dict(PRESETS[args.preset])
    for option in _GRID_OPTIONS:
        if getattr(args, option, None) is not None:
            grid[option] = getattr(args, option)
    if args.lrs is not None:
        grid["lr_factors"] = None
    else:
        grid["lrs"] = None
    return grid


def plan(grid: dict, batch_size: int, target_loss: float) -> list[RunSpec]:
    """Every run of the grid, seeds innermost so that partial results cover whole cells."""
    runs = []
    for model, dataset, optimizer in itertools.product(
        grid["models"], grid["datasets"], grid["optimizers"]
    ):
        reference = OPTIMIZERS[optimizer].reference_lr
        rates = (
            [(lr, None) for lr in grid["lrs"]]
            if grid["lrs"] is not None
            else [(float(f"{reference * f:.6g}"), f) for f in grid["lr_factors"]]
        )
        for (lr, factor), scale, seed in itertools.product(
            rates, grid["init_scales"], range(grid["seeds"])
        ):
            runs.append(
                RunSpec(
                    model,
                    dataset,
                    optimizer,
                    lr,
                    factor,
                    scale,
                    seed,
                    grid["steps"],
                    batch_size,
                    target_loss,
                )
            )
    return runs


def execute(spec: RunSpec) -> dict:
    """Train one run and return its record for results.json."""
    result = train_from_scratch(
        spec.model,
        spec.optimizer,
        load_dataset(spec.dataset),
        lr=spec.lr,
        seed=spec.seed,
        init_scale=spec.init_scale,
        steps=spec.steps,
        batch_size=spec.batch_size,
        target_loss=spec.target_loss,
    )
    return {**asdict(spec), **result.as_dict()}


def _load_runs(path: Path) -> list[dict]:
    with path.open() as file:
        content = json.load(file)
    if not isinstance(content, dict) or not isinstance(content.get("runs"), list):
        raise ValueError(f"{path} is not a results file (expected {{'runs': [...]}})")
    return content["runs"]


def _check_optional_packages(args: argparse.Namespace, grid: dict) -> str | None:
    """An error if an optimizer asked for by name needs a package that is not installed; the
    preset's optimizers that need one are dropped from ``grid`` with a note instead."""
    missing = missing_packages(grid["optimizers"])
    if not missing:
        return None
    packages = " ".join(sorted(set(missing.values())))
    needs = f"{', '.join(missing)} need(s) the package(s) {packages} (pip install {packages})"
    if args.optimizers is not None:
        return f"optimizer(s) {needs}"
    grid["optimizers"] = [name for name in grid["optimizers"] if name not in missing]
    print(f"psi-geoopt compare: note: leaving out {needs}", file=sys.stderr)
    return None


def _check_markdown_target(path: Path) -> str | None:
    target = path if path.exists() else path.parent
    if not target.exists() or not os.access(target, os.W_OK):
        return f"cannot write --update-markdown file {str(path)!r}"
    return None


def run(args: argparse.Namespace) -> int:
    grid = _resolve(args)
    results_path = args.out / "results.json"
    error = _check_optional_packages(args, grid) or check_batch_size(
        args.batch_size, grid["datasets"]
    )
    if error is None:
        error = check_output_directory(args.out)
    if error is None and args.update_markdown is not None:
        error = _check_markdown_target(args.update_markdown)
    if error is None and results_path.exists() and not args.resume:
        error = (
            f"{results_path} already exists; pass --resume to keep its runs and add the "
            "missing ones, or choose another --out"
        )
    runs: list[dict] = []
    done: set[tuple] = set()
    if error is None and results_path.exists():
        try:
            runs = _load_runs(results_path)
            done = {RunSpec.from_record(record).key() for record in runs}
        except (ValueError, KeyError, TypeError) as problem:
            error = f"cannot resume from {results_path}: {problem!r}"
    if error is not None:
        print(f"psi-geoopt compare: error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    planned = plan(grid, args.batch_size, args.target_loss)
    todo = [spec for spec in planned if spec.key() not in done]
    print(f"{len(planned)} runs planned, {len(planned) - len(todo)} already in {results_path}")
    start = time.perf_counter()
    interrupted = False
    try:
        for spec in tqdm(todo, unit="run"):
            runs.append(execute(spec))
            write_json_atomically(results_path, {"runs": runs})
    except KeyboardInterrupt:
        interrupted = True
    write_json_atomically(results_path, {"runs": runs})
    planned_keys = {spec.key() for spec in planned}
    selected = [record for record in runs if RunSpec.from_record(record).key() in planned_keys]
    summary = write_report(selected, args, grid)
    print(summary)
    print(
        f"{'interrupted' if interrupted else 'finished'} after {time.perf_counter() - start:.0f} s"
    )
    if interrupted:
        print(
            f"interrupted: {results_path} holds {len(runs)} finished "
            f"run{'' if len(runs) == 1 else 's'}; run the same command with --resume to "
            "continue",
            file=sys.stderr,
        )
        return 130
    return 0


# ---------------------------------------------------------------------------- the summary


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _format(values: Sequence[float], digits: int = 1) -> str:
    mean, std = (round(value, digits) + 0.0 for value in _mean_std(values))  # no "-0.0"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


@dataclass(frozen=True)
class _OptimizerSummary:
    """The grid of one optimizer on one model and dataset, reduced over seeds."""

    optimizer: str
    learning_rates: list[float]
    init_scales: list[float]
    cells: dict[tuple[float, float], list[dict]]

    def accuracy(self, cell: tuple[float, float]) -> float:
        return 100 * statistics.fmean(r["test_accuracy"] for r in self.cells[cell])

    @property
    def best(self) -> tuple[float, float]:
        return max(self.cells, key=self.accuracy)

    @property
    def robustness(self) -> float:
        best = self.accuracy(self.best)
        near = [c for c in self.cells if self.accuracy(c) >= best - ROBUSTNESS_TOLERANCE]
        return len(near) / len(self.cells)

    def best_at_scale(self, scale: float) -> float | None:
        values = [self.accuracy(c) for c in self.cells if c[1] == scale]
        return max(values) if values else None

    @property
    def mean_absolute_gap(self) -> float:
        """Mean over every run of the grid of the absolute eval gap, in points."""
        return statistics.fmean(np.abs(_gap(r for c in self.cells.values() for r in c)))

    def heatmap(self) -> Heatmap:
        accuracy = np.full((len(self.learning_rates), len(self.init_scales)), np.nan)
        for lr, scale in self.cells:
            accuracy[self.learning_rates.index(lr), self.init_scales.index(scale)] = self.accuracy(
                (lr, scale)
            )
        return Heatmap(self.optimizer, self.learning_rates, self.init_scales, accuracy)

    def mean_curve(self) -> list[float]:
        curves = [r["loss_curve"] for r in self.cells[self.best] if not r["diverged"]]
        if not curves:
            return []
        length = min(len(c) for c in curves)
        return list(np.mean([c[:length] for c in curves], axis=0))


def _summarize(runs: Iterable[dict]) -> dict[tuple[str, str], list[_OptimizerSummary]]:
    grouped: dict[tuple[str, str, str], dict] = defaultdict(lambda: defaultdict(list))
    for record in runs:
        cell = (record["lr"], record["init_scale"])
        grouped[record["model"], record["dataset"], record["optimizer"]][cell].append(record)
    summaries: dict[tuple[str, str], list[_OptimizerSummary]] = defaultdict(list)
    for (model, dataset, optimizer), cells in grouped.items():
        summaries[model, dataset].append(
            _OptimizerSummary(
                optimizer,
                sorted({lr for lr, _ in cells}),
                sorted({scale for _, scale in cells}),
                dict(cells),
            )
        )
    return summaries


def _machine() -> str:
    info = machine_description()
    versions = ", ".join(
        f"{package} {info[package]}" if info[package] else f"{package} not installed"
        for package in ("torch", "geoopt", "adamp")
    )
    return (
        f"{info['cpu']}, {info['cpu_count']} logical cores visible, "
        f"{info['torch_threads']} torch thread(s), {versions}, Python {info['python']}, "
        f"{info['platform']}"
    )


def _command(args: argparse.Namespace, grid: dict) -> str:
    """The command that regenerates this summary."""
    words = ["psi-geoopt", "compare", "--preset", args.preset]
    for option in _GRID_OPTIONS:
        value = getattr(args, option, None)
        if value is not None:
            values = value if isinstance(value, list) else [value]
            words += [
                f"--{option.replace('_', '-')}",
                *(f"{v:g}" if isinstance(v, float) else str(v) for v in values),
            ]
    if args.target_loss != 0.1:
        words += ["--target-loss", f"{args.target_loss:g}"]
    if args.batch_size != 64:
        words += ["--batch-size", str(args.batch_size)]
    if args.threads != 1:
        words += ["--threads", str(args.threads)]
    words += ["--out", str(args.out)]
    if args.update_markdown is not None:
        words += ["--update-markdown", str(args.update_markdown)]
    return shlex.join(words)


def _steps_to_target(records: list[dict]) -> str:
    reached = [r["steps_to_target"] for r in records if r["steps_to_target"] is not None]
    if not reached:
        return f"never (0/{len(records)})"
    suffix = "" if len(reached) == len(records) else f" ({len(reached)}/{len(records)} reached)"
    return _format(reached, 0) + suffix


def _gap(records: Iterable[dict]) -> list[float]:
    return [100 * (r["train_mode_accuracy"] - r["test_accuracy"]) for r in records]


def _observations(summaries: list[_OptimizerSummary]) -> list[str]:
    """Sentences computed from the numbers of one model and dataset."""
    by_accuracy = sorted(summaries, key=lambda s: s.accuracy(s.best), reverse=True)
    top = by_accuracy[0]
    top_values = [100 * r["test_accuracy"] for r in top.cells[top.best]]
    top_mean, top_std = _mean_std(top_values)
    ties = [
        s.optimizer for s in by_accuracy[1:] if s.accuracy(s.best) >= top_mean - max(top_std, 0.1)
    ]
    lines = [
        f"- Highest best-cell accuracy: {top.optimizer} ({top_mean:.1f} %)"
        + (f"; within one standard deviation of it: {', '.join(ties)}." if ties else ".")
    ]
    spreads = []
    for s in summaries:
        per_scale = [v for v in (s.best_at_scale(x) for x in s.init_scales) if v is not None]
        spreads.append((max(per_scale) - min(per_scale), s.optimizer))
    spreads.sort()
    lines.append(
        "- Sensitivity to the initial scale (best accuracy over the learning rates, "
        "max − min over the scales, points): "
        + ", ".join(f"{name} {spread:.1f}" for spread, name in spreads)
        + "."
    )
    robust = sorted(summaries, key=lambda s: s.robustness, reverse=True)
    lines.append(
        "- Robustness (share of the grid within 1 point of the best): "
        + ", ".join(f"{s.optimizer} {100 * s.robustness:.0f} %" for s in robust)
        + "."
    )
    gaps = sorted(summaries, key=lambda s: s.mean_absolute_gap, reverse=True)
    lines.append(
        "- Mean |eval gap| over the whole grid (points): "
        + ", ".join(f"{s.optimizer} {s.mean_absolute_gap:.1f}" for s in gaps)
        + "."
    )
    return lines


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_report(runs: list[dict], args: argparse.Namespace, grid: dict) -> str:
    """Write summary.md and the figures of ``runs`` into ``args.out`` (and the markdown file
    of ``--update-markdown``); return the summary."""
    summaries = _summarize(runs)
    compute = sum(r["wall_s"] for r in runs)
    learning_rates = (
        "factors "
        + ", ".join(f"{f:g}" for f in grid["lr_factors"])
        + " × each optimizer's reference learning rate"
        if grid["lrs"] is None
        else ", ".join(f"{lr:g}" for lr in grid["lrs"])
    )
    lines = [
        f"## {grid['title']}",
        "",
        f"Regenerate with `{_command(args, grid)}`.",
        "",
        f"Machine: {_machine()}. {len(runs)} runs, {compute / 60:.1f} min of training in all "
        "(sum of the runs' wall times).",
        "",
        f"Grid: learning rates = {learning_rates}; initial scales "
        f"{', '.join(f'{s:g}' for s in grid['init_scales'])} (all PSI weights multiplied); "
        f"seeds 0–{grid['seeds'] - 1}; {grid['steps']} steps of batch {args.batch_size}; "
        f"target training loss {args.target_loss:g} (mean over 10 steps). Accuracies are on "
        f"the test set, in %, mean ± std over seeds. *Best cell*: the (learning rate, "
        f"initial scale) with the best mean accuracy. *Robustness*: share of the grid within "
        f"{ROBUSTNESS_TOLERANCE:g} point of that best. *Eval gap*: accuracy with BN batch "
        f"statistics minus accuracy with BN running statistics (eval mode).",
    ]
    markdown_dir = args.update_markdown.parent if args.update_markdown is not None else None
    for (model, dataset), optimizers in summaries.items():
        figure_name = f"{model}-{dataset}.png"
        heatmap_path = plot_heatmaps(
            [s.heatmap() for s in optimizers],
            args.out / f"heatmap-{figure_name}",
            title=f"{model} on {dataset}: mean test accuracy (%) over seeds",
        )
        plot_loss_curves(
            [
                Curve(
                    s.optimizer,
                    s.mean_curve(),
                    runs[0]["log_every"],
                    linestyle="-" if s.optimizer.startswith(("psi", "sphere")) else "--",
                    steps=grid["steps"],
                )
                for s in optimizers
            ],
            args.out / f"loss-curves-{figure_name}",
            title=f"{model} on {dataset}: mean loss at each optimizer's best cell",
            target_loss=args.target_loss,
        )
        scales = sorted({x for s in optimizers for x in s.init_scales})
        lines += [
            "",
            f"### {model} on {dataset}",
            "",
            "| optimizer | best accuracy | best lr, scale | robustness | steps to target "
            "| final train loss | eval gap (best cell) | mean \\|eval gap\\| (grid) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in optimizers:
            records = s.cells[s.best]
            losses = [r["final_train_loss"] for r in records if r["final_train_loss"] is not None]
            lines.append(
                f"| {s.optimizer} | {_format([100 * r['test_accuracy'] for r in records])} "
                f"| {s.best[0]:g}, {s.best[1]:g} | {100 * s.robustness:.0f} % "
                f"| {_steps_to_target(records)} "
                f"| {_format(losses, 4) if losses else 'diverged'} "
                f"| {_format(_gap(records))} "
                f"| {s.mean_absolute_gap:.1f} |"
            )
        lines += [
            "",
            "Best accuracy over the learning rates, at each initial scale:",
            "",
            "| optimizer | " + " | ".join(f"scale {x:g}" for x in scales) + " |",
            "|---|" + "---|" * len(scales),
        ]
        for s in optimizers:
            values = [s.best_at_scale(x) for x in scales]
            lines.append(
                f"| {s.optimizer} | "
                + " | ".join("—" if v is None else f"{v:.1f}" for v in values)
                + " |"
            )
        lines += ["", *_observations(optimizers), ""]
        image = Path(heatmap_path.name)
        if markdown_dir is not None:
            image = markdown_dir / f"{_slug(grid['title'])}-heatmap-{figure_name}"
            shutil.copyfile(heatmap_path, image)
            image = image.relative_to(markdown_dir)
        lines.append(
            f"![Accuracy over learning rate × initial scale, {model} on {dataset}]({image})"
        )
    summary = "\n".join(lines) + "\n"
    (args.out / "summary.md").write_text(summary)
    if args.update_markdown is not None:
        _replace_section(args.update_markdown, grid["title"], summary)
    return summary


def _replace_section(path: Path, title: str, section: str) -> None:
    """Replace the section ``## title`` of the markdown file ``path`` (up to the next ``## ``
    heading), or append it."""
    text = path.read_text() if path.exists() else ""
    heading = re.compile(rf"^## {re.escape(title)}[ \t]*$", re.MULTILINE)
    match = heading.search(text)
    if match is None:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    else:
        following = re.compile(r"^## ", re.MULTILINE).search(text, match.end())
        end = following.start() if following else len(text)
        text = text[: match.start()] + section + ("\n" if following else "") + text[end:]
    path.write_text(text)
