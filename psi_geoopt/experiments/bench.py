"""Benchmark the PSI optimizer step against torch SGD and geoopt on ResNet shapes and a ConvNet.

Two measurements, each interleaved in one process (every round times every optimizer in
turn, so that load from other processes hits all of them alike) and summarized by the median
over rounds:

- the optimizer step alone on the parameter shapes of ResNet-18 and ResNet-50 (convolution
  weights on ``PSIManifold(dim=0)``, BatchNorm and classifier parameters Euclidean; fixed
  random gradients): ``torch.optim.SGD(foreach=True)``, geoopt's ``RiemannianSGD`` (its
  per-parameter loop), ``psi_geoopt.optim.RiemannianSGD`` with ``foreach=False`` (the
  reference loop), the fast path run eagerly (``compile=False``), as it runs by default
  (``compile=None``: on CPUs the Numba loop of :mod:`psi_geoopt.optim.kernels.numba` where Numba is
  installed, else :func:`torch.compile` for groups of at least ``AUTO_COMPILE_NUMEL`` PSI
  elements, such as these; on CUDA the Triton kernel of :mod:`psi_geoopt.optim.kernels.triton`) and
  compiled (``compile=True``: :func:`torch.compile` on CPUs, the Triton kernel on CUDA);
- the Adam step on the same shapes: ``torch.optim.Adam(foreach=True)``, geoopt's
  ``RiemannianAdam`` and ``psi_geoopt.optim.RiemannianAdam`` (its fast path);
- the whole training step (forward, backward, step) of the demo ConvNet (``convnet-bn``) on
  a batch of 8x8 digit-sized images, with each SGD variant;
- :func:`~psi_geoopt.find_scale_invariant` on ResNet-50 and EfficientNet-B0 (a batch of 4
  images of 32x32), as a ratio to one float32 forward and backward pass of the same model on
  the same batch (a quarter as many rounds as the optimizer steps, at least one).

Momentum 0.9 for SGD, learning rate 1e-3 for Adam. Ratios are to the first optimizer of each
table (``torch.optim.SGD``, ``torch.optim.Adam``).

``--quick`` runs ResNet-18's shapes only, 5 rounds (20 of the training step), and leaves out
the slowest rows: the reference loop, geoopt's ``RiemannianAdam``, the compiled path and the
conversion of ResNet-50. It keeps the default path, the row of the README's headline ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import geoopt
import torch
from torch import nn

from ..commandline import machine_description
from ..convert import find_scale_invariant, to_psi
from ..manifold import PSIManifold
from ..optim import RiemannianAdam, RiemannianSGD
from .large_models import efficientnet_b0, resnet50
from .models import build_model

MOMENTUM = 0.9
LEARNING_RATE = 0.01
TRAINING_ROUNDS = 20
"""Rounds of the training step per round of the optimizer steps: a training step of the
ConvNet is a few milliseconds, so many more rounds fit in the same time and narrow its
median."""
QUICK_TRAINING_ROUNDS = 4
"""The same with ``--quick``."""
Shapes = list[tuple[int, ...]]


def resnet_shapes(blocks: tuple[int, ...], bottleneck: bool) -> tuple[Shapes, Shapes]:
    """Parameter shapes of a torchvision-style ResNet (1000 classes): convolutions, the rest.

    ``resnet_shapes((2, 2, 2, 2), False)`` is ResNet-18 (11,689,512 parameters),
    ``resnet_shapes((3, 4, 6, 3), True)`` ResNet-50 (25,557,032).
    """
    convolutions: Shapes = [(64, 3, 7, 7)]
    others: Shapes = [(64,), (64,)]
    expansion = 4 if bottleneck else 1
    channels = 64
    for width, count in zip((64, 128, 256, 512), blocks, strict=True):
        out = width * expansion
        for index in range(count):
            if bottleneck:
                convolutions += [(width, channels, 1, 1), (width, width, 3, 3), (out, width, 1, 1)]
                others += [(width,)] * 4 + [(out,)] * 2
            else:
                convolutions += [(width, channels, 3, 3), (width, width, 3, 3)]
                others += [(width,)] * 4
            if index == 0 and channels != out:
                convolutions.append((out, channels, 1, 1))
                others += [(out,)] * 2
            channels = out
    others += [(1000, channels), (1000,)]
    return convolutions, others


MODELS = {
    "resnet18": resnet_shapes((2, 2, 2, 2), bottleneck=False),
    "resnet50": resnet_shapes((3, 4, 6, 3), bottleneck=True),
}


@dataclass(frozen=True)
class Contender:
    """An optimizer under test: its label and how to build it over PSI and plain parameters."""

    label: str
    build: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    psi: bool


def contenders(
    compile: bool, device: str = "cpu", default: bool = True, reference: bool = True
) -> list[Contender]:
    """The SGD variants; ``compile``: with ``compile=True``, ``default``: with the default
    ``compile=None`` (on large groups on CPU without Numba also :func:`torch.compile`),
    ``reference``: with the reference loop (``foreach=False``)."""
    hyper = dict(lr=LEARNING_RATE, momentum=MOMENTUM)
    entries = [
        Contender("torch SGD foreach", lambda p: torch.optim.SGD(p, foreach=True, **hyper), False),
        Contender("geoopt RiemannianSGD", lambda p: geoopt.optim.RiemannianSGD(p, **hyper), True),
    ]
    if reference:
        loop = Contender(
            "PSI reference loop", lambda p: RiemannianSGD(p, foreach=False, **hyper), True
        )
        entries.append(loop)
    entries.append(
        Contender("PSI fast path eager", lambda p: RiemannianSGD(p, compile=False, **hyper), True)
    )
    if default:
        entries.append(
            Contender("PSI fast path default", lambda p: RiemannianSGD(p, **hyper), True)
        )
    if compile:
        label = "PSI fast path kernel" if device.startswith("cuda") else "PSI fast path compiled"
        entries.append(Contender(label, lambda p: RiemannianSGD(p, compile=True, **hyper), True))
    return entries


def _parameters(shapes: tuple[Shapes, Shapes], psi: bool, device: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    convolutions, others = shapes
    params: list[torch.Tensor] = []
    for shape in convolutions:
        weight = torch.randn(shape, generator=generator).to(device)
        if psi:
            params.append(geoopt.ManifoldParameter(weight, manifold=PSIManifold(dim=0)))
        else:
            params.append(nn.Parameter(weight))
    params += [nn.Parameter(torch.randn(s, generator=generator).to(device)) for s in others]
    for p in params:
        p.grad = 1e-2 * torch.randn(p.shape, generator=generator).to(device)
    return params


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(action: Callable[[], object], device: str) -> float:
    _synchronize(device)
    start = time.perf_counter()
    action()
    _synchronize(device)
    return time.perf_counter() - start


def interleaved(
    actions: dict[str, Callable[[], object]], rounds: int, device: str
) -> dict[str, list[float]]:
    """Seconds per call of every action, ``rounds`` times each, in turn."""
    samples: dict[str, list[float]] = {label: [] for label in actions}
    for _ in range(rounds):
        for label, action in actions.items():
            samples[label].append(_timed(action, device))
    return samples


def _summary(samples: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    reference = statistics.median(samples[baseline])
    summary = {}
    for label, times in samples.items():
        median = statistics.median(times)
        quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [median] * 3
        summary[label] = {
            "median_ms": 1e3 * median,
            "iqr_ms": 1e3 * (quartiles[2] - quartiles[0]),
            "ratio": median / reference,
        }
    return summary


def adam_contenders(geoopt_loop: bool = True) -> list[Contender]:
    """The Adam variants; ``geoopt_loop``: with geoopt's ``RiemannianAdam`` (the slowest)."""
    entries = [
        Contender(
            "torch Adam foreach", lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True), False
        ),
        Contender("geoopt RiemannianAdam", lambda p: geoopt.optim.RiemannianAdam(p, lr=1e-3), True),
        Contender("PSI RiemannianAdam fast", lambda p: RiemannianAdam(p, lr=1e-3), True),
    ]
    return entries if geoopt_loop else [entries[0], entries[2]]


def bench_steps(model: str, rounds: int, entries: list[Contender], device: str) -> dict:
    """Optimizer step time on the parameter shapes of ``model``, as ratios to the first of
    ``entries``."""
    shapes = MODELS[model]
    actions = {}
    for contender in entries:
        optimizer = contender.build(_parameters(shapes, contender.psi, device))
        optimizer.step()  # momentum buffers, compilation
        optimizer.step()
        actions[contender.label] = optimizer.step
    summary = _summary(interleaved(actions, rounds, device), entries[0].label)
    numel = sum(math.prod(s) for s in shapes[0] + shapes[1])
    return {"parameters": numel, "psi_tensors": len(shapes[0]), "results": summary}


def _convnet(psi: bool, images: torch.Tensor) -> nn.Module:
    model = build_model("convnet-bn", seed=0).to(images.device)
    if psi:
        to_psi(model, images)
    return model


def bench_training(
    batch_size: int, rounds: int, compile: bool, device: str, reference: bool = True
) -> dict:
    """Forward + backward + step of the demo ConvNet on ``(batch, 1, 8, 8)`` inputs, with the
    SGD variants of :func:`contenders`."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 1, 8, 8, generator=generator).to(device)
    labels = torch.randint(0, 10, (batch_size,), generator=generator).to(device)
    actions = {}
    for contender in contenders(compile, device, reference=reference):
        model = _convnet(contender.psi, images)
        optimizer = contender.build(list(model.parameters()))

        def train_step(model=model, optimizer=optimizer) -> None:
            optimizer.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()

        for _ in range(3):
            train_step()
        actions[contender.label] = train_step
    summary = _summary(interleaved(actions, rounds, device), "torch SGD foreach")
    return {"batch_size": batch_size, "results": summary}


CONVERSION_MODELS = {"resnet50": resnet50, "efficientnet_b0": efficientnet_b0}


def bench_conversion(
    model: str, rounds: int, device: str, batch_size: int = 4, image_size: int = 32
) -> dict:
    """:func:`find_scale_invariant` on ``model`` against one float32 forward + backward pass
    (of ``sum(logits)``, training mode) on the same batch of random images."""
    torch.manual_seed(0)
    network = CONVERSION_MODELS[model]().to(device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device)

    def forward_backward() -> None:
        network.zero_grad(set_to_none=True)
        network(images).sum().backward()

    found: dict[str, int | None] = {}

    def find() -> None:
        found.update(find_scale_invariant(network, images))

    forward_backward()
    actions = {"forward+backward": forward_backward, "find_scale_invariant": find}
    summary = _summary(interleaved(actions, rounds, device), "forward+backward")
    return {
        "batch_size": batch_size,
        "image_size": image_size,
        "weights": sum(1 for p in network.parameters() if p.dim() > 1),
        "found": len(found),
        "results": summary,
    }


def _print_table(
    title: str, summary: dict[str, dict[str, float]], column: str = "optimizer"
) -> None:
    baseline = next(iter(summary))
    print(f"\n{title}, ratios to {baseline}")
    print(f"  {column:<26} {'median ms':>10} {'IQR ms':>8} {'ratio':>7}")
    for label, row in summary.items():
        print(f"  {label:<26} {row['median_ms']:>10.2f} {row['iqr_ms']:>8.2f} {row['ratio']:>7.2f}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer rounds, ResNet-18 only (EfficientNet-B0 for the conversion), without the "
        "reference loop, geoopt's RiemannianAdam and the compiled path",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="device to run on, e.g. cpu or cuda (default: cpu)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed rounds per optimizer (default: 20, quick 5)"
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile variant of the fast path"
    )


def run(args: argparse.Namespace) -> int:
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {device} requested but CUDA is not available")
        return 2
    rounds = args.rounds if args.rounds is not None else (5 if args.quick else 20)
    if rounds < 1:
        print(f"error: --rounds must be at least 1, got {rounds}")
        return 2
    compile = not (args.quick or args.no_compile)
    info = machine_description(device)
    # the default path compiles (torch.compile) only on CPUs without Numba
    default = compile or device != "cpu" or info["numba"] is not None
    reference = not args.quick
    print("machine: " + ", ".join(f"{key}={value}" for key, value in info.items()))
    if device == "cpu" and info["numba"] is None:
        print(
            "note: Numba cannot be imported, so the default fast path runs the PSI step of "
            "small models eagerly and of large ones through torch.compile"
        )
    print(f"momentum {MOMENTUM}, lr {LEARNING_RATE}, {rounds} interleaved rounds, median")
    results: dict[str, object] = {"machine": info, "rounds": rounds, "steps": {}, "adam": {}}
    for model in ("resnet18",) if args.quick else tuple(MODELS):
        sgd = contenders(compile, device, default=default, reference=reference)
        adam = adam_contenders(geoopt_loop=not args.quick)
        for key, entries in (("steps", sgd), ("adam", adam)):
            entry = bench_steps(model, rounds, entries, device)
            results[key][model] = entry
            _print_table(
                f"optimizer step, {model} shapes ({entry['parameters']:,} parameters, "
                f"{entry['psi_tensors']} PSI tensors)",
                entry["results"],
            )
    batch_size = 64
    training_rounds = rounds * (QUICK_TRAINING_ROUNDS if args.quick else TRAINING_ROUNDS)
    training = bench_training(batch_size, training_rounds, compile, device, reference)
    results["training_step"] = training
    _print_table(
        f"training step (forward + backward + step), convnet-bn, batch {batch_size} of 1x8x8, "
        f"{training_rounds} rounds",
        training["results"],
    )
    results["conversion"] = {}
    for model in ("efficientnet_b0",) if args.quick else tuple(CONVERSION_MODELS):
        entry = bench_conversion(model, max(1, rounds // 4), device)
        results["conversion"][model] = entry
        _print_table(
            f"find_scale_invariant, {model} ({entry['found']} of {entry['weights']} weights "
            f"PSI), batch {entry['batch_size']} of 3x{entry['image_size']}x{entry['image_size']}",
            entry["results"],
            column="task",
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"\nwrote {args.json}")
    return 0
