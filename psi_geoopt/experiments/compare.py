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

Datasets read from disk (cifar10, cifar100, mnist, fashion-mnist, imagefolder; --data-dir,
never downloaded) train the way CIFAR practitioners train: --epochs, a --schedule with
--warmup-epochs, --augment crop-flip (random 4-pixel-padded crop and horizontal flip, the
default on CIFAR and image folders), --precision bf16/fp16, --device cuda, --workers for data
loading, a progress bar per epoch. Models can come from torchvision or timm
(torchvision:NAME, timm:NAME; --cifar-stem adapts them to 32x32 inputs). Weight decay never
applies to the PSI weights (psi_geoopt.param_groups).

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
from dataclasses import MISSING, asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..commandline import (
    add_common_arguments,
    check_output_directory,
    machine_description,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    write_json_atomically,
)
from .data import (
    DATASETS,
    DEFAULT_IMAGE_SIZE,
    IN_MEMORY_DATASETS,
    DatasetError,
    check_batch_size,
    load_dataset,
)
from .images import AUGMENTATIONS
from .models import MODELS, build_model, check_model_name
from .optimizers import OPTIMIZERS, missing_packages
from .plots import Curve, Heatmap, plot_heatmaps, plot_loss_curves
from .recipe import PRECISIONS, SCHEDULES, Recipe, check_device
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
    "epochs",
    "title",
)
# image datasets are augmented by default where practitioners do (not the digit datasets)
DEFAULT_AUGMENTATION = {"cifar10": "crop-flip", "cifar100": "crop-flip", "imagefolder": "crop-flip"}
LOG_EVERY = 10  # steps per point of the loss curve of step-based runs (epoch runs: an epoch)
_RECIPE_DEFAULTS = {
    "data_dir": None,
    "image_size": DEFAULT_IMAGE_SIZE,
    "schedule": "constant",
    "warmup_epochs": 0.0,
    "augment": None,
    "precision": "fp32",
    "device": "cpu",
    "workers": 0,
}


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
    epochs: int | None = None  # None: a step-based run of `steps`; else steps = epochs × epoch
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    augment: str = "none"
    precision: str = "fp32"
    cifar_stem: bool = False
    image_size: int | None = None  # imagefolder only

    def key(self) -> tuple:
        return tuple(asdict(self).values())

    @classmethod
    def from_record(cls, record: dict) -> RunSpec:
        """The spec of a results.json record (fields added since it was written: defaults)."""
        return cls(
            **{
                name: record[name] if name in record or field.default is MISSING else field.default
                for name, field in cls.__dataclass_fields__.items()
            }
        )


@dataclass(frozen=True)
class Runtime:
    """Where and how runs execute, without changing what they compute (not part of a spec)."""

    data_dir: Path | None = None
    device: str = "cpu"
    workers: int = 0
    progress: bool = False


def _model_name(text: str) -> str:
    """A model :func:`~psi_geoopt.experiments.models.build_model` can build (argparse type)."""
    error = check_model_name(text)
    if error is not None:
        raise argparse.ArgumentTypeError(error)
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_grid_arguments(parser)
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
    _add_data_and_recipe_arguments(parser)
    add_common_arguments(parser)


def _add_grid_arguments(parser: argparse.ArgumentParser) -> None:
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
        type=_model_name,
        metavar="NAME",
        help=f"models, from: {', '.join(MODELS)}, torchvision:NAME, timm:NAME (when the "
        f"package is installed) (default: {' '.join(defaults['models'])})",
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
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--steps", type=positive_int, help=f"training steps per run (default: {defaults['steps']})"
    )
    length.add_argument(
        "--epochs",
        type=positive_int,
        metavar="N",
        help="train each run for N passes over the training set instead (the loss curve then "
        "has one point per epoch)",
    )


def _add_data_and_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data on disk and training recipe")
    group.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="directory holding the datasets read from disk (never downloaded): "
        "cifar-10-batches-py/, cifar-100-python/, MNIST/raw/ or the IDX files, "
        "FashionMNIST/raw/, or for imagefolder train/CLASS/* and test/CLASS/* (or val/)",
    )
    group.add_argument(
        "--image-size",
        type=positive_int,
        default=DEFAULT_IMAGE_SIZE,
        metavar="N",
        help="imagefolder: side of the square the images are resized and cropped to "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="constant",
        metavar="NAME",
        help="learning-rate schedule over the run: constant, cosine (to 0), step (x0.1 at 50 "
        "and 75 %% of the steps) (default: %(default)s)",
    )
    group.add_argument(
        "--warmup-epochs",
        type=non_negative_float,
        default=0.0,
        metavar="E",
        help="linear learning-rate warm-up over the first E epochs (default: %(default)s)",
    )
    group.add_argument(
        "--augment",
        choices=AUGMENTATIONS,
        metavar="NAME",
        help="training-batch augmentation of image datasets: crop-flip (random crop of the "
        "image padded by side/8 pixels, horizontal flip) (default: crop-flip on cifar10, "
        "cifar100 and imagefolder, none otherwise)",
    )
    group.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        metavar="NAME",
        help="fp32; bf16 (autocast, CPU or CUDA); fp16 (autocast with loss scaling, CUDA "
        "only) (default: %(default)s)",
    )
    group.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    group.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="data-loading processes for image datasets; results do not depend on it "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--cifar-stem",
        action="store_true",
        help="adapt torchvision/timm models to 32x32 inputs: ResNets get a 3x3 stride-1 first "
        "convolution and no max-pool, VGGs a global average pool and one Linear classifier",
    )


def _resolve(args: argparse.Namespace) -> dict:
    """The grid: the preset's values, overridden by the options given."""
    grid = {"epochs": None, **PRESETS[args.preset]}
    for option in _GRID_OPTIONS:
        if getattr(args, option, None) is not None:
            grid[option] = getattr(args, option)
    if args.lrs is not None:
        grid["lr_factors"] = None
    else:
        grid["lrs"] = None
    if grid["epochs"] is not None:
        grid["steps"] = None
    return grid


def _recipe_settings(args: argparse.Namespace, model: str, dataset: str) -> dict:
    """The training-recipe fields of the specs of ``model`` on ``dataset``."""
    return {
        "schedule": args.schedule,
        "warmup_epochs": args.warmup_epochs,
        "augment": args.augment or DEFAULT_AUGMENTATION.get(dataset, "none"),
        "precision": args.precision,
        "cifar_stem": args.cifar_stem and model not in MODELS,
        "image_size": args.image_size if dataset == "imagefolder" else None,
    }


def plan(grid: dict, args: argparse.Namespace, steps_per_epoch: dict[str, int]) -> list[RunSpec]:
    """Every run of the grid, seeds innermost so that partial results cover whole cells.

    ``steps_per_epoch`` gives the optimizer steps of one epoch of each dataset at
    ``args.batch_size`` (used when the grid counts epochs).
    """
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
        epochs = grid["epochs"]
        steps = grid["steps"] if epochs is None else epochs * steps_per_epoch[dataset]
        settings = _recipe_settings(args, model, dataset)
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
                    steps,
                    args.batch_size,
                    args.target_loss,
                    epochs,
                    **settings,
                )
            )
    return runs


def _location(runtime: Runtime, spec: RunSpec) -> dict:
    return {"data_dir": runtime.data_dir, "image_size": spec.image_size or DEFAULT_IMAGE_SIZE}


def execute(spec: RunSpec, runtime: Runtime) -> dict:
    """Train one run and return its record for results.json."""
    dataset = load_dataset(spec.dataset, **_location(runtime, spec))
    steps_per_epoch = dataset.num_train // spec.batch_size
    recipe = Recipe(
        schedule=spec.schedule,
        warmup_steps=round(spec.warmup_epochs * steps_per_epoch),
        precision=spec.precision,
        augment=spec.augment,
        device=runtime.device,
        workers=runtime.workers,
        progress=runtime.progress,
    )
    result = train_from_scratch(
        spec.model,
        spec.optimizer,
        dataset,
        lr=spec.lr,
        seed=spec.seed,
        init_scale=spec.init_scale,
        steps=spec.steps,
        batch_size=spec.batch_size,
        log_every=LOG_EVERY if spec.epochs is None else steps_per_epoch,
        target_loss=spec.target_loss,
        recipe=recipe,
        cifar_stem=spec.cifar_stem,
    )
    return {**asdict(spec), **result.as_dict(), "device": _device_name(runtime.device)}


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


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


def _check_recipe(args: argparse.Namespace, grid: dict) -> str | None:
    """An error if the device, precision, augmentation or stem cannot apply to the grid."""
    error = check_device(args.device)
    if error is None and args.precision == "fp16" and torch.device(args.device).type != "cuda":
        error = "--precision fp16 needs --device cuda (bf16 runs on the CPU)"
    in_memory = [name for name in grid["datasets"] if name in IN_MEMORY_DATASETS]
    if error is None and args.augment not in (None, "none") and in_memory:
        error = f"--augment {args.augment} applies to image datasets, not {', '.join(in_memory)}"
    if error is None and args.cifar_stem and all(model in MODELS for model in grid["models"]):
        error = "--cifar-stem applies to torchvision:NAME and timm:NAME models only"
    if error is None and grid["epochs"] is not None and args.warmup_epochs >= grid["epochs"]:
        warmup, epochs = args.warmup_epochs, grid["epochs"]
        error = f"--warmup-epochs {warmup:g} leaves nothing of --epochs {epochs}"
    return error


def _check_data_and_models(args: argparse.Namespace, grid: dict) -> str | None:
    """Load every dataset and run every model once on two of its images: an error message
    (data missing or malformed, a batch larger than a training set, a model that does not fit
    the data) before any training starts."""
    location = {"data_dir": args.data_dir, "image_size": args.image_size}
    try:
        error = check_batch_size(args.batch_size, grid["datasets"], **location)
    except DatasetError as problem:
        return str(problem)
    for model, dataset_name in itertools.product(grid["models"], grid["datasets"]):
        if error is not None:
            break
        dataset = load_dataset(dataset_name, **location)
        try:
            network = build_model(
                model,
                0,
                dataset.num_classes,
                dataset.input_shape,
                cifar_stem=_recipe_settings(args, model, dataset_name)["cifar_stem"],
            )
            network(dataset.example_inputs(2))
        except (ValueError, RuntimeError) as problem:
            reason = str(problem).strip().splitlines()[0]
            error = f"model {model!r} does not run on {dataset_name!r}: {reason}"
    return error


def run(args: argparse.Namespace) -> int:
    grid = _resolve(args)
    results_path = args.out / "results.json"
    error = (
        _check_optional_packages(args, grid)
        or _check_recipe(args, grid)
        or _check_data_and_models(args, grid)
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
    location = {"data_dir": args.data_dir, "image_size": args.image_size}
    steps_per_epoch = {
        name: load_dataset(name, **location).num_train // args.batch_size
        for name in grid["datasets"]
    }
    planned = plan(grid, args, steps_per_epoch)
    runtime = Runtime(args.data_dir, args.device, args.workers, progress=grid["epochs"] is not None)
    todo = [spec for spec in planned if spec.key() not in done]
    print(f"{len(planned)} runs planned, {len(planned) - len(todo)} already in {results_path}")
    start = time.perf_counter()
    interrupted = False
    try:
        for spec in tqdm(todo, unit="run"):
            runs.append(execute(spec, runtime))
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
    for option, default in _RECIPE_DEFAULTS.items():
        value = getattr(args, option)
        if value != default:
            text = f"{value:g}" if isinstance(value, float) else str(value)
            words += [f"--{option.replace('_', '-')}", text]
    if args.cifar_stem:
        words.append("--cifar-stem")
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


def _length(grid: dict) -> str:
    return f"{grid['steps']} steps" if grid["epochs"] is None else f"{grid['epochs']} epochs"


def _window(grid: dict) -> str:
    return f"mean over {LOG_EVERY} steps" if grid["epochs"] is None else "mean over an epoch"


def _recipe_description(args: argparse.Namespace, grid: dict, runs: list[dict]) -> list[str]:
    """A paragraph on the training recipe, when it is not the default one."""
    parts = []
    if args.schedule != "constant" or args.warmup_epochs:
        warmup = f" after {args.warmup_epochs:g} warm-up epoch(s)" if args.warmup_epochs else ""
        parts.append(f"learning-rate schedule {args.schedule}{warmup}")
    augmented = sorted({r["dataset"] for r in runs if r.get("augment", "none") != "none"})
    if augmented:
        parts.append(f"crop-flip augmentation on {', '.join(augmented)}")
    if args.precision != "fp32":
        parts.append(f"precision {args.precision} (autocast)")
    devices = sorted({r.get("device", "cpu") for r in runs})
    if devices != ["cpu"]:
        parts.append(f"device {', '.join(devices)}")
    if args.workers:
        parts.append(f"{args.workers} data-loading workers")
    if args.cifar_stem:
        parts.append("torchvision/timm models adapted to 32x32 inputs (--cifar-stem)")
    return ["", f"Training: {'; '.join(parts)}."] if parts else []


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
        f"seeds 0–{grid['seeds'] - 1}; {_length(grid)} of batch {args.batch_size}; target "
        f"training loss {args.target_loss:g} ({_window(grid)}). Accuracies are on "
        f"the test set, in %, mean ± std over seeds. *Best cell*: the (learning rate, "
        f"initial scale) with the best mean accuracy. *Robustness*: share of the grid within "
        f"{ROBUSTNESS_TOLERANCE:g} point of that best. *Eval gap*: accuracy with BN batch "
        f"statistics minus accuracy with BN running statistics (eval mode).",
        *_recipe_description(args, grid, runs),
    ]
    markdown_dir = args.update_markdown.parent if args.update_markdown is not None else None
    for (model, dataset), optimizers in summaries.items():
        figure_name = f"{_slug(model)}-{dataset}.png"
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
                    s.cells[s.best][0]["log_every"],
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
