"""VGG-16 with BatchNorm for CIFAR.

This is the variant used by the network-slimming line of pruning papers and by
the Neuron Merging and LBYL code: thirteen bias-free 3x3 convolutions with
BatchNorm and ReLU, max pooling after the 2nd, 4th, 7th and 10th convolution
(none after the last), a 2x2 average pool that leaves a 1x1 map, and a
``Linear(512, 512) -> BatchNorm1d -> ReLU -> Linear(512, classes)`` classifier.
Module names (``feature``, ``classifier``) match that code so its checkpoints
load strictly.  Because the last feature map is 1x1, channel ``c`` of the last
convolution feeds exactly input column ``c`` of the first Linear.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["VGG_CIFAR_CFG", "VGGCifar", "vgg16_bn_cifar"]

# Numbers are output channels, "M" is a 2x2 max pool.
VGG_CIFAR_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


class VGGCifar(nn.Module):
    """VGG with BatchNorm for 32x32 input; ``cfg`` lists channels and pools."""

    def __init__(self, num_classes: int = 10, cfg: list | None = None, hidden: int = 512):
        super().__init__()
        cfg = list(VGG_CIFAR_CFG if cfg is None else cfg)
        layers: list[nn.Module] = []
        in_ch = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                in_ch = v
        self.feature = nn.Sequential(*layers)
        self.avgpool = nn.AvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Linear(in_ch, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.feature(x))
        return self.classifier(torch.flatten(x, 1))


def vgg16_bn_cifar(num_classes: int = 10) -> VGGCifar:
    """VGG-16-BN for CIFAR-10/100 (15.0 M parameters for 10 classes)."""
    return VGGCifar(num_classes=num_classes)
