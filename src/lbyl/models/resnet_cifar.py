"""ResNets for CIFAR (He et al. 2016, section 4.2).

The layout and parameter names follow the widely used
akamaster/pytorch_resnet_cifar10 definition, so its published checkpoints
(after stripping the ``module.`` prefix of ``nn.DataParallel``) load strictly:
stem ``conv1``/``bn1``, stages ``layer1``..``layer3`` of 16/32/64 channels with
(depth - 2) / 6 basic blocks each, and a ``linear`` classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PadShortcut",
    "CifarBasicBlock",
    "CifarResNet",
    "resnet_cifar",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]


class PadShortcut(nn.Module):
    """Parameter-free "option A" shortcut.

    Subsamples spatially by ``stride`` and zero-pads the channel axis from
    ``in_planes`` to ``planes`` (half of the new channels before, half after,
    i.e. ``planes // 4`` on each side when the width doubles).
    """

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.in_planes = in_planes
        self.planes = planes
        self.stride = stride
        extra = planes - in_planes
        if extra < 0:
            raise ValueError(f"option A shortcut cannot shrink channels ({in_planes} -> {planes})")
        self.pad_front = extra // 2
        self.pad_back = extra - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad takes (W_left, W_right, H_top, H_bottom, C_front, C_back).
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))

    def extra_repr(self) -> str:
        return f"{self.in_planes} -> {self.planes}, stride={self.stride}"


class CifarBasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()

        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_planes, planes, stride)
        elif shortcut == "B":
            # Indexed Sequential so the keys are shortcut.0.* / shortcut.1.*,
            # as in the reference implementation.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Three-stage ResNet for 32x32 input."""

    def __init__(
        self,
        num_blocks: tuple[int, int, int],
        num_classes: int = 10,
        shortcut: str = "A",
        widths: tuple[int, int, int] = (16, 32, 64),
    ):
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(widths[0], num_blocks[0], 1, shortcut)
        self.layer2 = self._make_layer(widths[1], num_blocks[1], 2, shortcut)
        self.layer3 = self._make_layer(widths[2], num_blocks[2], 2, shortcut)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[2], num_classes)

        # Same initialisation as the reference training code.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int, shortcut: str) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(CifarBasicBlock(self.in_planes, planes, s, shortcut))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.linear(x)


def resnet_cifar(depth: int, num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """CIFAR ResNet of the given depth (6n + 2: 20, 32, 44, 56, 110, ...)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), num_classes=num_classes, shortcut=shortcut)


def resnet20(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """ResNet-20 for CIFAR (0.27 M parameters)."""
    return resnet_cifar(20, num_classes, shortcut)


def resnet32(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """ResNet-32 for CIFAR (0.46 M parameters)."""
    return resnet_cifar(32, num_classes, shortcut)


def resnet44(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """ResNet-44 for CIFAR (0.66 M parameters)."""
    return resnet_cifar(44, num_classes, shortcut)


def resnet56(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """ResNet-56 for CIFAR (0.85 M parameters)."""
    return resnet_cifar(56, num_classes, shortcut)


def resnet110(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """ResNet-110 for CIFAR (1.7 M parameters)."""
    return resnet_cifar(110, num_classes, shortcut)
