r"""Small batch-normalized networks for ``(1, 8, 8)`` images and 10 classes, sized for a CPU.

- ``mlp-bn``: 64 inputs → [Linear → BN → ReLU] × 2, 128 wide → Linear (26 k parameters);
- ``convnet-bn``: [Conv3x3 → BN → ReLU] with 16 and 32 channels, max-pool, one more with 32,
  global average pool → Linear (14 k);
- ``resnet``: stem Conv → BN → ReLU with 16 channels, a basic residual block at 16 and one at
  32 channels (stride 2), pool → Linear (20 k);
- ``preact-resnet``: the same with pre-activation blocks (BN → ReLU → Conv) (20 k).

Every Linear/Conv that feeds a BatchNorm has no bias (BN removes it). Which weights are
positively scale invariant is decided by :func:`psi_geoopt.find_scale_invariant`, not here:
in ``resnet`` every convolution is, in ``preact-resnet`` the convolutions whose output is
added to a shortcut are not.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["MODELS", "build_model", "rescale"]


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


def mlp_bn(num_classes: int = 10, width: int = 128) -> nn.Sequential:
    """Two hidden Linear → BN → ReLU layers on the flattened image, then a Linear classifier."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, width, bias=False),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, width, bias=False),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, num_classes),
    )


def convnet_bn(num_classes: int = 10) -> nn.Sequential:
    """Three Conv3x3 → BN → ReLU layers (16, 32, 32 channels), global pooling, Linear."""
    return nn.Sequential(
        *_conv_bn_relu(1, 16),
        *_conv_bn_relu(16, 32),
        nn.MaxPool2d(2),
        *_conv_bn_relu(32, 32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


class BasicBlock(nn.Module):
    r"""Post-activation residual block: :math:`\operatorname{relu}(\operatorname{bn}(
    \operatorname{conv}(\operatorname{relu}(\operatorname{bn}(\operatorname{conv}(x))))) +
    s(x))`, with :math:`s` a strided 1x1 Conv → BN when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    r"""Pre-activation residual block: :math:`x' = \operatorname{relu}(\operatorname{bn}(x))`,
    output :math:`\operatorname{conv}(\operatorname{relu}(\operatorname{bn}(\operatorname{conv}
    (x')))) + s(x')`, with :math:`s` a strided 1x1 Conv when the shape changes (identity
    otherwise)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = torch.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv1(activated)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


def resnet(num_classes: int = 10) -> nn.Sequential:
    """Stem Conv → BN → ReLU (16), a basic block at 16 and one at 32 channels (stride 2)."""
    return nn.Sequential(
        *_conv_bn_relu(1, 16),
        BasicBlock(16, 16),
        BasicBlock(16, 32, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


def preact_resnet(num_classes: int = 10) -> nn.Sequential:
    """Stem Conv (16), a pre-activation block at 16 and one at 32 channels, final BN → ReLU."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        PreActBlock(16, 16),
        PreActBlock(16, 32, stride=2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp-bn": mlp_bn,
    "convnet-bn": convnet_bn,
    "resnet": resnet,
    "preact-resnet": preact_resnet,
}


def build_model(name: str, seed: int, num_classes: int = 10) -> nn.Module:
    """The model called ``name`` (a key of :data:`MODELS`), initialized from ``seed``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](num_classes)


def rescale(
    model: nn.Module,
    scale_invariant: dict[str, int | None],
    factors: float | dict[str, torch.Tensor],
) -> None:
    r"""Multiply the PSI weights of ``model`` in place: :math:`w_k \mapsto c_k w_k`.

    ``scale_invariant`` maps weight names to group axes (from
    :func:`psi_geoopt.find_scale_invariant`). ``factors`` is one positive number for every
    group, or a dictionary giving each weight one positive factor per group (a vector as long
    as the group axis; a single value for ``dim=None``). In training mode the network computes
    the same function afterwards, up to the :math:`\epsilon` of its normalization layers.
    """
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, dim in scale_invariant.items():
            weight = parameters[name]
            factor = torch.as_tensor(
                factors if isinstance(factors, float | int) else factors[name],
                dtype=weight.dtype,
            )
            if not bool((factor > 0).all()):
                raise ValueError(f"scale factors for {name!r} must be positive, got {factor}")
            if dim is not None and factor.ndim == 1:
                shape = [1] * weight.ndim
                shape[dim] = -1
                factor = factor.reshape(shape)
            weight.mul_(factor)
