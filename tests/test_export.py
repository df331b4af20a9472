"""Export of restored models: ONNX (checked with onnxruntime) and TorchScript."""
import importlib.util
import os

import pytest
import torch
import torch.nn as nn

import lbyl
from helpers import conv_bn_relu_conv
from lbyl.export import FORMATS, export_model, max_difference, run_exported
from random_models import build, example_input

# CI installs the 'export' extra (.ci/run), so a missing onnxruntime there is a failure, not a skip
MISSING = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
if MISSING and os.environ.get("CI", "").lower() == "true":
    raise RuntimeError(f"CI must install the 'export' extra (pip install -e '.[export]'); missing: {', '.join(MISSING)}")
needs_onnx = pytest.mark.skipif(
    bool(MISSING), reason=f"ONNX export is optional: pip install 'lbyl[export]' (missing {', '.join(MISSING)})"
)
FORMAT_PARAMS = [pytest.param("onnx", marks=needs_onnx), "torchscript"]
SUFFIX = {"onnx": "onnx", "torchscript": "pt"}

MODELS = {
    "cnn": ("cnn", 3, 8, (("conv", 7, True, "max", False), ("conv", 8, True, None, False)), ("flatten", 5)),
    "resnet": ("cnn", 3, 8, (("res", 8, True, 1), ("res", 7, True, 2)), ("gap", 0)),
    "mlp": ("mlp", 10, (7, 8), True),
}


def restored(name, method="lbyl"):
    spec = MODELS[name]
    model = build(spec, seed=3)
    result, _ = lbyl.restore(model, example_input(spec), 0.5, method=method)
    return spec, result


@pytest.mark.parametrize("format", FORMAT_PARAMS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_exported_model_matches_pytorch(tmp_path, format, name):
    spec, model = restored(name)
    path = export_model(model, example_input(spec), tmp_path / f"model.{SUFFIX[format]}", format)
    assert path.is_file() and path.stat().st_size > 0
    batch = example_input(spec, batch=5, seed=9)  # another batch size: the batch dimension is free
    with torch.no_grad():
        expected = model(batch)
    actual = run_exported(path, batch, format)
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, rtol=0, atol=1e-5)
    assert max_difference(model, path, batch, format) <= 1e-5


@pytest.mark.parametrize("format", FORMAT_PARAMS)
def test_export_keeps_the_models_mode(tmp_path, format):
    spec, model = restored("cnn")
    model.train()
    export_model(model, example_input(spec), tmp_path / f"m.{SUFFIX[format]}", format)
    assert model.training
    model.eval()
    assert max_difference(model, tmp_path / f"m.{SUFFIX[format]}", example_input(spec, batch=3), format) <= 1e-5


@needs_onnx
def test_export_of_a_saved_restored_model(tmp_path):
    from lbyl.io import load_restored, save_restored
    from lbyl.models.registry import build_model
    from lbyl.models.registry import example_input as registry_input

    model = build_model("demo-cnn").eval()
    result, report = lbyl.restore(model, registry_input("demo-cnn"), 0.5)
    save_restored(result, report, tmp_path / "saved", "demo-cnn")
    loaded, plan = load_restored(tmp_path / "saved")
    path = export_model(loaded, torch.zeros(plan["input_shape"]), tmp_path / "demo.onnx", "onnx")
    assert max_difference(result, path, torch.randn(4, *plan["input_shape"][1:])) <= 1e-5


@pytest.mark.parametrize("format", FORMAT_PARAMS)
def test_cli_export(tmp_path, capsys, format):
    from lbyl.cli import main
    from lbyl.io import save_restored
    from lbyl.models.registry import build_model
    from lbyl.models.registry import example_input as registry_input

    model = build_model("demo-cnn").eval()
    result, report = lbyl.restore(model, registry_input("demo-cnn"), 0.3, method="nm")
    save_restored(result, report, tmp_path / "r", "demo-cnn")
    out = tmp_path / f"demo.{SUFFIX[format]}"
    assert main(["export", "--restored", str(tmp_path / "r"), "--out", str(out)]) == 0  # format from the suffix
    text = capsys.readouterr().out
    assert f"wrote {out} ({format}" in text and "largest difference from PyTorch" in text
    assert max_difference(result, out, torch.randn(3, 1, 28, 28), format) <= 1e-5


def test_cli_export_needs_a_known_suffix_or_format(tmp_path, capsys):
    from lbyl.cli import main

    assert main(["export", "--restored", str(tmp_path), "--out", str(tmp_path / "model.bin")]) == 1
    assert "pass --format onnx or --format torchscript" in capsys.readouterr().err


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match=r"unknown export format 'tflite'; choose one of onnx, torchscript"):
        export_model(conv_bn_relu_conv(), torch.randn(1, 3, 8, 8, dtype=torch.float64), tmp_path / "m", "tflite")
    assert FORMATS == ("onnx", "torchscript")


@pytest.mark.parametrize("format", FORMAT_PARAMS)
def test_export_with_a_wrong_example_input(tmp_path, format):
    with pytest.raises(ValueError, match=r"cannot run on an example input of shape \(1, 4, 8, 8\)"):
        export_model(conv_bn_relu_conv(), torch.randn(1, 4, 8, 8, dtype=torch.float64), tmp_path / "m", format)


def test_export_path_is_a_directory(tmp_path):
    with pytest.raises(ValueError, match="is a directory; give a file name"):
        export_model(nn.Linear(3, 2), torch.randn(1, 3), tmp_path, "torchscript")
