r"""Train a small BN ConvNet on real digits with PSI SGD and Euclidean SGD from equivalent starts.

The network is ``convnet-bn`` (three Conv → BN → ReLU layers) on scikit-learn's bundled 8x8
handwritten digits. Each optimizer trains it twice with the same learning rate, minibatches
and seed: once from the default initialization and once from an *equivalent* one, in which
the incoming weights of every BN-normalized channel are multiplied by a factor
:math:`c \sim \operatorname{LogUniform}[1, 10]` (one per channel, drawn from the seed). In
training mode both networks compute the same function. Euclidean SGD sees a channel's
effective learning rate divided by :math:`c^2`; PSI SGD (Riemannian SGD on the PSI manifold)
does not, so its two runs should follow the same trajectory up to rounding.

The factors are at least 1 on purpose: BatchNorm computes :math:`(z - \mu) / \sqrt{\sigma^2 +
\epsilon}`, and scaling a channel by :math:`c` replaces :math:`\epsilon` by
:math:`\epsilon / c^2`; with :math:`c \ge 1` that only makes :math:`\epsilon` smaller, so the
rescaled network stays equivalent to about :math:`\epsilon / \sigma^2 \approx 10^{-5}`, while
factors well below 1 would make :math:`\epsilon` matter. Rounding and this residue are
amplified by SGD's sensitivity to tiny perturbations, so "same trajectory" is measured as the
largest difference between the two loss curves, printed for both optimizers.

Writes DIR/results.json (one entry per run; ``init_scale`` is the number every PSI weight was
multiplied by, 1 here, and ``channel_factors`` the per-channel factors applied on top of it:
weight name → one factor per channel, ``{}`` for the default initialization) and
DIR/loss_curves.png. The loss is logged as a mean over windows of 10 steps, the last one cut
at the last step. Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..commandline import (
    add_common_arguments,
    check_output_directory,
    format_table,
    non_negative_int,
    positive_int,
    write_json_atomically,
)
from .data import check_batch_size, load_dataset
from .models import build_model
from .plots import Curve, plot_loss_curves
from .training import TrainResult, scale_invariant_weights, train_from_scratch

MODEL = "convnet-bn"
DATASET = "digits"
OPTIMIZERS = ("psi-sgd", "sgd")
LEARNING_RATE = 0.3
STEPS = 400
TARGET_LOSS = 0.1
RESCALE_RANGE = (1.0, 10.0)
INITIALIZATIONS = ("same", "rescaled")
# the rescaled run is drawn thinner, dashed and lighter on top of the same-init run, so that
# two curves that coincide stay visible as two
CURVE_COLORS = {
    ("psi-sgd", "same"): "tab:blue",
    ("psi-sgd", "rescaled"): "lightskyblue",
    ("sgd", "same"): "tab:red",
    ("sgd", "rescaled"): "orange",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("psi-geoopt-out/demo"),
        metavar="DIR",
        help="output directory (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seed of the initialization, the rescaling factors and the minibatches "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=STEPS,
        help="training steps per run (default: %(default)s; fewer for a quick check)",
    )
    add_common_arguments(parser)


def channel_factors(seed: int, batch_size: int) -> dict[str, torch.Tensor]:
    r"""One factor :math:`c \sim \operatorname{LogUniform}[1, 10]` per PSI group of the model."""
    dataset = load_dataset(DATASET)
    scale_invariant = scale_invariant_weights(MODEL, dataset, batch_size)
    parameters = dict(build_model(MODEL, seed, dataset.num_classes).named_parameters())
    generator = torch.Generator().manual_seed(seed)
    low, high = (math.log(bound) for bound in RESCALE_RANGE)
    factors = {}
    for name, dim in scale_invariant.items():
        groups = 1 if dim is None else parameters[name].shape[dim]
        uniform = torch.rand(groups, generator=generator, dtype=torch.float64)
        factors[name] = torch.exp(low + (high - low) * uniform)
    return factors


def _max_curve_difference(first: TrainResult, second: TrainResult) -> float | None:
    """Largest difference between the two loss curves; ``None`` if either is empty (the run
    diverged at its first step)."""
    return max(
        (abs(a - b) for a, b in zip(first.loss_curve, second.loss_curve, strict=False)),
        default=None,
    )


def _summary(results: dict[tuple[str, str], TrainResult]) -> list[str]:
    """Plain-language reading of the numbers (computed, not canned)."""
    lines = []
    differences = {}
    for optimizer in OPTIMIZERS:
        same, rescaled = results[optimizer, "same"], results[optimizer, "rescaled"]
        differences[optimizer] = _max_curve_difference(same, rescaled)
        curves = (
            "no loss was logged (the loss was not finite at the first step)"
            if differences[optimizer] is None
            else f"the loss curves differ by at most {differences[optimizer]:.3g}"
        )
        lines.append(
            f"- {optimizer}: from the two equivalent initializations {curves}; final train loss "
            f"{_number(same.final_train_loss)} vs {_number(rescaled.final_train_loss)}; "
            f"steps to loss <= {TARGET_LOSS:g}: "
            f"{_number(same.steps_to_target)} vs {_number(rescaled.steps_to_target)}; test "
            f"accuracy {100 * same.test_accuracy:.1f}% vs {100 * rescaled.test_accuracy:.1f}%."
        )
    psi, sgd = differences["psi-sgd"], differences["sgd"]
    if psi is None or sgd is None:
        lines.append("Not measured: a run diverged before the first loss was logged.")
    elif psi < sgd / 10:
        closer = (
            f"coincide up to rounding and BN's epsilon ({psi:.2g}), about {sgd / psi:.0f} times "
            "closer than"
            if psi > 0
            else "coincide exactly, unlike"
        )
        lines.append(
            f"PSI SGD does not see the rescaling: its two runs {closer} Euclidean SGD's "
            f"({sgd:.2g}), whose effective learning rate per channel was divided by c^2 in "
            "[1, 100]."
        )
    else:
        lines.append(
            f"Not reproduced with these settings: PSI SGD's curves differ by {psi:.2g}, not "
            f"clearly less than Euclidean SGD's ({sgd:.2g})."
        )
    lines.append(
        "One learning rate does not rank the two optimizers: Euclidean SGD's effective step is "
        "lr / |w|^2 per channel, PSI SGD's is an angle; `psi-geoopt compare` compares them over "
        "learning-rate and initial-scale grids."
    )
    return lines


def _number(value: float | int | None) -> str:
    if value is None:
        return "never"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run(args: argparse.Namespace) -> int:
    error = check_batch_size(args.batch_size, [DATASET]) or check_output_directory(args.out)
    if error:
        print(f"psi-geoopt demo: error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    dataset = load_dataset(DATASET)
    factors = channel_factors(args.seed, args.batch_size)
    results: dict[tuple[str, str], TrainResult] = {}
    records = []
    with tqdm(total=len(OPTIMIZERS) * len(INITIALIZATIONS) * args.steps, unit="step") as bar:
        for optimizer in OPTIMIZERS:
            for initialization in INITIALIZATIONS:
                bar.set_description(f"{optimizer}, {initialization} init")
                result = train_from_scratch(
                    MODEL,
                    optimizer,
                    dataset,
                    lr=LEARNING_RATE,
                    seed=args.seed,
                    channel_factors=None if initialization == "same" else factors,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    target_loss=TARGET_LOSS,
                    on_step=lambda step, loss: bar.update(),
                )
                results[optimizer, initialization] = result
                records.append(
                    {
                        "model": MODEL,
                        "dataset": DATASET,
                        "optimizer": optimizer,
                        "lr": LEARNING_RATE,
                        "seed": args.seed,
                        "steps": args.steps,
                        "batch_size": args.batch_size,
                        "target_loss": TARGET_LOSS,
                        "initialization": initialization,
                        "init_scale": 1.0,
                        "channel_factors": {}
                        if initialization == "same"
                        else {name: c.tolist() for name, c in factors.items()},
                        **result.as_dict(),
                    }
                )
    write_json_atomically(args.out / "results.json", {"runs": records})
    figure = plot_loss_curves(
        [
            Curve(
                f"{optimizer}, {initialization} init",
                result.loss_curve,
                result.log_every,
                color=CURVE_COLORS[optimizer, initialization],
                linestyle="-" if initialization == "same" else "--",
                linewidth=3.0 if initialization == "same" else 1.5,
                steps=args.steps,
            )
            for (optimizer, initialization), result in results.items()
        ],
        args.out / "loss_curves.png",
        title=f"{MODEL} on {DATASET}, lr {LEARNING_RATE:g}, seed {args.seed}",
        target_loss=TARGET_LOSS,
    )
    print(
        format_table(
            [
                "optimizer",
                "init",
                "final train loss",
                "test acc (eval)",
                "test acc (batch stats)",
                f"steps to loss<={TARGET_LOSS:g}",
                "wall s",
            ],
            [
                [
                    optimizer,
                    initialization,
                    _number(r.final_train_loss),
                    f"{100 * r.test_accuracy:.1f}%",
                    f"{100 * r.train_mode_accuracy:.1f}%",
                    _number(r.steps_to_target),
                    f"{r.wall_s:.1f}",
                ]
                for (optimizer, initialization), r in results.items()
            ],
        )
    )
    print()
    print("\n".join(_summary(results)))
    print(f"\nwrote {args.out / 'results.json'} and {figure}")
    return 0
