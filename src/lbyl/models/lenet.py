"""LeNet-300-100: the fully connected MNIST/FashionMNIST baseline."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LeNet300100", "lenet_300_100"]


class LeNet300100(nn.Module):
    """784-300-100-classes MLP with ReLU and no normalisation layers.

    Module names ``ip1``/``ip2``/``ip3`` follow the Caffe-style naming used by
    the Neuron Merging and LBYL releases, so their checkpoints load strictly.
    """

    def __init__(self, num_classes: int = 10, hidden: tuple[int, int] = (300, 100), in_features: int = 784):
        super().__init__()
        self.in_features = in_features
        self.ip1 = nn.Linear(in_features, hidden[0])
        self.relu1 = nn.ReLU()
        self.ip2 = nn.Linear(hidden[0], hidden[1])
        self.relu2 = nn.ReLU()
        self.ip3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Accept (N, 1, 28, 28), (N, 28, 28) or already-flat (N, 784) input.
        x = torch.flatten(x, 1)
        x = self.relu1(self.ip1(x))
        x = self.relu2(self.ip2(x))
        return self.ip3(x)


def lenet_300_100(num_classes: int = 10, **kwargs) -> LeNet300100:
    """LeNet-300-100 for 28x28 grayscale input."""
    return LeNet300100(num_classes=num_classes, **kwargs)
