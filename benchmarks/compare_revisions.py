"""The optimizer steps of the working tree against those of a git revision, side by side.

    python benchmarks/compare_revisions.py REVISION [--rounds N] [--models resnet18 resnet50]

Extracts ``psi_geoopt`` at ``REVISION`` (``git archive``) into a temporary directory, imports it
under another name next to the working tree's ``psi_geoopt``, and times both in one process,
interleaved: every round runs every case once on each, alternating which goes first, so that
load from other processes hits both alike. The cases, as ``psi-geoopt bench`` runs them:

- the optimizer step on the parameter shapes of ResNet-18 and ResNet-50 (convolutions on
  ``PSIManifold(dim=0)``, the rest Euclidean, fixed gradients): ``RiemannianSGD`` with its
  defaults (no momentum), with momentum 0.9 (the default ``compile=None`` path, eager with
  ``compile=False`` and the reference loop of the manifold's operations with ``foreach=False``),
  ``RiemannianAdam``, and geoopt's ``RiemannianSGD`` with momentum on each ``PSIManifold``;
- the training step (forward, backward, step) of the demo ConvNet (``convnet-bn``, converted by
  each revision's ``to_psi``) with ``RiemannianSGD``, momentum 0.9, on a batch of 64 8x8 images.

Prints, per case, the median time of each, the median over rounds of the per-round ratio
working tree / revision with its interquartile range, and the ratio of the fastest deciles
(on a machine loaded by other work the fast samples are those least disturbed). Each side
compiles its Numba loop at its first step (the revision's into the temporary directory),
before the timed rounds. ``--threads`` sets the threads of PyTorch and Numba (default: as
they start).
"""

from __future__ import annotations

import argparse
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import geoopt
import torch
from torch import nn

import psi_geoopt
from psi_geoopt.experiments.bench import MODELS
from psi_geoopt.experiments.models import build_model

TRAINING_STEPS = 10
"""Training steps per timed sample: one step of the ConvNet is a few milliseconds."""


def load_revision(revision: str, directory: Path) -> ModuleType:
    """``psi_geoopt`` as it is at ``revision``, imported as ``psi_geoopt_<commit>``."""
    root = Path(__file__).resolve().parent.parent
    git = dict(cwd=root, check=True, capture_output=True)
    commit = subprocess.run(["git", "rev-parse", "--short", revision], text=True, **git)
    commit = commit.stdout.strip()
    archive = subprocess.run(["git", "archive", commit, "psi_geoopt"], **git).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")
    name = f"psi_geoopt_{commit}"
    (directory / "psi_geoopt").rename(directory / name)
    sys.path.insert(0, str(directory))
    return importlib.import_module(name)


def parameters(package: ModuleType, model: str) -> list[torch.Tensor]:
    """The ResNet shapes of ``model``, convolutions on ``package``'s ``PSIManifold(dim=0)``."""
    convolutions, others = MODELS[model]
    generator = torch.Generator().manual_seed(0)
    params: list[torch.Tensor] = [
        geoopt.ManifoldParameter(
            torch.randn(shape, generator=generator), manifold=package.PSIManifold(dim=0)
        )
        for shape in convolutions
    ]
    params += [nn.Parameter(torch.randn(shape, generator=generator)) for shape in others]
    for p in params:
        p.grad = 1e-2 * torch.randn(p.shape, generator=generator)
    return params


OPTIMIZERS: dict[str, Callable[[ModuleType, list[torch.Tensor]], torch.optim.Optimizer]] = {
    "SGD defaults": lambda package, p: package.optim.RiemannianSGD(p, lr=0.01),
    "SGD momentum": lambda package, p: package.optim.RiemannianSGD(p, lr=0.01, momentum=0.9),
    "SGD momentum eager": lambda package, p: package.optim.RiemannianSGD(
        p, lr=0.01, momentum=0.9, compile=False
    ),
    "Adam": lambda package, p: package.optim.RiemannianAdam(p, lr=1e-3),
    # the manifold's operations, parameter by parameter
    "SGD momentum reference loop": lambda package, p: package.optim.RiemannianSGD(
        p, lr=0.01, momentum=0.9, foreach=False
    ),
    "geoopt SGD momentum": lambda package, p: geoopt.optim.RiemannianSGD(p, lr=0.01, momentum=0.9),
}


def optimizer_step(package: ModuleType, model: str, optimizer: str) -> Callable[[], object]:
    step = OPTIMIZERS[optimizer](package, parameters(package, model)).step
    for _ in range(3):  # buffers, the Numba loop's compilation
        step()
    return step


def training_step(package: ModuleType) -> Callable[[], object]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(64, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (64,), generator=generator)
    model = build_model("convnet-bn", seed=0)
    package.to_psi(model, images)
    optimizer = package.optim.RiemannianSGD(model.parameters(), lr=0.01, momentum=0.9)

    def steps() -> None:
        for _ in range(TRAINING_STEPS):
            optimizer.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()

    steps()
    return steps


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revision", help="the git revision to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads is not None:
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as directory:
        before = load_revision(args.revision, Path(directory))
        sides = {"before": before, "after": psi_geoopt}
        cases: dict[str, dict[str, Callable[[], object]]] = {}
        for model in args.models:
            for optimizer in OPTIMIZERS:
                cases[f"{model} {optimizer}"] = {
                    side: optimizer_step(package, model, optimizer)
                    for side, package in sides.items()
                }
        label = f"convnet-bn training step x{TRAINING_STEPS}"
        cases[label] = {side: training_step(package) for side, package in sides.items()}
        samples = {case: {"before": [], "after": []} for case in cases}
        for round_index in range(args.rounds):
            order = ("before", "after") if round_index % 2 == 0 else ("after", "before")
            for case, actions in cases.items():
                for side in order:
                    samples[case][side].append(timed(actions[side]))
    print(
        f"working tree against {args.revision} ({before.__name__}), {args.rounds} interleaved "
        f"rounds, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"  {'case':<38} {'before ms':>10} {'after ms':>10} {'after/before':>13} {'IQR':>13} "
        f"{'fastest 10%':>12}"
    )
    for case, times in samples.items():
        ratios = [a / b for a, b in zip(times["after"], times["before"], strict=True)]
        quartiles = statistics.quantiles(ratios, n=4)
        fastest = {side: statistics.quantiles(times[side], n=10)[0] for side in times}
        print(
            f"  {case:<38} {1e3 * statistics.median(times['before']):>10.2f} "
            f"{1e3 * statistics.median(times['after']):>10.2f} "
            f"{statistics.median(ratios):>13.3f} {quartiles[0]:>6.3f}-{quartiles[2]:.3f} "
            f"{fastest['after'] / fastest['before']:>12.3f}"
        )


if __name__ == "__main__":
    main()
