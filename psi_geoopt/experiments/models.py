r"""The networks of the experiments: small built-in BN networks and the torchvision/timm zoos.

Built in, sized for a CPU (parameter counts for ``(1, 8, 8)`` images and 10 classes; they take
any image shape: the MLP flattens it, the others pool globally):

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

From a model zoo, when its package is installed, randomly initialized (never downloaded):

- ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, num_classes=K)``
  (a classification model of ``torchvision.models.list_models``); when the data has not 3
  channels, the first ``Conv2d`` is replaced by one with the data's channels;
- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, num_classes=K, in_chans=C)``.

``cifar_stem=True`` adapts an ImageNet network to 32x32 inputs the way CIFAR practitioners
do. A ResNet-style network (``conv1`` and ``maxpool``) gets a 3x3 stride-1 ``conv1`` with the
same output channels, or with a deep stem (``conv1`` a ``Sequential`` of convolutions, as in
timm's ResNet-C/D) a stride-1 first convolution, and no max-pool, so that its first stage sees
32x32 rather than 8x8 feature maps. A VGG-style network (``features``, ``avgpool``,
``classifier``) gets a global average pool and one Linear classifier on the last feature
channels, as in the CIFAR VGGs (instead of a 7x7 pool and three Linear layers of 4096 units).
Other architectures are refused. New convolutions are initialized as torchvision initializes
those of its ResNets and VGGs (Kaiming normal, fan-out), the new classifier as its VGG's
(:math:`\mathcal{N}(0, 0.01^2)`, zero bias).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["MODELS", "ZOOS", "build_model", "check_model_name", "rescale"]

ZOOS = ("torchvision", "timm")


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


def mlp_bn(
    num_classes: int = 10, input_shape: Sequence[int] = (1, 8, 8), width: int = 128
) -> nn.Sequential:
    """Two hidden Linear → BN → ReLU layers on the flattened image, then a Linear classifier."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), width, bias=False),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, width, bias=False),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, num_classes),
    )


def convnet_bn(num_classes: int = 10, input_shape: Sequence[int] = (1, 8, 8)) -> nn.Sequential:
    """Three Conv3x3 → BN → ReLU layers (16, 32, 32 channels), global pooling, Linear."""
    return nn.Sequential(
        *_conv_bn_relu(input_shape[0], 16),
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


def resnet(num_classes: int = 10, input_shape: Sequence[int] = (1, 8, 8)) -> nn.Sequential:
    """Stem Conv → BN → ReLU (16), a basic block at 16 and one at 32 channels (stride 2)."""
    return nn.Sequential(
        *_conv_bn_relu(input_shape[0], 16),
        BasicBlock(16, 16),
        BasicBlock(16, 32, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


def preact_resnet(num_classes: int = 10, input_shape: Sequence[int] = (1, 8, 8)) -> nn.Sequential:
    """Stem Conv (16), a pre-activation block at 16 and one at 32 channels, final BN → ReLU."""
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 16, 3, padding=1, bias=False),
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


def check_model_name(name: str) -> str | None:
    """Why ``name`` is no model :func:`build_model` can build here, else None."""
    if name in MODELS:
        return None
    zoo, _, architecture = name.partition(":")
    if zoo not in ZOOS or not architecture:
        choices = ", ".join([*MODELS, *(f"{zoo}:NAME" for zoo in ZOOS)])
        return f"unknown model {name!r}; valid choices: {choices}"
    if importlib.util.find_spec(zoo) is None:
        return f"model {name!r} needs the package {zoo!r}: pip install {zoo}"
    if not _is_architecture(zoo, architecture):
        return f"{zoo} has no classification model {architecture!r}"
    return None


def _is_architecture(zoo: str, architecture: str) -> bool:
    if zoo == "torchvision":
        import torchvision

        return architecture in torchvision.models.list_models(module=torchvision.models)
    import timm

    return timm.is_model(architecture)


def _init_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """Initialized as torchvision and timm initialize the convolutions of their ResNets/VGGs."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _zoo_model(name: str, num_classes: int, channels: int) -> nn.Module:
    zoo, _, architecture = name.partition(":")
    if zoo == "timm":
        import timm

        return timm.create_model(
            architecture, pretrained=False, num_classes=num_classes, in_chans=channels
        )
    import torchvision

    model = torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first.in_channels != channels:
        _replace_module(model, first, _conv_like(first, channels))
    return model


def _conv_like(conv: nn.Conv2d, in_channels: int, **changes) -> nn.Conv2d:
    settings = {
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "bias": conv.bias is not None,
        **changes,
    }
    return _init_conv(nn.Conv2d(in_channels, conv.out_channels, **settings))


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    name = next(name for name, module in model.named_modules() if module is old)
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attribute, new)


def _cifar_stem(model: nn.Module, name: str, num_classes: int) -> None:
    """Adapt ``model`` to 32x32 inputs in place (see the module docstring)."""
    conv1, maxpool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
    if isinstance(conv1, nn.Conv2d) and isinstance(maxpool, nn.Module):
        model.conv1 = _conv_like(conv1, conv1.in_channels, kernel_size=3, stride=1, padding=1)
        model.maxpool = nn.Identity()
        return
    if isinstance(conv1, nn.Sequential) and isinstance(conv1[0], nn.Conv2d) and maxpool is not None:
        conv1[0] = _conv_like(conv1[0], conv1[0].in_channels, stride=1)  # a deep stem
        model.maxpool = nn.Identity()
        return
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential) and all(
        hasattr(model, attribute) for attribute in ("avgpool", "classifier")
    ):
        convs = [m for m in features.modules() if isinstance(m, nn.Conv2d)]
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Linear(convs[-1].out_channels, num_classes)
        nn.init.normal_(model.classifier.weight, 0, 0.01)  # as torchvision's VGG
        nn.init.zeros_(model.classifier.bias)
        return
    raise ValueError(
        f"cifar_stem: cannot adapt {name!r}: expected a ResNet-style model (conv1 and maxpool) "
        "or a VGG-style model (features, avgpool, classifier)"
    )


def build_model(
    name: str,
    seed: int,
    num_classes: int = 10,
    input_shape: Sequence[int] = (1, 8, 8),
    *,
    cifar_stem: bool = False,
) -> nn.Module:
    """The model called ``name``, for images of ``input_shape`` ``(C, H, W)``, initialized
    from ``seed``: a key of :data:`MODELS` or ``torchvision:NAME`` / ``timm:NAME`` (see the
    module docstring, also for ``cifar_stem``, which only applies to those)."""
    error = check_model_name(name)
    if error is not None:
        raise ValueError(error)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name in MODELS:
            return MODELS[name](num_classes, tuple(input_shape))
        model = _zoo_model(name, num_classes, input_shape[0])
        if cifar_stem:
            _cifar_stem(model, name, num_classes)
        return model


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
