r"""The one training loop of the experiments: seeded minibatch training and its measurements.

:func:`train` draws minibatches without replacement (a fresh permutation each epoch from a
generator seeded with ``seed``, incomplete last batches dropped so every BatchNorm batch has
``batch_size`` samples; :mod:`~psi_geoopt.experiments.sampling`), takes ``steps`` optimizer
steps following a :class:`~psi_geoopt.experiments.recipe.Recipe` (learning-rate schedule,
precision, augmentation, device, data-loading workers; by default a constant rate in float32
on the CPU) and measures:

- ``loss_curve``: the mean minibatch loss over each window of ``log_every`` steps; when
  ``steps`` is not a multiple of ``log_every`` the last window is shorter and ends at the last
  step (entry ``i`` ends at step ``min((i + 1) * log_every, steps)``);
- ``steps_to_target``: the first step at which that windowed mean is at most ``target_loss``
  (``None`` if never);
- ``final_train_loss``: the training objective after the last step — the loss on the whole
  training set (not augmented) with BatchNorm in training mode (batch statistics), running
  statistics left untouched;
- ``test_accuracy``: accuracy on the test set in evaluation mode (BN running statistics), the
  number a deployed model would get;
- ``train_mode_accuracy``: accuracy on the test set with BN in training mode (the test set's
  own batch statistics). The gap ``train_mode_accuracy - test_accuracy`` measures how far the
  running statistics are from the statistics of the weights actually reached;
- ``train_accuracy``: accuracy on the training set in evaluation mode;
- ``wall_s``: wall-clock seconds of the whole call;
- ``images_per_s``: training images per second (data loading, forward, backward and
  optimizer step) over the steps after the first one, which pays one-time costs (imports,
  compilation, start of the loading workers); ``None`` for runs of fewer than two steps;
- ``diverged``: the loss became non-finite, training stopped there.

The in-memory datasets (digits, synthetic) are evaluated as one batch; the image datasets in
batches of about ``batch_size`` images (each batch normalized with its own statistics where
batch statistics are used, as in training).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

import psi_geoopt

from .data import Dataset
from .images import ImageDataset
from .models import build_model, rescale
from .optimizers import build_optimizer
from .recipe import Recipe

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
    images_per_s: float | None
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
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    batch_statistics: bool,
    recipe: Recipe | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``batches`` of (inputs, targets).

    With ``batch_statistics`` BatchNorm normalizes each batch with its own statistics
    (training mode, running statistics untouched); otherwise with its running statistics
    (eval mode). ``recipe`` gives the device and the precision (default: float32, CPU).
    """
    recipe = recipe or Recipe()
    device = torch.device(recipe.device)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    context = _batch_statistics(model) if batch_statistics else _eval_mode(model)
    with context:
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            with recipe.autocast():
                logits = model(inputs)
            loss = F.cross_entropy(logits.float(), targets)
            total_loss += loss.double() * len(targets)
            correct += (logits.argmax(dim=1) == targets).sum()
            count += len(targets)
    return total_loss.item() / count, correct.item() / count


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class _EpochProgress:
    """A progress bar per epoch: running loss, accuracy on the (augmented) training batches,
    training images per second and the learning rate."""

    def __init__(self, steps: int, steps_per_epoch: int, batch_size: int):
        self.steps, self.steps_per_epoch, self.batch_size = steps, steps_per_epoch, batch_size
        self.epochs = math.ceil(steps / steps_per_epoch)
        self.bar: tqdm | None = None
        self.start = time.perf_counter()

    def update(self, step: int, loss: float, correct: int, lr: float) -> None:
        if self.bar is None:
            epoch = (step - 1) // self.steps_per_epoch + 1
            length = min(self.steps_per_epoch, self.steps - (step - 1))
            self.bar = tqdm(total=length, desc=f"epoch {epoch}/{self.epochs}", leave=False)
            self.loss, self.correct, self.seen = 0.0, 0, 0
        self.loss += loss
        self.correct += correct
        self.seen += self.batch_size
        self.bar.update()
        rate = self.seen / (time.perf_counter() - self.start)
        self.bar.set_postfix(
            loss=f"{self.loss / self.bar.n:.4f}",
            acc=f"{100 * self.correct / self.seen:.1f}%",
            img_s=f"{rate:.0f}" if rate >= 10 else f"{rate:.2g}",
            lr=f"{lr:.3g}",
            refresh=False,
        )
        if self.bar.n == self.bar.total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.start = time.perf_counter()


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset | ImageDataset,
    *,
    steps: int,
    seed: int,
    batch_size: int = 64,
    log_every: int = 10,
    target_loss: float = 0.1,
    on_step: Callable[[int, float], None] | None = None,
    recipe: Recipe | None = None,
) -> TrainResult:
    """Train ``model`` with ``optimizer`` for ``steps`` minibatch steps and measure it.

    ``model`` must already be on ``recipe.device``; ``on_step(step, loss)`` is called after
    every step (progress bars).
    """
    recipe = recipe or Recipe()
    if steps < 1 or batch_size < 2 or log_every < 1:
        raise ValueError(
            f"need steps >= 1, batch_size >= 2, log_every >= 1; got steps={steps}, "
            f"batch_size={batch_size}, log_every={log_every}"
        )
    num_samples = dataset.num_train
    if batch_size > num_samples:
        raise ValueError(f"batch_size={batch_size} exceeds the {num_samples} training samples")
    start = time.perf_counter()
    model.train()
    loss_curve: list[float] = []
    window: list[float] = []
    steps_to_target = None
    diverged = False
    device = torch.device(recipe.device)
    batches = dataset.train_batches(
        batch_size,
        seed,
        augment=recipe.augment,
        workers=recipe.workers,
        pin_memory=device.type == "cuda",
    )
    scheduler, scaler = recipe.scheduler(optimizer, steps), recipe.grad_scaler()
    progress = _EpochProgress(steps, num_samples // batch_size, batch_size)
    for step in range(1, steps + 1):
        inputs, targets = (t.to(device, non_blocking=True) for t in next(batches))
        optimizer.zero_grad(set_to_none=True)
        with recipe.autocast():
            logits = model(inputs)
        loss = F.cross_entropy(logits.float(), targets)
        if recipe.progress:  # one synchronization for both
            hits = (logits.argmax(dim=1) == targets).sum()
            value, correct = torch.stack([loss.detach(), hits.to(loss.dtype)]).tolist()
        else:
            value, correct = loss.item(), 0
        if not math.isfinite(value):
            diverged = True
            break
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if scheduler is not None:
            scheduler.step()
        if recipe.progress:
            progress.update(step, value, int(correct), optimizer.param_groups[0]["lr"])
        window.append(value)
        if on_step is not None:
            on_step(step, value)
        if step == 1:
            first_step_end = time.perf_counter()
        if len(window) == log_every or step == steps:
            loss_curve.append(sum(window) / len(window))
            window.clear()
            if steps_to_target is None and loss_curve[-1] <= target_loss:
                steps_to_target = step
    progress.close()
    del batches  # stops the data-loading workers
    taken = step - diverged
    images_per_s = (
        batch_size * (taken - 1) / (time.perf_counter() - first_step_end) if taken > 1 else math.nan
    )
    measurements = _final_measurements(model, dataset, batch_size, recipe, diverged)
    return TrainResult(
        loss_curve=loss_curve,
        log_every=log_every,
        steps_to_target=steps_to_target,
        **measurements,
        wall_s=time.perf_counter() - start,
        images_per_s=images_per_s,
        diverged=diverged or measurements["final_train_loss"] is None,
    )


def _final_measurements(
    model: nn.Module,
    dataset: Dataset | ImageDataset,
    batch_size: int,
    recipe: Recipe,
    diverged: bool,
) -> dict:
    """``final_train_loss`` (None if diverged or not finite), the three accuracies."""

    def measure(split: str, batch_statistics: bool) -> tuple[float, float]:
        batches = dataset.evaluation_batches(split, batch_size)
        return evaluate(model, batches, batch_statistics=batch_statistics, recipe=recipe)

    final_train_loss = None
    if not diverged:
        loss_value, _ = measure("train", batch_statistics=True)
        final_train_loss = loss_value if math.isfinite(loss_value) else None
    return {
        "final_train_loss": final_train_loss,
        "test_accuracy": measure("test", batch_statistics=False)[1],
        "train_mode_accuracy": measure("test", batch_statistics=True)[1],
        "train_accuracy": measure("train", batch_statistics=False)[1],
    }


PROBE_IMAGES = 64  # at most this many training images are probed for scale invariance
_SCALE_INVARIANT: dict[tuple, dict[str, int | None]] = {}


def scale_invariant_weights(
    model_name: str,
    dataset: Dataset | ImageDataset,
    batch_size: int = 64,
    *,
    cifar_stem: bool = False,
    device: str = "cpu",
) -> dict[str, int | None]:
    """The PSI weights of the architecture ``model_name`` (name → group axis).

    Scale invariance is a property of the architecture, not of the initialization, so
    :func:`psi_geoopt.find_scale_invariant` runs once per architecture, dataset (name, input
    shape, classes) and batch size, on ``device``, with the seed-0 model and the first
    ``min(batch_size, PROBE_IMAGES)`` training images, and the answer is reused.
    """
    probe_size = min(batch_size, PROBE_IMAGES)
    key = (model_name, cifar_stem, dataset.name, dataset.input_shape, dataset.num_classes)
    key += (probe_size, str(device))
    if key not in _SCALE_INVARIANT:
        model = build_model(
            model_name, 0, dataset.num_classes, dataset.input_shape, cifar_stem=cifar_stem
        ).to(device)
        example_inputs = dataset.example_inputs(probe_size).to(device)
        _SCALE_INVARIANT[key] = psi_geoopt.find_scale_invariant(model, example_inputs)
    return dict(_SCALE_INVARIANT[key])


def _cuda_indices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [torch.cuda.current_device() if device.index is None else device.index]


def train_from_scratch(
    model_name: str,
    optimizer_name: str,
    dataset: Dataset | ImageDataset,
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
    recipe: Recipe | None = None,
    cifar_stem: bool = False,
) -> TrainResult:
    """Build ``model_name`` from ``seed``, rescale its PSI weights, then :func:`train` it.

    The PSI weights (:func:`scale_invariant_weights`) are multiplied by ``init_scale`` (one
    number for all) and then by ``channel_factors`` if given (per-group factors as in
    :func:`~psi_geoopt.experiments.models.rescale`) before the optimizer ``optimizer_name``
    converts the model, so every optimizer starts from the same base initialization. The model
    is built on the CPU (the same initialization everywhere), then moved to ``recipe.device``.
    """
    recipe = recipe or Recipe()
    example_inputs = dataset.example_inputs(batch_size).to(recipe.device)
    model = build_model(
        model_name, seed, dataset.num_classes, dataset.input_shape, cifar_stem=cifar_stem
    )
    scale_invariant = scale_invariant_weights(
        model_name, dataset, batch_size, cifar_stem=cifar_stem, device=recipe.device
    )
    rescale(model, scale_invariant, init_scale)
    if channel_factors is not None:
        rescale(model, scale_invariant, channel_factors)
    model.to(recipe.device)
    optimizer = build_optimizer(optimizer_name, model, scale_invariant, example_inputs, lr)
    device = torch.device(recipe.device)
    with torch.random.fork_rng(devices=_cuda_indices(device)):
        torch.manual_seed(seed)  # what draws from the global generator (dropout) is seeded
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
            recipe=recipe,
        )
