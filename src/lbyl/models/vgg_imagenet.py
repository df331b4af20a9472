"""VGG-16 with BatchNorm for ImageNet (Simonyan & Zisserman 2015).

Parameter names and shapes match torchvision's ``vgg16_bn`` (``features.N``,
``classifier.0/3/6``), so its checkpoints load strictly without torchvision.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGG16_CFG", "VGG", "vgg16_bn"]

# Configuration "D": numbers are output channels, "M" is a 2x2 max pool.
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    """VGG with BatchNorm, a 7x7 adaptive pool and a 4096-4096 classifier."""

    def __init__(self, cfg: list | None = None, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in VGG16_CFG if cfg is None else cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(in_ch * 7 * 7, 4096),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The flatten keeps the 7x7 map: channel c of the last conv feeds
        # input columns [49 c, 49 c + 49) of classifier.0.
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg16_bn(num_classes: int = 1000) -> VGG:
    """VGG-16-BN for 224x224 ImageNet input (138.4 M parameters)."""
    return VGG(num_classes=num_classes)
