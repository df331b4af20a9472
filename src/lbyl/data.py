"""Evaluation data: FashionMNIST, CIFAR-10 (JPEG copy or python batches) and
the lossless CIFAR sample images, plus normalisation and top-1 evaluation.

Images are returned as uint8 tensors (N x H x W for grayscale, N x C x H x W
for colour) with int64 labels; :func:`normalize` turns them into model input.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import tarfile
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
    "DATASETS",
    "DatasetInfo",
    "assets_root",
    "find_asset",
    "cache_dir",
    "load_fashion_mnist",
    "load_cifar10",
    "load_lossless_samples",
    "load_dataset",
    "normalize",
    "evaluate",
]

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip

FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DatasetInfo:
    """Shape, classes and the normalisation the registry models expect."""

    image_shape: tuple[int, ...]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


DATASETS: dict[str, DatasetInfo] = {
    # LeNet-300-100 (LBYL release): x / 255, then (x - 0.5) / 0.5.
    "fashion-mnist": DatasetInfo((1, 28, 28), FASHION_MNIST_CLASSES, (0.5,), (0.5,)),
    # akamaster CIFAR ResNets were trained with ImageNet statistics.
    "cifar10": DatasetInfo((3, 32, 32), CIFAR10_CLASSES, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


# ---------------------------------------------------------------------------
# Locations


def assets_root(override: str | os.PathLike | None = None) -> Path:
    """Root of the shared assets: ``override``, else ``$LBYL_ASSETS``, else
    ``../shared/assets`` relative to the current directory (a checkout's root)."""
    if override is not None:
        return Path(override).expanduser().resolve()
    env = os.environ.get("LBYL_ASSETS")
    if env:
        return Path(env).expanduser().resolve()
    return (Path.cwd() / ".." / "shared" / "assets").resolve()


def find_asset(relpath: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Path of ``relpath`` under :func:`assets_root`; FileNotFoundError if absent."""
    base = assets_root(root)
    path = base / relpath
    if not path.exists():
        raise FileNotFoundError(
            f"asset {str(relpath)!r} not found under {base} (set LBYL_ASSETS to the folder holding the shared assets)"
        )
    return path


def cache_dir() -> Path:
    """Cache folder for decoded datasets: ``$LBYL_CACHE`` or ``~/.cache/lbyl``."""
    env = os.environ.get("LBYL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lbyl"


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


# ---------------------------------------------------------------------------
# FashionMNIST (idx format)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read idx file (corrupt or truncated?): {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: idx payload has {len(raw) - header} bytes, expected {expected} for shape {dims}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def load_fashion_mnist(split: str = "test", root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FashionMNIST images (uint8, N x 28 x 28) and labels (int64).

    Looks in ``root``, else ``$LBYL_FASHION_MNIST``, else
    ``/usr/share/datasets/fashion-mnist`` (Debian package dataset-fashion-mnist).
    """
    _check_split(split)
    if root is not None:
        directory = Path(root).expanduser()
    elif os.environ.get("LBYL_FASHION_MNIST"):
        directory = Path(os.environ["LBYL_FASHION_MNIST"]).expanduser()
    else:
        directory = FASHION_MNIST_DEFAULT_DIR
    prefix = "t10k" if split == "test" else "train"
    images_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        raise FileNotFoundError(
            f"FashionMNIST {split} files ({prefix}-images-idx3-ubyte.gz, {prefix}-labels-idx1-ubyte.gz) "
            f"not found in {directory}. Install them with 'apt-get install dataset-fashion-mnist' "
            "or set LBYL_FASHION_MNIST to a folder holding the idx files."
        )
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{directory}: unexpected FashionMNIST shapes {images.shape} / {labels.shape}")
    return torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------------------
# CIFAR-10


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else.

    The CIFAR python batches are pickles; a plain ``pickle.load`` would run
    whatever code a tampered file names, so only the globals needed for
    ndarray reconstruction are allowed.
    """

    def find_class(self, module: str, name: str):
        multiarray = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): multiarray.multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): multiarray.multiarray._reconstruct,
            # Protocol 5 stores array data out of band via _frombuffer.
            ("numpy.core.numeric", "_frombuffer"): multiarray.numeric._frombuffer,
            ("numpy._core.numeric", "_frombuffer"): multiarray.numeric._frombuffer,
            # Protocol-2 pickles written by Python 3 encode bytes this way.
            ("_codecs", "encode"): __import__("codecs").encode,
        }
        try:
            return allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays are allowed in CIFAR batch files"
            ) from None


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{path}: not a valid CIFAR-10 batch file: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a valid CIFAR-10 batch file (top level is {type(obj).__name__})")
    obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in obj or "labels" not in obj:
        raise ValueError(f"{path}: CIFAR-10 batch lacks 'data' or 'labels' (keys: {sorted(obj)})")
    data = np.asarray(obj["data"], dtype=np.uint8)
    labels = np.asarray(obj["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"{path}: unexpected CIFAR-10 batch shapes {data.shape} / {labels.shape}")
    # Each row is the red, green and blue 32x32 planes in turn: already CHW.
    return data.reshape(-1, 3, 32, 32), labels


def _batches_dir(root: Path) -> Path | None:
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "test_batch").is_file() or (candidate / "data_batch_1").is_file():
            return candidate
    return None


def _load_cifar10_batches(directory: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 batch files {missing} not found in {directory}")
    parts = [_load_cifar_batch(directory / n) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


_JPEG_MEMBER = re.compile(r"(?:^|/)(train|test)/([^/]+)/(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


def _class_index(name: str) -> int | None:
    if name.isdigit() and int(name) < len(CIFAR10_CLASSES):
        return int(name)
    try:
        return CIFAR10_CLASSES.index(name.lower())
    except ValueError:
        return None


def _decode_cifar_tarball(tarball: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    entries = []
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for member in tar:
                match = _JPEG_MEMBER.search(member.name)
                if not member.isfile() or match is None or match.group(1).lower() != split:
                    continue
                label = _class_index(match.group(2))
                if label is None:
                    raise ValueError(f"{tarball}: unknown CIFAR-10 class folder {match.group(2)!r}")
                data = tar.extractfile(member).read()
                entries.append((label, int(match.group(3)), data))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{tarball}: cannot read tarball (corrupt or truncated?): {e}") from e
    if not entries:
        raise ValueError(f"{tarball}: no '{split}/<class>/NNNN.jpg' images found")
    # Class order, then the index inside the class (the original order).
    entries.sort(key=lambda e: (e[0], e[1]))
    images = np.empty((len(entries), 32, 32, 3), dtype=np.uint8)
    for i, (_, _, data) in enumerate(entries):
        with Image.open(io.BytesIO(data)) as img:
            images[i] = np.asarray(img.convert("RGB"))
    labels = np.fromiter((e[0] for e in entries), dtype=np.int64, count=len(entries))
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels


def _load_cifar10_jpeg(tarball: Path, split: str, cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    stat = tarball.stat()
    # Keyed by size and mtime so a replaced tarball is decoded again.
    cache_file = cache_dir() / f"{tarball.name.split('.')[0]}-{split}-{stat.st_size}-{stat.st_mtime_ns}.npz"
    if cache and cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                return torch.from_numpy(z["images"]), torch.from_numpy(z["labels"])
        except (OSError, ValueError, KeyError, EOFError) as e:
            warnings.warn(f"ignoring unreadable cache file {cache_file}: {e}", stacklevel=3)
    images, labels = _decode_cifar_tarball(tarball, split)
    if cache:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f"{cache_file.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, images=images, labels=labels)
            os.replace(tmp, cache_file)
        except OSError as e:
            warnings.warn(f"could not write cache file {cache_file}: {e}", stacklevel=3)
    return torch.from_numpy(images), torch.from_numpy(labels)


def load_cifar10(
    split: str = "test",
    root: str | os.PathLike | None = None,
    source: str = "auto",
    cache: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 images (uint8, N x 3 x 32 x 32) and labels (int64).

    ``source`` is ``"jpeg"`` (``<split>_jpg.tar.gz`` with ``<split>/<class>/NNNN.jpg``
    members, ordered by class then NNNN), ``"batches"`` (a ``cifar-10-batches-py``
    folder, original order) or ``"auto"``.  ``root`` may be the tarball, the
    folder holding it, or the batches folder; default ``$LBYL_CIFAR10``, else
    ``<assets>/cifar10-jpeg``.  Without an explicit root, ``auto`` never
    switches to other data silently: it uses the JPEG copy of the assets.
    Decoded JPEGs are cached under :func:`cache_dir`.
    """
    _check_split(split)
    if source not in ("auto", "jpeg", "batches"):
        raise ValueError(f"source must be 'auto', 'jpeg' or 'batches', got {source!r}")
    if root is None and os.environ.get("LBYL_CIFAR10"):
        root = os.environ["LBYL_CIFAR10"]
    base = Path(root).expanduser() if root is not None else assets_root() / "cifar10-jpeg"

    if source in ("auto", "batches"):
        directory = _batches_dir(base) if base.is_dir() else None
        if directory is not None:
            return _load_cifar10_batches(directory, split)
        if source == "batches":
            raise FileNotFoundError(
                f"no CIFAR-10 python batches (test_batch, data_batch_1..5) in {base} or {base / 'cifar-10-batches-py'}"
            )

    tarball = base if base.is_file() else base / f"{split}_jpg.tar.gz"
    if not tarball.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 {split} data not found: looked for {tarball}"
            + ("" if source == "jpeg" else f" and for python batches in {base}")
            + ". Set LBYL_ASSETS to the shared assets folder, or pass root / set LBYL_CIFAR10 "
            "to a cifar-10-batches-py folder or a <split>_jpg.tar.gz file."
        )
    return _load_cifar10_jpeg(tarball, split, cache)


# ---------------------------------------------------------------------------
# Lossless samples (first 20 test images, PNG)

_SAMPLE_PREFIXES = {
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "fashion-mnist": "fashionMNIST",
    "fashionmnist": "fashionMNIST",
    "mnist": "mnist",
}


def load_lossless_samples(
    dataset: str = "cifar10", root: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lossless sample images ``<prefix>_II_L.png`` (II = index, L = label).

    Returns uint8 images N x C x H x W (C = 1 for MNIST-like sets) and int64
    labels in index order.  ``root`` is the folder with the PNGs or its parent;
    default ``<assets>/cifar-lossless-samples/data``.
    """
    from PIL import Image

    prefix = _SAMPLE_PREFIXES.get(dataset.lower())
    if prefix is None:
        raise ValueError(f"unknown sample dataset {dataset!r}; use one of {sorted(set(_SAMPLE_PREFIXES))}")
    directory = Path(root).expanduser() if root is not None else assets_root() / "cifar-lossless-samples"
    if (directory / "data").is_dir():
        directory = directory / "data"
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)_(\d+)\.png$")
    found = []
    if directory.is_dir():
        for p in directory.iterdir():
            m = pattern.match(p.name)
            if m:
                found.append((int(m.group(1)), int(m.group(2)), p))
    if not found:
        raise FileNotFoundError(
            f"no {prefix}_II_L.png sample images in {directory} (set LBYL_ASSETS to the shared assets folder)"
        )
    found.sort()
    grayscale = prefix in ("mnist", "fashionMNIST")
    arrays = []
    for _, _, p in found:
        with Image.open(p) as img:
            arr = np.asarray(img.convert("L" if grayscale else "RGB"))
        arrays.append(arr[None] if grayscale else arr.transpose(2, 0, 1))
    images = torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))
    labels = torch.tensor([label for _, label, _ in found], dtype=torch.int64)
    return images, labels


def load_dataset(
    name: str, split: str = "test", root: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one of :data:`DATASETS` by name."""
    if name == "fashion-mnist":
        return load_fashion_mnist(split, root)
    if name == "cifar10":
        return load_cifar10(split, root)
    raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------
# Normalisation and evaluation


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images -> float32 ``(x / 255 - mean) / std`` per channel.

    Accepts N x H x W (grayscale, gets a channel axis) or N x C x H x W.
    """
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise ValueError(f"expected images N x H x W or N x C x H x W, got shape {tuple(images.shape)}")
    c = images.shape[1]
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    if mean_t.shape[0] not in (1, c) or std_t.shape[0] not in (1, c):
        raise ValueError(f"mean/std have {mean_t.shape[0]}/{std_t.shape[0]} values for {c}-channel images")
    x = images.to(torch.float32) / 255.0
    return (x - mean_t) / std_t


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 500,
    progress: bool = False,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> float:
    """Top-1 accuracy in percent.

    ``images`` are model-ready floats, or uint8 together with ``mean``/``std``
    (normalised batch by batch to save memory).  The model runs in eval mode
    and its training flag is restored afterwards.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("cannot evaluate on an empty set")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is None and not torch.is_floating_point(images):
        raise ValueError("images are not floating point: normalise them first or pass mean= and std=")
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="evaluate", unit="batch", leave=False)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.inference_mode():
            for start in starts:
                x = images[start : start + batch_size]
                if mean is not None:
                    x = normalize(x, mean, std)
                x = x.to(device=device, dtype=dtype)
                y = labels[start : start + batch_size].to(device)
                correct += int((model(x).argmax(dim=1) == y).sum())
    finally:
        model.train(was_training)
    return 100.0 * correct / len(images)
