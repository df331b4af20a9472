"""Model registry, model specs and checkpoint loading.

A *model spec* is either a registry name (``"resnet56"``) or an import path
``"package.module:factory"`` whose factory returns an ``nn.Module``.
"""

from __future__ import annotations

import importlib
import pickle
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .demo import demo_cnn
from .lenet import lenet_300_100
from .resnet_cifar import resnet20, resnet32, resnet44, resnet56, resnet110
from .resnet_imagenet import resnet18, resnet34, resnet50, resnet101
from .vgg_cifar import vgg16_bn_cifar
from .vgg_imagenet import vgg16_bn
from .vit import vit_fashion

__all__ = [
    "ModelInfo",
    "WeightsError",
    "WeightsFileNotFoundError",
    "MODELS",
    "ALIASES",
    "available_models",
    "resolve_name",
    "build_model",
    "model_info",
    "example_input",
    "load_state_dict",
    "load_weights",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelInfo:
    """What a registered model expects.

    ``mean``/``std`` apply after scaling pixels to [0, 1]; ``weights`` lists
    known checkpoints relative to the shared assets root (first is the default).
    """

    input_shape: tuple[int, ...]
    num_classes: int
    dataset: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    description: str = ""
    weights: tuple[str, ...] = ()


_FASHION = dict(input_shape=(1, 28, 28), num_classes=10, dataset="fashion-mnist", mean=(0.5,), std=(0.5,))
# The akamaster CIFAR ResNets were trained with ImageNet statistics.
_CIFAR = dict(input_shape=(3, 32, 32), num_classes=10, dataset="cifar10", mean=IMAGENET_MEAN, std=IMAGENET_STD)
_IMAGENET = dict(input_shape=(3, 224, 224), num_classes=1000, dataset="imagenet", mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _cifar_resnet_info(depth: int, weights: tuple[str, ...] = ()) -> ModelInfo:
    return ModelInfo(**_CIFAR, description=f"ResNet-{depth} for CIFAR-10, option-A shortcuts", weights=weights)


MODELS: dict[str, tuple[Callable[..., nn.Module], ModelInfo]] = {
    "lenet-300-100": (
        lenet_300_100,
        ModelInfo(
            **_FASHION,
            description="LeNet-300-100 MLP (784-300-100-10)",
            weights=("weights/lenet-300-100/LeNet_300_100.original.pth.tar",),
        ),
    ),
    "resnet20": (
        resnet20,
        _cifar_resnet_info(
            20, ("weights/resnet-cifar10/resnet20-12fca82f.th", "weights/resnet-cifar10-jpeg/resnet20-jpeg.pt")
        ),
    ),
    "resnet32": (resnet32, _cifar_resnet_info(32, ("weights/resnet-cifar10/resnet32-d509ac18.th",))),
    "resnet44": (resnet44, _cifar_resnet_info(44)),
    "resnet56": (
        resnet56,
        _cifar_resnet_info(
            56, ("weights/resnet-cifar10/resnet56-4bfd9763.th", "weights/resnet-cifar10-jpeg/resnet56-jpeg.pt")
        ),
    ),
    "resnet110": (resnet110, _cifar_resnet_info(110)),
    "vgg16-bn-cifar": (
        vgg16_bn_cifar,
        ModelInfo(**_CIFAR, description="VGG-16-BN for CIFAR-10 (network-slimming / Neuron Merging variant)"),
    ),
    "demo-cnn": (demo_cnn, ModelInfo(**_FASHION, description="small 3-conv CNN for FashionMNIST")),
    "vit-fashion": (
        vit_fashion,
        ModelInfo(**_FASHION, description="small ViT for FashionMNIST (torchvision's VisionTransformer; needs torchvision)"),
    ),
    "resnet18": (resnet18, ModelInfo(**_IMAGENET, description="ResNet-18 for ImageNet (torchvision layout)")),
    "resnet34": (resnet34, ModelInfo(**_IMAGENET, description="ResNet-34 for ImageNet (torchvision layout)")),
    "resnet50": (resnet50, ModelInfo(**_IMAGENET, description="ResNet-50 for ImageNet (torchvision layout)")),
    "resnet101": (resnet101, ModelInfo(**_IMAGENET, description="ResNet-101 for ImageNet (torchvision layout)")),
    "vgg16-bn-imagenet": (vgg16_bn, ModelInfo(**_IMAGENET, description="VGG-16-BN for ImageNet (torchvision layout)")),
}

ALIASES: dict[str, str] = {"vgg16-bn": "vgg16-bn-cifar"}


def available_models() -> list[str]:
    """Registry names (aliases included), sorted."""
    return sorted([*MODELS, *ALIASES])


def resolve_name(name: str) -> str:
    """Canonical registry name for ``name`` (case-insensitive, ``_`` == ``-``)."""
    key = name.strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in MODELS:
        raise ValueError(
            f"unknown model {name!r}. Use one of: {', '.join(available_models())}; "
            "or give an import path 'package.module:factory' for your own model."
        )
    return key


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model spec {spec!r} must look like 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"model spec {spec!r}: cannot import module {module_name!r} ({e}). "
            "Check the spelling and that the module is on PYTHONPATH."
        ) from e
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"model spec {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"model spec {spec!r}: {attr!r} is not callable")
    return obj


def build_model(spec: str, **kwargs) -> nn.Module:
    """Build a model from a registry name or a ``package.module:factory`` path.

    Keyword arguments go to the factory (e.g. ``num_classes``).  The spec is
    remembered as ``model.lbyl_spec`` for error messages.
    """
    if ":" in spec:
        model = _import_factory(spec)(**kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model spec {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    else:
        spec = resolve_name(spec)
        model = MODELS[spec][0](**kwargs)
    model.lbyl_spec = spec
    return model


def model_info(spec: str) -> ModelInfo | None:
    """The :class:`ModelInfo` of a registry name; ``None`` for import-path specs."""
    if ":" in spec:
        return None
    return MODELS[resolve_name(spec)][1]


def example_input(spec: str, batch: int = 1) -> torch.Tensor:
    """A random input batch of the right shape for ``spec`` (fixed seed)."""
    info = model_info(spec)
    if info is None:
        raise ValueError(f"no input shape is known for {spec!r}; only registry models have one")
    gen = torch.Generator().manual_seed(0)
    return torch.randn((batch, *info.input_shape), generator=gen)


class WeightsError(ValueError):
    """A checkpoint could not be read or does not fit the model."""


class WeightsFileNotFoundError(WeightsError, FileNotFoundError):
    """The checkpoint file does not exist."""


_WRAPPER_KEYS = ("state_dict", "model", "net")
_PREFIXES = ("module.", "_orig_mod.")  # nn.DataParallel / DDP and torch.compile


def _read_checkpoint(path: Path, trust_pickle: bool):
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(
                f"{path}: not a readable safetensors file (corrupt or truncated?); download or save it again. "
                f"Details: {e}"
            ) from e
    if trust_pickle:
        warnings.warn(
            f"loading {path} with full unpickling (trust_pickle=True): this can run arbitrary code; "
            "only do it for files from a source you trust",
            stacklevel=3,
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler reports refused classes as "Unsupported
        # global"; anything else it rejects is malformed data.
        if not trust_pickle and "unsupported global" in str(e).lower():
            raise WeightsError(
                f"{path}: the checkpoint contains Python objects other than tensors and plain containers, "
                "so it needs full unpickling, which can run arbitrary code. If you trust its source, pass "
                "trust_pickle=True (CLI: --trust-pickle); better, re-save it as a plain state dict. "
                f"(Refused: {_refused_global(e)})"
            ) from e
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?); download or save it again") from e
    except (ImportError, AttributeError) as e:
        raise WeightsError(f"{path}: unpickling needs code that cannot be imported here: {e}") from e
    except Exception as e:  # torch raises many types for damaged files
        raise WeightsError(
            f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?); download or save it again. "
            f"Details: {type(e).__name__}: {e}"
        ) from e


def _refused_global(err: Exception) -> str:
    text = str(err)
    start = text.find("GLOBAL ")
    return text[start + 7 :].split(" ", 1)[0] if start >= 0 else "unknown"


def load_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return a plain ``{name: tensor}`` state dict.

    Unwraps ``state_dict``/``model``/``net`` entries (and whole pickled modules
    when ``trust_pickle``) and strips ``module.`` prefixes.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsFileNotFoundError(
            f"weights file not found: {path}" + (" (it is a directory)" if path.is_dir() else "")
            + f". Check the path (a relative path starts in {Path.cwd()})"
        )
    obj = _read_checkpoint(path, trust_pickle)

    # Unwrap nested training checkpoints such as {"state_dict": ..., "epoch": ...}.
    for _ in range(4):
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], (Mapping, nn.Module))), None)
            if inner is None:
                break
            obj = inner
        else:
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = f"keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightsError(
            f"{path}: no state dict found (expected a mapping of tensor names to tensors, possibly under "
            f"'state_dict', 'model' or 'net'; found {found}). Save the weights with "
            "torch.save(model.state_dict(), path)"
        )

    state = {}
    for key, value in obj.items():
        key = str(key)
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = value
    return state


def _mismatch_report(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    # Old checkpoints predate BatchNorm's num_batches_tracked; torch fills it in.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f", ... ({len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{len(items)} {label}: " + ", ".join(items[:5]) + more)
    return "; ".join(parts)


def load_weights(
    model: nn.Module, path: str | Path, trust_pickle: bool = False, *, spec: str | None = None
) -> nn.Module:
    """Load a checkpoint into ``model`` strictly and return the model.

    Uses ``torch.load(..., weights_only=True)`` unless ``trust_pickle``.  Raises
    :class:`WeightsError` (a ``ValueError``) with an explanation for missing,
    corrupt, pickle-requiring or mismatched checkpoints.
    """
    state = load_state_dict(path, trust_pickle=trust_pickle)
    report = _mismatch_report(model, state)
    if report is not None:
        name = spec or getattr(model, "lbyl_spec", None) or type(model).__name__
        raise WeightsError(
            f"{path} does not match model {name!r}: {report}. "
            "Check that the weights were trained for this model spec (and its num_classes)."
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # anything the pre-check above did not foresee
        raise WeightsError(f"{path} does not match model {type(model).__name__!r}: {e}") from e
    return model
