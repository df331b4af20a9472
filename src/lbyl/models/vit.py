"""A small Vision Transformer for FashionMNIST, built from torchvision's ``VisionTransformer``.

torchvision is an optional dependency of lbyl: only this model needs it.
"""

from __future__ import annotations

import math

from torch import nn

__all__ = ["VIT_FASHION_CONFIG", "vit_fashion"]

#: the architecture of ``vit-fashion``: 28x28 grey images cut into 7x7 patches (16 tokens + class token)
VIT_FASHION_CONFIG = dict(image_size=28, patch_size=7, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=256)


def _vision_transformer_class():
    try:
        from torchvision.models.vision_transformer import VisionTransformer
    except ImportError as error:
        raise ImportError(
            "the ViT models are torchvision's VisionTransformer, and torchvision is not installed here: "
            "pip install torchvision (the version made for your torch)"
        ) from error
    return VisionTransformer


def vit_fashion(num_classes: int = 10, in_channels: int = 1, **overrides) -> nn.Module:
    """torchvision's ``VisionTransformer`` sized for 28x28 FashionMNIST images.

    torchvision's patch embedding reads three channels; it is replaced by one with
    ``in_channels`` inputs, initialised as torchvision initialises its own.
    ``overrides`` change entries of :data:`VIT_FASHION_CONFIG` (e.g. ``num_layers=2``).
    """
    unknown = set(overrides) - set(VIT_FASHION_CONFIG)
    if unknown:
        raise TypeError(f"vit_fashion() got unknown arguments {sorted(unknown)}; it takes {sorted(VIT_FASHION_CONFIG)}")
    config = {**VIT_FASHION_CONFIG, **overrides}
    model = _vision_transformer_class()(num_classes=num_classes, **config)
    patch, hidden = config["patch_size"], config["hidden_dim"]
    conv = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)
    fan_in = in_channels * patch * patch
    nn.init.trunc_normal_(conv.weight, std=math.sqrt(1 / fan_in))
    nn.init.zeros_(conv.bias)
    model.conv_proj = conv
    return model
