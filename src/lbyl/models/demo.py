"""A small CNN for FashionMNIST, fast enough for CPU demos and tests."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DemoCNN", "demo_cnn"]


class DemoCNN(nn.Module):
    """Three Conv-BN-ReLU-MaxPool blocks (32, 64, 128 channels) and a 2-layer head.

    28x28 input becomes a 128x3x3 map that is flattened without global pooling,
    so each channel of ``conv3`` feeds nine consecutive input columns of
    ``fc1``; this exercises conv-to-linear pruning through a flatten.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, int, int] = (32, 64, 128),
        hidden: int = 256,
    ):
        super().__init__()
        c1, c2, c3 = widths
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)  # 28 -> 14
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)  # 14 -> 7
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.relu3 = nn.ReLU()
        self.pool3 = nn.MaxPool2d(2)  # 7 -> 3
        self.fc1 = nn.Linear(c3 * 3 * 3, hidden)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # (N, 28, 28) grayscale without a channel axis
            x = x.unsqueeze(1)
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.pool3(self.relu3(self.bn3(self.conv3(x))))
        x = self.relu4(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def demo_cnn(num_classes: int = 10) -> DemoCNN:
    """Demo CNN for 1x28x28 input (about 0.39 M parameters, 1.6 MB in float32)."""
    return DemoCNN(num_classes=num_classes)
