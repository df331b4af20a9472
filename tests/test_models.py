"""Model definitions, the registry and checkpoint loading."""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import random
import sys
import warnings

import pytest
import torch
from torch import nn

from lbyl.data import DATASETS, evaluate, find_asset, load_fashion_mnist, load_lossless_samples
from lbyl.models import (
    MODELS,
    WeightsError,
    available_models,
    build_model,
    example_input,
    load_state_dict,
    load_weights,
    model_info,
)
from lbyl.models.demo import DemoCNN
from lbyl.models.resnet_cifar import PadShortcut


def asset(relpath: str):
    """Path of a shared asset; skip when absent, but fail on CI."""
    try:
        return find_asset(relpath)
    except FileNotFoundError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"required asset missing on CI: {e}")
        pytest.skip(f"shared asset missing: {e}")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
#: registry models built from torchvision classes (torchvision is optional)
TORCHVISION_MODELS = {"vit-fashion"}


def registry_names():
    """Every registry name; those needing torchvision skip without it (the torch 2.14 CI run has it)."""
    reason = "torchvision is not installed here; the torch 2.14 CI run (make test-torch-2.14) has it"
    return [
        pytest.param(name, marks=pytest.mark.skipif(not HAS_TORCHVISION, reason=reason))
        if name in TORCHVISION_MODELS else name
        for name in available_models()
    ]  # fmt: skip


# --- registry ---------------------------------------------------------------


@pytest.mark.parametrize("name", registry_names())
def test_registry_model_forward(name):
    info = model_info(name)
    model = build_model(name).eval()
    x = example_input(name, batch=1)
    assert x.shape == (1, *info.input_shape)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, info.num_classes)
    assert torch.isfinite(y).all()


def test_registry_names_and_info():
    expected = {
        "lenet-300-100", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg16-bn-cifar",
        "demo-cnn", "resnet18", "resnet34", "resnet50", "resnet101", "vgg16-bn-imagenet", "vit-fashion",
    }  # fmt: skip
    assert set(MODELS) == expected
    assert "vgg16-bn" in available_models()
    assert model_info("vgg16-bn") == model_info("vgg16-bn-cifar")
    assert model_info("lenet-300-100").input_shape == (1, 28, 28)
    assert model_info("resnet56").input_shape == (3, 32, 32)
    assert model_info("resnet50").input_shape == (3, 224, 224)
    for name, (_, info) in MODELS.items():
        if info.dataset in DATASETS:
            assert info.mean == DATASETS[info.dataset].mean, name
            assert info.std == DATASETS[info.dataset].std, name
    assert build_model("resnet20").lbyl_spec == "resnet20"
    assert build_model("VGG16_BN").lbyl_spec == "vgg16-bn-cifar"


def hide_torchvision(monkeypatch):
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision now fails


def test_vit_without_torchvision_names_the_install(monkeypatch):
    hide_torchvision(monkeypatch)
    with pytest.raises(ImportError, match=r"torchvision is not installed.*pip install torchvision"):
        build_model("vit-fashion")
    assert model_info("vit-fashion").input_shape == (1, 28, 28)  # the registry itself needs no torchvision


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed here; the torch 2.14 CI run has it")
def test_vit_is_torchvisions_class_with_one_input_channel():
    from torchvision.models.vision_transformer import MLPBlock, VisionTransformer

    model = build_model("vit-fashion")
    assert type(model) is VisionTransformer
    assert model.conv_proj.in_channels == 1 and model.conv_proj.kernel_size == (7, 7)
    blocks = [m for m in model.modules() if isinstance(m, MLPBlock)]
    assert len(blocks) == 4 and all((b[0].in_features, b[0].out_features) == (64, 256) for b in blocks)
    # the patch embedding is initialised like torchvision's own: std sqrt(1 / fan_in), fan_in 49
    assert 0.1 < float(model.conv_proj.weight.detach().std()) < 0.16
    with pytest.raises(TypeError, match="unknown arguments"):
        build_model("vit-fashion", depth=3)
    assert len(build_model("vit-fashion", num_layers=2).encoder.layers) == 2


def test_build_model_kwargs():
    model = build_model("resnet20", num_classes=100)
    assert model.linear.out_features == 100


def test_import_path_spec():
    model = build_model("lbyl.models.demo:demo_cnn", num_classes=7)
    assert isinstance(model, DemoCNN)
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 7)
    assert model_info("lbyl.models.demo:demo_cnn") is None


def test_unknown_spec_errors():
    with pytest.raises(ValueError, match=r"unknown model 'resnet21'.*resnet20.*package\.module:factory"):
        build_model("resnet21")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        build_model("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'nothing'"):
        build_model("lbyl.models.demo:nothing")
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        build_model("lbyl.data:cache_dir")
    with pytest.raises(ValueError, match="package.module:factory"):
        build_model(":demo_cnn")


# --- architectures ------------------------------------------------------------

# Known torchvision state-dict entries (name -> shape).
TORCHVISION_RESNET50 = {
    "conv1.weight": (64, 3, 7, 7),
    "bn1.running_mean": (64,),
    "layer1.0.conv1.weight": (64, 64, 1, 1),
    "layer1.0.conv2.weight": (64, 64, 3, 3),
    "layer1.0.conv3.weight": (256, 64, 1, 1),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer1.0.downsample.1.running_var": (256,),
    "layer2.0.conv2.weight": (128, 128, 3, 3),
    "layer2.0.downsample.0.weight": (512, 256, 1, 1),
    "layer3.5.bn3.weight": (1024,),
    "layer4.2.conv3.weight": (2048, 512, 1, 1),
    "layer4.0.downsample.1.num_batches_tracked": (),
    "fc.weight": (1000, 2048),
    "fc.bias": (1000,),
}
TORCHVISION_RESNET18 = {
    "layer1.1.conv2.weight": (64, 64, 3, 3),
    "layer2.0.conv1.weight": (128, 64, 3, 3),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer4.1.bn2.bias": (512,),
    "fc.weight": (1000, 512),
}
TORCHVISION_VGG16_BN = {
    "features.0.weight": (64, 3, 3, 3),
    "features.0.bias": (64,),
    "features.1.running_mean": (64,),
    "features.40.weight": (512, 512, 3, 3),
    "features.41.num_batches_tracked": (),
    "classifier.0.weight": (4096, 25088),
    "classifier.3.weight": (4096, 4096),
    "classifier.6.weight": (1000, 4096),
}


@pytest.mark.parametrize(
    "name, keys",
    [
        ("resnet50", TORCHVISION_RESNET50),
        ("resnet18", TORCHVISION_RESNET18),
        ("vgg16-bn-imagenet", TORCHVISION_VGG16_BN),
    ],
)
def test_torchvision_key_names(name, keys):
    state = build_model(name).state_dict()
    for key, shape in keys.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    if name == "resnet18":  # BasicBlock stage 1 keeps 64 channels: no projection
        assert "layer1.0.downsample.0.weight" not in state


@pytest.mark.parametrize(
    "name, count",
    [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("resnet101", 44_549_160),
        ("vgg16-bn-imagenet", 138_365_992),
        ("resnet20", 269_722),
        ("resnet56", 853_018),
        ("lenet-300-100", 266_610),
    ],
)
def test_parameter_counts(name, count):
    assert n_params(build_model(name)) == count


def test_imagenet_models_accept_other_sizes():
    # The adaptive pools make the classifier independent of the input size.
    with torch.no_grad():
        assert build_model("resnet18").eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)


def test_pad_shortcut_matches_option_a():
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(16, 32, 2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_cifar_resnet_shortcut_b():
    model = build_model("resnet20", shortcut="B").eval()
    state = model.state_dict()
    assert state["layer2.0.shortcut.0.weight"].shape == (32, 16, 1, 1)
    assert "layer2.0.shortcut.1.running_mean" in state
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="shortcut"):
        build_model("resnet20", shortcut="C")


def test_cifar_resnet_depths():
    for name, blocks in [("resnet20", 3), ("resnet32", 5), ("resnet44", 7), ("resnet56", 9), ("resnet110", 18)]:
        model = build_model(name)
        assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [blocks] * 3


def test_vgg_cifar_flatten_maps_channels_to_columns():
    model = build_model("vgg16-bn-cifar").eval()
    convs = [m for m in model.feature if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    feat = model.avgpool(model.feature(torch.zeros(1, 3, 32, 32)))
    assert feat.shape == (1, 512, 1, 1)
    assert model.classifier[0].in_features == convs[-1].out_channels


def test_lenet_input_layouts():
    model = build_model("lenet-300-100").eval()
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model(x), model(x.reshape(3, 784)))


def test_demo_cnn_small():
    model = build_model("demo-cnn")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert buf.tell() < 5 * 1024 * 1024
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) >= 3


# --- real checkpoints ---------------------------------------------------------

CIFAR_WEIGHTS = [
    ("resnet20", "weights/resnet-cifar10/resnet20-12fca82f.th"),
    ("resnet20", "weights/resnet-cifar10-jpeg/resnet20-jpeg.pt"),
    ("resnet56", "weights/resnet-cifar10/resnet56-4bfd9763.th"),
    ("resnet56", "weights/resnet-cifar10-jpeg/resnet56-jpeg.pt"),
]


@pytest.mark.parametrize("name, relpath", CIFAR_WEIGHTS)
def test_cifar_checkpoints_classify_lossless_samples(name, relpath):
    path = asset(relpath)
    images, labels = load_lossless_samples("cifar10", asset("cifar-lossless-samples"))
    model = load_weights(build_model(name), path)
    info = model_info(name)
    assert evaluate(model, images, labels, mean=info.mean, std=info.std) == 100.0


def test_resnet32_checkpoint_loads():
    model = load_weights(build_model("resnet32"), asset("weights/resnet-cifar10/resnet32-d509ac18.th"))
    images, labels = load_lossless_samples("cifar10", asset("cifar-lossless-samples"))
    info = model_info("resnet32")
    assert evaluate(model, images, labels, mean=info.mean, std=info.std) >= 90.0


def test_registry_weights_exist():
    for _, info in MODELS.values():
        for relpath in info.weights:
            asset(relpath)


def test_lenet_checkpoint_fashion_mnist_accuracy():
    path = asset("weights/lenet-300-100/LeNet_300_100.original.pth.tar")
    try:
        images, labels = load_fashion_mnist("test")
    except FileNotFoundError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))
    model = load_weights(build_model("lenet-300-100"), path)
    info = model_info("lenet-300-100")
    acc = evaluate(model, images, labels, batch_size=2000, mean=info.mean, std=info.std)
    assert round(acc, 2) == 89.80


# --- loading errors -------------------------------------------------------------


@pytest.fixture
def resnet20_file(tmp_path):
    path = tmp_path / "resnet20.pt"
    torch.save(build_model("resnet20").state_dict(), path)
    return path


def test_load_wrapped_and_prefixed(tmp_path):
    src = build_model("resnet20")
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    for wrapper in ("state_dict", "model", "net"):
        path = tmp_path / f"{wrapper}.pt"
        torch.save({wrapper: state, "epoch": 3, "acc": 91.0}, path)
        model = load_weights(build_model("resnet20"), path)
        assert torch.equal(model.linear.weight, src.linear.weight)


def test_load_safetensors(tmp_path):
    from safetensors.torch import save_file

    src = build_model("lenet-300-100")
    path = tmp_path / "lenet.safetensors"
    save_file(src.state_dict(), str(path))
    model = load_weights(build_model("lenet-300-100"), path)
    assert torch.equal(model.ip3.weight, src.ip3.weight)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        load_weights(build_model("lenet-300-100"), path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(ValueError, match="weights file not found: .*nope.pt"):
        load_weights(build_model("resnet20"), path)
    with pytest.raises(FileNotFoundError):
        load_weights(build_model("resnet20"), path)


@pytest.mark.parametrize("seed", range(5))
def test_corrupt_file(tmp_path, seed):
    path = tmp_path / "garbage.pt"
    path.write_bytes(random.Random(seed).randbytes(1000))
    with pytest.raises(ValueError, match=r"garbage.pt: not a readable PyTorch checkpoint \(corrupt or truncated\?\)"):
        load_weights(build_model("resnet20"), path)


def test_corrupt_file_trusted(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x80\x02" + b"this is not a checkpoint" * 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="garbage.pt"):
            load_weights(build_model("resnet20"), path, trust_pickle=True)


def test_truncated_file(resnet20_file):
    data = resnet20_file.read_bytes()
    resnet20_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_weights(build_model("resnet20"), resnet20_file)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_weights(build_model("resnet20"), path)


def test_wrong_architecture(resnet20_file):
    with pytest.raises(ValueError) as err:
        load_weights(build_model("resnet32"), resnet20_file)
    msg = str(err.value)
    assert "'resnet32'" in msg and "missing keys" in msg and "layer1.3.conv1.weight" in msg


def test_shape_mismatch(tmp_path):
    path = tmp_path / "r20c100.pt"
    torch.save(build_model("resnet20", num_classes=100).state_dict(), path)
    with pytest.raises(ValueError, match=r"linear.weight: checkpoint \(100, 64\) vs model \(10, 64\)"):
        load_weights(build_model("resnet20"), path)


def test_unexpected_keys(tmp_path):
    state = build_model("lenet-300-100").state_dict()
    state["ip4.weight"] = torch.zeros(1)
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"1 unexpected keys: ip4.weight"):
        load_weights(build_model("lenet-300-100"), path, spec="lenet-300-100")


def test_no_state_dict(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 1, "acc": 2.0}, path)
    with pytest.raises(ValueError, match="no state dict found"):
        load_weights(build_model("resnet20"), path)


def test_pickle_requiring_checkpoint(tmp_path):
    src = build_model("resnet20")
    path = tmp_path / "with_args.pt"
    torch.save({"state_dict": src.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(
        ValueError, match=r"needs full unpickling.*trust_pickle=True.*--trust-pickle.*argparse.Namespace"
    ):
        load_weights(build_model("resnet20"), path)
    with pytest.warns(UserWarning, match="trust_pickle"):
        model = load_weights(build_model("resnet20"), path, trust_pickle=True)
    assert torch.equal(model.conv1.weight, src.conv1.weight)


def test_whole_module_checkpoint(tmp_path):
    src = build_model("lenet-300-100")
    path = tmp_path / "whole.pt"
    torch.save(src, path)
    with pytest.raises(ValueError, match="trust_pickle"):
        load_state_dict(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_weights(build_model("lenet-300-100"), path, trust_pickle=True)
    assert torch.equal(model.ip1.weight, src.ip1.weight)
