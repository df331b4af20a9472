"""Model definitions and the model registry."""

from .demo import DemoCNN, demo_cnn
from .lenet import LeNet300100, lenet_300_100
from .registry import (
    ALIASES,
    MODELS,
    ModelInfo,
    WeightsError,
    WeightsFileNotFoundError,
    available_models,
    build_model,
    example_input,
    load_state_dict,
    load_weights,
    model_info,
)
from .resnet_cifar import CifarResNet, resnet20, resnet32, resnet44, resnet56, resnet110, resnet_cifar
from .resnet_imagenet import ResNet, resnet18, resnet34, resnet50, resnet101
from .vgg_cifar import VGGCifar, vgg16_bn_cifar
from .vgg_imagenet import VGG, vgg16_bn
from .vit import vit_fashion

__all__ = [
    "ALIASES",
    "MODELS",
    "CifarResNet",
    "DemoCNN",
    "LeNet300100",
    "ModelInfo",
    "ResNet",
    "VGG",
    "VGGCifar",
    "WeightsError",
    "WeightsFileNotFoundError",
    "available_models",
    "build_model",
    "demo_cnn",
    "example_input",
    "lenet_300_100",
    "load_state_dict",
    "load_weights",
    "model_info",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet44",
    "resnet50",
    "resnet56",
    "resnet101",
    "resnet110",
    "resnet_cifar",
    "vgg16_bn",
    "vgg16_bn_cifar",
    "vit_fashion",
]
