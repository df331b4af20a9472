"""Evaluation data loaders, normalisation and evaluation."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lbyl import data
from lbyl.data import (
    CIFAR10_CLASSES,
    DATASETS,
    assets_root,
    evaluate,
    find_asset,
    load_cifar10,
    load_fashion_mnist,
    load_lossless_samples,
    normalize,
    read_idx,
)
from lbyl.models import build_model, load_weights, model_info


def asset(relpath: str) -> Path:
    """Path of a shared asset; skip when absent, but fail on CI."""
    try:
        return find_asset(relpath)
    except FileNotFoundError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"required asset missing on CI: {e}")
        pytest.skip(f"shared asset missing: {e}")


def fashion_mnist(split: str = "test"):
    try:
        return load_fashion_mnist(split)
    except FileNotFoundError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"FashionMNIST missing on CI: {e}")
        pytest.skip(str(e))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # Keep decoded-data caches out of the user's home directory.
    monkeypatch.setenv("LBYL_CACHE", str(tmp_path / "cache"))


# --- locations ------------------------------------------------------------------


def test_assets_root_resolution(tmp_path, monkeypatch):
    assert assets_root(tmp_path) == tmp_path.resolve()
    monkeypatch.setenv("LBYL_ASSETS", str(tmp_path / "x"))
    assert assets_root() == (tmp_path / "x").resolve()
    monkeypatch.delenv("LBYL_ASSETS")
    monkeypatch.chdir(tmp_path)
    # the library holds no path into a checkout: the default is relative to the current directory
    assert assets_root() == (tmp_path / ".." / "shared" / "assets").resolve()


def test_find_asset_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="LBYL_ASSETS"):
        find_asset("nothing/here.bin", root=tmp_path)


# --- FashionMNIST -------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def test_idx_roundtrip(tmp_path):
    images = np.arange(5 * 28 * 28, dtype=np.int64).reshape(5, 28, 28) % 256
    labels = np.array([3, 1, 4, 1, 5])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, compress=False)  # plain files work too
    x, y = load_fashion_mnist("test", root=tmp_path)
    assert x.dtype == torch.uint8 and x.shape == (5, 28, 28)
    assert torch.equal(x, torch.from_numpy(images.astype(np.uint8)))
    assert y.dtype == torch.int64 and y.tolist() == [3, 1, 4, 1, 5]


def test_idx_errors(tmp_path):
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(b"\x01\x02\x03\x04"))
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(bad)
    short = tmp_path / "short"
    _write_idx(short, np.zeros((4, 4)), compress=False)
    short.write_bytes(short.read_bytes()[:-3])
    with pytest.raises(ValueError, match="expected 16"):
        read_idx(short)
    trunc = tmp_path / "trunc.gz"
    trunc.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 100)[:20])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_idx(trunc)


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*LBYL_FASHION_MNIST") as err:
        load_fashion_mnist("test", root=tmp_path)
    assert str(tmp_path) in str(err.value)
    monkeypatch.setenv("LBYL_FASHION_MNIST", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError, match="env"):
        load_fashion_mnist("train")
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val")


def test_fashion_mnist_real():
    images, labels = fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [1000] * 10
    # The lossless samples are the first 20 test images.
    samples, sample_labels = load_lossless_samples("fashion-mnist", asset("cifar-lossless-samples"))
    assert samples.shape == (20, 1, 28, 28)
    assert torch.equal(samples[:, 0], images[:20])
    assert torch.equal(sample_labels, labels[:20])


# --- CIFAR-10 python batches ------------------------------------------------------------


def _fake_batches(directory: Path, per_batch: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        rows = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        content = {
            b"batch_label": b"fake " + name.encode(),
            b"labels": labels,
            b"data": rows,
            b"filenames": [b"x.png"] * per_batch,
        }
        with open(directory / name, "wb") as f:
            pickle.dump(content, f, protocol=2)
        written[name] = (rows, labels)
    return written


def test_cifar_batches(tmp_path):
    written = _fake_batches(tmp_path / "cifar-10-batches-py")
    # The parent folder is accepted too, and "auto" detects batches under an explicit root.
    for root, source in [(tmp_path / "cifar-10-batches-py", "batches"), (tmp_path, "auto")]:
        images, labels = load_cifar10("test", root=root, source=source)
        rows, expected = written["test_batch"]
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
        # Row layout: 1024 red, then 1024 green, then 1024 blue values.
        assert torch.equal(images[1, 1].flatten(), torch.from_numpy(rows[1, 1024:2048]))
        assert labels.tolist() == expected
    train_images, train_labels = load_cifar10("train", root=tmp_path, source="batches")
    assert train_images.shape == (20, 3, 32, 32)
    assert train_labels.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])


def test_cifar_batches_modern_protocol(tmp_path):
    directory = tmp_path / "b"
    directory.mkdir()
    rows = np.full((2, 3072), 7, dtype=np.uint8)
    with open(directory / "test_batch", "wb") as f:
        pickle.dump({"data": rows, "labels": np.array([1, 2])}, f, protocol=pickle.HIGHEST_PROTOCOL)
    images, labels = load_cifar10("test", root=directory, source="batches")
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [1, 2]


class _Evil:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_cifar_batches_refuse_code(tmp_path):
    directory = tmp_path / "evil"
    directory.mkdir()
    marker = tmp_path / "pwned"
    with open(directory / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(str(marker)), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to load"):
        load_cifar10("test", root=directory, source="batches")
    assert not marker.exists()


def test_cifar_batches_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="python batches"):
        load_cifar10("test", root=tmp_path, source="batches")
    with pytest.raises(FileNotFoundError, match="test_jpg.tar.gz"):
        load_cifar10("test", root=tmp_path, source="jpeg")
    with pytest.raises(ValueError, match="source"):
        load_cifar10("test", root=tmp_path, source="png")


# --- CIFAR-10 JPEG tarball ------------------------------------------------------------------


def _jpeg(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _fake_tarball(path: Path, members: list[tuple[str, tuple[int, int, int]]]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, color in members:
            payload = _jpeg(color)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_cifar_jpeg_fake_tarball(tmp_path):
    tarball = tmp_path / "test_jpg.tar.gz"
    # Deliberately out of order; class folders by name or by number.
    _fake_tarball(
        tarball,
        [
            ("test/truck/0001.jpg", (0, 0, 250)),
            ("test/cat/0010.jpg", (0, 250, 0)),
            ("test/cat/0002.jpg", (250, 0, 0)),
            ("test/0/0000.jpg", (250, 250, 250)),
            ("train/cat/0000.jpg", (0, 0, 0)),  # other split: ignored
        ],
    )
    images, labels = load_cifar10("test", root=tmp_path, source="jpeg")
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 3, 3, 9]
    means = images.float().mean(dim=(2, 3))
    expected = torch.tensor([[250, 250, 250], [250, 0, 0], [0, 250, 0], [0, 0, 250]], dtype=torch.float32)
    assert (means - expected).abs().max() < 8  # JPEG is lossy

    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1
    images2, labels2 = load_cifar10("test", root=tarball)  # the tarball path itself works as root
    assert torch.equal(images, images2) and torch.equal(labels, labels2)

    # A replaced tarball (new size/mtime) is decoded again, not served from the cache.
    _fake_tarball(tarball, [("test/ship/0000.jpg", (10, 10, 10))])
    os.utime(tarball, ns=(1_000_000_000, 1_000_000_000))
    images3, labels3 = load_cifar10("test", root=tarball)
    assert labels3.tolist() == [8]


def test_cifar_jpeg_bad_tarball(tmp_path):
    (tmp_path / "test_jpg.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_cifar10("test", root=tmp_path, cache=False)
    _fake_tarball(tmp_path / "test_jpg.tar.gz", [("test/unicorn/0000.jpg", (1, 2, 3))])
    with pytest.raises(ValueError, match="unknown CIFAR-10 class folder 'unicorn'"):
        load_cifar10("test", root=tmp_path, cache=False)


@pytest.fixture(scope="module")
def cifar_jpeg_test(tmp_path_factory):
    tarball = asset("cifar10-jpeg/test_jpg.tar.gz")
    mp = pytest.MonkeyPatch()
    mp.setenv("LBYL_CACHE", str(tmp_path_factory.mktemp("cifar-cache")))
    try:
        return load_cifar10("test", root=tarball)
    finally:
        mp.undo()


def test_cifar_jpeg_real(cifar_jpeg_test):
    images, labels = cifar_jpeg_test
    assert images.shape == (10000, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [1000] * 10
    assert torch.equal(labels, torch.arange(10).repeat_interleave(1000))


def test_cifar_jpeg_subset_accuracy(cifar_jpeg_test):
    images, labels = cifar_jpeg_test
    images, labels = images[::20], labels[::20]  # 500 images, 50 per class
    info = model_info("resnet20")
    accs = {}
    for relpath in ["weights/resnet-cifar10/resnet20-12fca82f.th", "weights/resnet-cifar10-jpeg/resnet20-jpeg.pt"]:
        model = load_weights(build_model("resnet20"), asset(relpath))
        accs[relpath] = evaluate(model, images, labels, mean=info.mean, std=info.std)
    original, adapted = accs.values()
    assert 70 < original < 90 and 80 < adapted < 95
    assert adapted > original


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, relpath, expected",
    [
        ("resnet20", "weights/resnet-cifar10-jpeg/resnet20-jpeg.pt", 87.47),
        # ResNet-56 (89.48) costs about 5x more CPU time; its weights are
        # covered by the lossless-sample test in test_models.py.
    ],
)
def test_cifar_jpeg_full_accuracy(cifar_jpeg_test, name, relpath, expected):
    images, labels = cifar_jpeg_test
    model = load_weights(build_model(name), asset(relpath))
    info = model_info(name)
    assert round(evaluate(model, images, labels, mean=info.mean, std=info.std), 2) == expected


# --- lossless samples -----------------------------------------------------------------------


def test_lossless_samples_cifar10():
    images, labels = load_lossless_samples("cifar10", asset("cifar-lossless-samples"))
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6]
    # The data folder itself is accepted as root.
    images2, _ = load_lossless_samples("cifar10", asset("cifar-lossless-samples/data"))
    assert torch.equal(images, images2)


def test_lossless_samples_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar10_II_L.png"):
        load_lossless_samples("cifar10", tmp_path)
    with pytest.raises(ValueError, match="unknown sample dataset"):
        load_lossless_samples("svhn", tmp_path)


# --- normalisation and evaluation ----------------------------------------------------------------


def test_datasets():
    assert set(DATASETS) == {"fashion-mnist", "cifar10"}
    assert DATASETS["cifar10"].classes == CIFAR10_CLASSES and DATASETS["cifar10"].num_classes == 10
    assert DATASETS["fashion-mnist"].mean == (0.5,) and DATASETS["fashion-mnist"].std == (0.5,)
    assert DATASETS["cifar10"].mean == (0.485, 0.456, 0.406)
    assert DATASETS["cifar10"].std == (0.229, 0.224, 0.225)


def test_normalize():
    gray = torch.tensor([[[0, 255], [51, 255]]], dtype=torch.uint8)
    out = normalize(gray, (0.5,), (0.5,))
    assert out.shape == (1, 1, 2, 2) and out.dtype == torch.float32
    assert torch.allclose(out.flatten(), torch.tensor([-1.0, 1.0, -0.6, 1.0]))
    rgb = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(rgb, (0.5, 0.0, 1.0), (0.5, 1.0, 2.0))
    assert torch.allclose(out[:, :, 0, 0], torch.tensor([1.0, 1.0, 0.0]).expand(2, 3))
    with pytest.raises(ValueError, match="mean/std"):
        normalize(rgb, (0.5, 0.5), (1.0, 1.0))


class _ModeRecorder(nn.Module):
    """Predicts the first input value as the class; records its training flag."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        cls = x.flatten(1)[:, 0].round().long()
        return nn.functional.one_hot(cls, 10).float() * self.scale


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_restores_mode(training):
    model = _ModeRecorder().train(training)
    images = torch.arange(10, dtype=torch.float32).reshape(10, 1, 1, 1)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 0])
    acc = evaluate(model, images, labels, batch_size=3, progress=True)
    assert acc == pytest.approx(80.0)
    assert model.modes == [False] * 4
    assert model.training is training


def test_evaluate_uint8_needs_normalisation():
    model = _ModeRecorder()
    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="mean= and std="):
        evaluate(model, images, labels)
    assert evaluate(model, images, labels, mean=(0.0,), std=(1.0,)) == 100.0
    with pytest.raises(ValueError, match="labels"):
        evaluate(model, images, labels[:2])
