r"""The one training loop of the experiments: seeded minibatch training and its measurements.

:func:`train` draws minibatches without replacement (a fresh permutation each epoch from a
generator seeded with ``seed``, incomplete last batches dropped so every BatchNorm batch has
``batch_size`` samples), takes ``steps`` optimizer steps and measures:

- ``loss_curve``: the mean minibatch loss over each window of ``log_every`` steps; when
  ``steps`` is not a multiple of ``log_every`` the last window is shorter and ends at the last
  step (entry ``i`` ends at step ``min((i + 1) * log_every, steps)``);
- ``steps_to_target``: the first step at which that windowed mean is at most ``target_loss``
  (``None`` if never);
- ``final_train_loss``: the training objective after the last step — the loss on the whole
  training set with BatchNorm in training mode (batch statistics), running statistics left
  untouched;
- ``test_accuracy``: accuracy on the test set in evaluation mode (BN running statistics), the
  number a deployed model would get;
- ``train_mode_accuracy``: accuracy on the test set with BN in training mode (the test set's
  own batch statistics). The gap ``train_mode_accuracy - test_accuracy`` measures how far the
  running statistics are from the statistics of the weights actually reached;
- ``train_accuracy``: accuracy on the training set in evaluation mode;
- ``wall_s``: wall-clock seconds of the whole call;
- ``diverged``: the loss became non-finite, training stopped there.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

import psi_geoopt

from .data import Dataset, load_dataset
from .models import build_model, rescale
from .optimizers import build_optimizer

__all__ = ["TrainResult", "evaluate", "scale_invariant_weights", "train", "train_from_scratch"]


@dataclass(frozen=True)
class TrainResult:
    """The measurements of one training run (see the module docstring)."""

    loss_curve: list[float]
    log_every: int
    steps_to_target: int | None
    final_train_loss: float | None
    test_accuracy: float
    train_mode_accuracy: float
    train_accuracy: float
    wall_s: float
    diverged: bool

    def as_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def _batch_statistics(model: nn.Module) -> Iterator[None]:
    """Training mode (BN uses batch statistics) without changing the running statistics."""
    was_training = model.training
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.train()
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
        model.train(was_training)


@torch.no_grad()
def evaluate(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, batch_statistics: bool
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on the whole of ``inputs`` as one batch.

    With ``batch_statistics`` BatchNorm normalizes with the statistics of ``inputs`` (training
    mode, running statistics untouched); otherwise with its running statistics (eval mode).
    """
    context = _batch_statistics(model) if batch_statistics else _eval_mode(model)
    with context:
        logits = model(inputs)
    loss = F.cross_entropy(logits, targets).item()
    accuracy = (logits.argmax(dim=1) == targets).double().mean().item()
    return loss, accuracy


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _minibatches(num_samples: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    batches_per_epoch = num_samples // batch_size
    while True:
        permutation = torch.randperm(num_samples, generator=generator)
        for index in range(batches_per_epoch):
            yield permutation[index * batch_size : (index + 1) * batch_size]


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset,
    *,
    steps: int,
    seed: int,
    batch_size: int = 64,
    log_every: int = 10,
    target_loss: float = 0.1,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``model`` with ``optimizer`` for ``steps`` minibatch steps and measure it.

    ``on_step(step, loss)`` is called after every step (progress bars).
    """
    if steps < 1 or batch_size < 2 or log_every < 1:
        raise ValueError(
            f"need steps >= 1, batch_size >= 2, log_every >= 1; got steps={steps}, "
            f"batch_size={batch_size}, log_every={log_every}"
        )
    num_samples = len(dataset.train_targets)
    if batch_size > num_samples:
        raise ValueError(f"batch_size={batch_size} exceeds the {num_samples} training samples")
    start = time.perf_counter()
    model.train()
    loss_curve: list[float] = []
    window: list[float] = []
    steps_to_target = None
    diverged = False
    batches = _minibatches(num_samples, batch_size, seed)
    for step in range(1, steps + 1):
        indices = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(dataset.train_inputs[indices]), dataset.train_targets[indices])
        value = loss.item()
        if not math.isfinite(value):
            diverged = True
            break
        loss.backward()
        optimizer.step()
        window.append(value)
        if on_step is not None:
            on_step(step, value)
        if len(window) == log_every or step == steps:
            loss_curve.append(sum(window) / len(window))
            window.clear()
            if steps_to_target is None and loss_curve[-1] <= target_loss:
                steps_to_target = step
    final_train_loss = None
    if not diverged:
        loss_value, _ = evaluate(
            model, dataset.train_inputs, dataset.train_targets, batch_statistics=True
        )
        final_train_loss = loss_value if math.isfinite(loss_value) else None
        diverged = final_train_loss is None
    _, test_accuracy = evaluate(
        model, dataset.test_inputs, dataset.test_targets, batch_statistics=False
    )
    _, train_mode_accuracy = evaluate(
        model, dataset.test_inputs, dataset.test_targets, batch_statistics=True
    )
    _, train_accuracy = evaluate(
        model, dataset.train_inputs, dataset.train_targets, batch_statistics=False
    )
    return TrainResult(
        loss_curve=loss_curve,
        log_every=log_every,
        steps_to_target=steps_to_target,
        final_train_loss=final_train_loss,
        test_accuracy=test_accuracy,
        train_mode_accuracy=train_mode_accuracy,
        train_accuracy=train_accuracy,
        wall_s=time.perf_counter() - start,
        diverged=diverged,
    )


def scale_invariant_weights(
    model_name: str, dataset: Dataset, batch_size: int = 64
) -> dict[str, int | None]:
    """The PSI weights of the architecture ``model_name`` (name → group axis).

    Scale invariance is a property of the architecture, not of the initialization, so
    :func:`psi_geoopt.find_scale_invariant` runs once per architecture, dataset and batch size
    (on the seed-0 model and the first training batch) and the answer is reused.
    """
    return dict(_scale_invariant_weights(model_name, dataset.name, batch_size))


@functools.cache
def _scale_invariant_weights(
    model_name: str, dataset_name: str, batch_size: int
) -> tuple[tuple[str, int | None], ...]:
    dataset = load_dataset(dataset_name)
    model = build_model(model_name, 0, dataset.num_classes)
    found = psi_geoopt.find_scale_invariant(model, dataset.train_inputs[:batch_size])
    return tuple(found.items())


def train_from_scratch(
    model_name: str,
    optimizer_name: str,
    dataset: Dataset,
    *,
    lr: float,
    seed: int,
    init_scale: float = 1.0,
    channel_factors: dict[str, torch.Tensor] | None = None,
    steps: int,
    batch_size: int = 64,
    log_every: int = 10,
    target_loss: float = 0.1,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Build ``model_name`` from ``seed``, rescale its PSI weights, then :func:`train` it.

    The PSI weights (:func:`scale_invariant_weights`) are multiplied by ``init_scale`` (one
    number for all) and then by ``channel_factors`` if given (per-group factors as in
    :func:`~psi_geoopt.experiments.models.rescale`) before the optimizer ``optimizer_name``
    converts the model, so every optimizer starts from the same base initialization.
    """
    example_inputs = dataset.train_inputs[:batch_size]
    model = build_model(model_name, seed, dataset.num_classes)
    scale_invariant = scale_invariant_weights(model_name, dataset, batch_size)
    rescale(model, scale_invariant, init_scale)
    if channel_factors is not None:
        rescale(model, scale_invariant, channel_factors)
    optimizer = build_optimizer(optimizer_name, model, scale_invariant, example_inputs, lr)
    return train(
        model,
        optimizer,
        dataset,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        log_every=log_every,
        target_loss=target_loss,
        on_step=on_step,
    )
