"""ImageNet-sized models written with ``torch.nn`` only, for timing the model conversion.

:func:`resnet50` follows torchvision's ResNet-50 (He et al., 2016; bottleneck blocks of
widths 64-512 with expansion 4, the stride on the 3x3 convolution, 25,557,032 parameters for
1000 classes) and :func:`efficientnet_b0` torchvision's EfficientNet-B0 (Tan & Le, 2019;
inverted-residual MBConv blocks with depthwise convolutions, squeeze-and-excitation and SiLU,
5,288,548 parameters for 1000 classes, without stochastic depth). Their parameter names and
shapes are those of torchvision, so that what the conversion finds can be compared with a
torchvision model where torchvision is installed.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "Bottleneck",
    "EfficientNet",
    "MBConv",
    "ResNet",
    "SqueezeExcitation",
    "efficientnet_b0",
    "resnet50",
]


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride), 1x1 expand; each convolution followed by BatchNorm."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stem (7x7 convolution, BatchNorm, ReLU, max pooling), four stages, pooling, classifier."""

    def __init__(self, blocks: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = 64
        stages = []
        for index, (width, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            stride = 1 if index == 0 else 2
            layers = []
            for block in range(count):
                layers.append(Bottleneck(channels, width, stride if block == 0 else 1))
                channels = width * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50: bottleneck stages of 3, 4, 6 and 3 blocks."""
    return ResNet((3, 4, 6, 3), num_classes)


def _conv_bn_silu(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    padding = (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.SiLU(inplace=True),
    )


class SqueezeExcitation(nn.Module):
    """Channel gates ``x * sigmoid(W2 silu(W1 mean(x)))`` (Hu et al., 2018)."""

    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.activation = nn.SiLU(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return x * self.scale_activation(scale)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise convolution, squeeze-and-excitation,
    1x1 projection (BatchNorm, no activation), identity shortcut where the shape allows."""

    def __init__(
        self, in_channels: int, out_channels: int, expand_ratio: int, kernel_size: int, stride: int
    ):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_silu(in_channels, hidden, 1))
        layers.append(_conv_bn_silu(hidden, hidden, kernel_size, stride, groups=hidden))
        layers.append(SqueezeExcitation(hidden, max(1, in_channels // 4)))
        layers.append(
            nn.Sequential(
                nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
            )
        )
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_residual else out


#: EfficientNet-B0 stages: expansion ratio, kernel size, stride, input and output channels, blocks
_B0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)


class EfficientNet(nn.Module):
    """Stem, MBConv stages, 1x1 head convolution to 1280 channels, pooling, dropout, classifier."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_silu(3, 32, 3, stride=2)]
        for expand_ratio, kernel_size, stride, in_channels, out_channels, count in _B0_STAGES:
            layers.append(
                nn.Sequential(
                    *(
                        MBConv(
                            in_channels if block == 0 else out_channels,
                            out_channels,
                            expand_ratio,
                            kernel_size,
                            stride if block == 0 else 1,
                        )
                        for block in range(count)
                    )
                )
            )
        layers.append(_conv_bn_silu(320, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout, inplace=True), nn.Linear(1280, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def efficientnet_b0(num_classes: int = 1000) -> EfficientNet:
    """EfficientNet-B0 (width and depth multipliers 1.0)."""
    return EfficientNet(num_classes)
