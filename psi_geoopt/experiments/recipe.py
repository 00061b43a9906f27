r"""How a run is trained besides its optimizer: schedule, warm-up, precision, device, loading.

A :class:`Recipe` holds the settings that practitioners add around an optimizer on image
classification (CIFAR-style training); the default recipe is a constant learning rate in
float32 on the CPU, the way the step-based digits runs train.

Learning-rate schedule, as a factor :math:`s_i` of each parameter group's learning rate at
step :math:`i = 0, \ldots, T - 1` (``T`` steps, ``W`` warm-up steps):

- warm-up: :math:`s_i = (i + 1) / W` for :math:`i < W` (linear, from :math:`1/W` to 1);
- ``constant``: :math:`s_i = 1` afterwards;
- ``cosine``: :math:`s_i = \tfrac12 \bigl(1 + \cos(\pi (i - W) / (T - W))\bigr)` afterwards,
  from 1 down towards 0 at the end;
- ``step``: :math:`s_i = 0.1^{k}` afterwards, with :math:`k` the number of milestones
  :math:`\lfloor 0.5\, T \rfloor, \lfloor 0.75\, T \rfloor` reached (the 100/150-of-200-epoch
  schedule of CIFAR ResNets).

Precision: ``fp32``; ``bf16`` (:func:`torch.autocast` to bfloat16, CPU or CUDA); ``fp16``
(autocast to float16 with a :class:`torch.amp.GradScaler`, CUDA only). Parameters, optimizer
states and the loss stay float32 in every case.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["PRECISIONS", "SCHEDULES", "Recipe", "check_device"]

SCHEDULES = ("constant", "cosine", "step")
PRECISIONS = ("fp32", "bf16", "fp16")
STEP_MILESTONES = (0.5, 0.75)
STEP_DECAY = 0.1


def check_device(device: str) -> str | None:
    """Why ``device`` (``cpu``, ``cuda``, ``cuda:N``) cannot be used here, else None."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return f"unknown device {device!r} (expected cpu, cuda or cuda:N)"
    if parsed.type == "cpu":
        return None
    if parsed.type != "cuda":
        return f"device {device!r} is not supported (expected cpu, cuda or cuda:N)"
    if not torch.cuda.is_available():
        return f"device {device!r}: CUDA is not available to this torch {torch.__version__}"
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        return f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible"
    return None


@dataclass(frozen=True)
class Recipe:
    """Schedule, warm-up, precision, data augmentation, device and data-loading workers.

    ``augment`` is one of :data:`~psi_geoopt.experiments.images.AUGMENTATIONS` (image datasets
    only); ``workers`` data-loading processes (0: in the training process); ``progress``
    shows a progress bar per epoch (loss, accuracy, images per second).
    """

    schedule: str = "constant"
    warmup_steps: int = 0
    precision: str = "fp32"
    augment: str = "none"
    device: str = "cpu"
    workers: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}: {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}: {self.precision!r}"
            )
        if self.warmup_steps < 0 or self.workers < 0:
            raise ValueError(
                f"warmup_steps and workers must be >= 0, got {self.warmup_steps}, {self.workers}"
            )
        if self.precision == "fp16" and torch.device(self.device).type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device (use bf16 on the CPU)")

    def lr_factor(self, step: int, total: int) -> float:
        """The factor :math:`s_i` of the learning rate at step ``step`` (from 0) of ``total``."""
        warmup = min(self.warmup_steps, total)
        if step < warmup:
            return (step + 1) / warmup
        if self.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        if self.schedule == "step":
            reached = sum(step >= math.floor(m * total) for m in STEP_MILESTONES)
            return STEP_DECAY**reached
        return 1.0

    def scheduler(
        self, optimizer: torch.optim.Optimizer, total: int
    ) -> torch.optim.lr_scheduler.LambdaLR | None:
        """A scheduler to step after every optimizer step, or None for a constant rate."""
        if self.schedule == "constant" and self.warmup_steps == 0:
            return None
        factor: Callable[[int], float] = lambda step: self.lr_factor(step, total)  # noqa: E731
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context of forward passes: autocast for bf16 and fp16, nothing for fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(torch.device(self.device).type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A loss scaler for fp16 (float16 gradients underflow without it), else None."""
        if self.precision != "fp16":
            return None
        if hasattr(torch.amp, "GradScaler"):
            return torch.amp.GradScaler("cuda")
        return torch.cuda.amp.GradScaler()  # torch < 2.3
