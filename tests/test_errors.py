"""The bad-input catalogue: every row of docs/errors.md, triggered for real.

Each case below provokes one mistake; the test checks that the message the
user sees matches the documented one exactly (``<...>`` in the document
stands for a path, a number or text that PyTorch supplies).
"""
import argparse
import contextlib
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import lbyl
from helpers import conv_bn_relu_conv
from lbyl.cli import main
from lbyl.data import load_cifar10, load_fashion_mnist
from lbyl.export import export_model
from lbyl.io import load_restored, save_restored
from lbyl.models.registry import build_model, example_input, load_weights

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
X = torch.randn(1, 3, 10, 10, dtype=torch.float64)


def small():
    return conv_bn_relu_conv(6, seed=0)


def demo_state(tmp_path, name="demo.pt"):
    path = tmp_path / name
    torch.save(build_model("demo-cnn").state_dict(), path)
    return path


def restored_folder(tmp_path):
    model = build_model("demo-cnn").eval()
    result, report = lbyl.restore(model, example_input("demo-cnn"), 0.5)
    return save_restored(result, report, tmp_path / "restored", "demo-cnn")


def cli(*argv):
    """Run the command line; returns (exit code, what it printed on stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(argv))
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return code, err.getvalue()


# --- the cases: each makes one mistake -----------------------------------------------------


def example_input_type(tmp_path):
    lbyl.restore(small(), np.zeros((1, 3, 10, 10)), 0.5)


def example_input_shape(tmp_path):
    lbyl.restore(small(), torch.randn(1, 5, 10, 10, dtype=torch.float64), 0.5)


def ratio_out_of_range(tmp_path):
    lbyl.restore(small(), X, 1.0)


def ratio_mapping_value(tmp_path):
    lbyl.restore(small(), X, {"0": 1.2})


def unknown_method(tmp_path):
    lbyl.restore(small(), X, 0.5, method="merge")


def unknown_criterion(tmp_path):
    lbyl.restore(small(), X, 0.5, criterion="norm")


def negative_lambda(tmp_path):
    lbyl.restore(small(), X, 0.5, lbyl.LBYL(lambda1=-1))


def unknown_order(tmp_path):
    lbyl.restore(small(), X, 0.5, order="reverse")


def unknown_input_model(tmp_path):
    lbyl.restore(small(), X, 0.5, lbyl.LBYL(input_model="pink"))


def scale_spread_too_large(tmp_path):
    lbyl.restore(small(), X, 0.5, lbyl.LBYL(scale_spread=2))


def input_stats_zero_std(tmp_path):
    lbyl.restore(small(), X, 0.5, input_stats=(0.0, 0.0))


def not_a_module(tmp_path):
    lbyl.restore(lambda x: x, X, 0.5)


def no_restorable_layer(tmp_path):
    lbyl.restore(nn.Sequential(nn.Linear(4, 3)), torch.randn(1, 4), 0.5)


def nan_weights(tmp_path):
    model = small()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    lbyl.restore(model, X, 0.5)


def unknown_layer(tmp_path):
    lbyl.restore(small(), X, 0.5, layers=["conv9"])


def skipped_layer(tmp_path):
    lbyl.restore(small(), X, 0.5, layers=["3"])


def unknown_layer_in_ratio_mapping(tmp_path):
    lbyl.restore(small(), X, {"features.0": 0.5})


def batchnorm_divides_by_zero(tmp_path):
    model = small()
    model[1].eps = 0.0
    with torch.no_grad():
        model[1].running_var[2] = 0.0
    lbyl.restore(model, X, 0.5)


def half_precision_overflow(tmp_path):
    # channel 5 duplicates channel 0; merging it doubles consumer weights past float16's 65504
    from test_degenerate import identical_pair_model

    model = identical_pair_model().half()
    with torch.no_grad():
        model[3].weight[:, [0, 5]] = 40000.0
    lbyl.restore(model, X.half(), 1 / 6, method="nm")


def inplace_not_bool(tmp_path):
    lbyl.restore(small(), X, 0.5, inplace="yes")


def seed_not_int(tmp_path):
    lbyl.restore(small(), X, 0.5, criterion="random", seed=1.5)


def layers_wrong_type(tmp_path):
    lbyl.restore(small(), X, 0.5, layers=3)


def ratio_mapping_with_layers(tmp_path):
    lbyl.restore(small(), X, {"0": 0.5}, layers=["0"])


def ratio_and_kept(tmp_path):
    lbyl.restore(small(), X, 0.5, kept={"0": [0, 1]})


def no_ratio(tmp_path):
    lbyl.restore(small(), X)


def invalid_kept(tmp_path):
    lbyl.restore(small(), X, kept={"0": [0, 9]})


def kept_unequal_blocks(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                          nn.Conv2d(8, 2, 1)).to(torch.float64).eval()  # fmt: skip
    lbyl.restore(model, X, kept={"0": [0, 1, 2, 4]})


def plan_with_other_choices(tmp_path):
    lbyl.restore(small(), X, lbyl.plan(small(), X, 0.5), layers=["0"])


def plan_for_another_model(tmp_path):
    lbyl.restore(conv_bn_relu_conv(4, seed=0), X, lbyl.plan(small(), X, 0.5))


def method_class_not_object(tmp_path):
    lbyl.restore(small(), X, 0.5, lbyl.LBYL)


def correction_not_bool(tmp_path):
    lbyl.NeuronMerging(mean_correction="yes")


def threshold_out_of_range(tmp_path):
    lbyl.paper.NeuronMerging(threshold=2)


def criterion_wrong_shape(tmp_path):
    lbyl.restore(small(), X, 0.5, criterion=lambda filters: filters.norm())


def criterion_not_finite(tmp_path):
    lbyl.restore(small(), X, 0.5, criterion=lambda filters: filters.sum(dim=1) / 0)


def custom_method_wrong_shape(tmp_path):
    class Everything(lbyl.Method):
        name = "everything"

        def delivery(self, stats, kept, pruned, activation):
            return torch.ones(len(pruned), len(kept), dtype=torch.float64)

    lbyl.restore(small(), X, 0.25, Everything())


def target_out_of_range(tmp_path):
    lbyl.plan(small(), X, target_macs=1.5)


def target_unreachable(tmp_path):
    lbyl.plan(small(), X, target_params=0.01)


def target_and_ratio(tmp_path):
    lbyl.plan(small(), X, 0.5, target_macs=0.5)


class Tiny(nn.Module):
    def __init__(self, width=6):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn1(self.conv1(x)))).mean(dim=(2, 3))


class Tinier(Tiny):
    pass


class EditsItsParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 2, 1)
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, x):
        self.scale.mul_(1.0)  # fine for inference; autograd refuses it, so the model cannot be traced
        return self.conv2(torch.relu(self.conv1(x))) * self.scale


def model_not_traceable(tmp_path):
    lbyl.restore(EditsItsParameter().eval(), torch.randn(1, 3, 10, 10), 0.5)


def own_model_folder(tmp_path):
    small_model, _ = lbyl.restore(Tiny().eval(), torch.randn(1, 3, 8, 8), 0.5)
    return lbyl.save_restored(small_model, tmp_path / "tiny")


def load_without_model(tmp_path):
    lbyl.load_restored(own_model_folder(tmp_path))


def load_with_another_class(tmp_path):
    lbyl.load_restored(own_model_folder(tmp_path), model=Tinier())


def load_with_other_widths(tmp_path):
    lbyl.load_restored(own_model_folder(tmp_path), model=Tiny(width=4))


def save_without_report(tmp_path):
    lbyl.save_restored(Tiny(), tmp_path / "tiny")


def unknown_model(tmp_path):
    build_model("resnet57")


def unimportable_model(tmp_path):
    build_model("no_such_package.nets:small_cnn")


def model_needs_torchvision(tmp_path):
    from unittest import mock

    with mock.patch.dict(sys.modules):  # sys.modules is restored afterwards
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None  # as if torchvision were not installed
        build_model("vit-fashion")


def weights_not_found(tmp_path):
    load_weights(build_model("demo-cnn"), tmp_path / "missing.pt")


def corrupt_weights(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"this is not a checkpoint" * 10)
    load_weights(build_model("demo-cnn"), path)


def truncated_weights(tmp_path):
    path = demo_state(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    load_weights(build_model("demo-cnn"), path)


def corrupt_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in build_model("demo-cnn").state_dict().items()}, str(path))
    path.write_bytes(path.read_bytes()[:100])
    load_weights(build_model("demo-cnn"), path)


def mismatched_state_dict(tmp_path):
    load_weights(build_model("lenet-300-100"), demo_state(tmp_path))


def wrong_num_classes(tmp_path):
    load_weights(build_model("demo-cnn", num_classes=100), demo_state(tmp_path))


def pickle_checkpoint(tmp_path):
    path = tmp_path / "train-checkpoint.pt"
    torch.save({"state_dict": build_model("demo-cnn").state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    load_weights(build_model("demo-cnn"), path)


def no_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    load_weights(build_model("demo-cnn"), path)


def restored_folder_missing(tmp_path):
    load_restored(tmp_path / "nowhere")


def not_a_restored_folder(tmp_path):
    load_restored(tmp_path)


def tampered_weights(tmp_path):
    folder = restored_folder(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    load_restored(folder)


def plan_from_another_architecture(tmp_path):
    folder = restored_folder(tmp_path)
    plan = json.loads((folder / "plan.json").read_text())
    plan["model"]["spec"] = "lenet-300-100"
    (folder / "plan.json").write_text(json.dumps(plan))
    load_restored(folder)


def missing_fashion_mnist(tmp_path):
    load_fashion_mnist("test", root=tmp_path)


def missing_cifar10(tmp_path):
    load_cifar10("test", root=tmp_path)


def export_unknown_format(tmp_path):
    export_model(small(), X, tmp_path / "model.tflite", "tflite")


def cli_ratio_out_of_range(tmp_path):
    return cli("restore", "--model", "demo-cnn", "--weights", "w.pt", "--ratio", "1.5", "--out", str(tmp_path))


def cli_unknown_method(tmp_path):
    return cli("restore", "--model", "demo-cnn", "--weights", "w.pt", "--ratio", "0.5", "--method", "merge",
               "--out", str(tmp_path))  # fmt: skip


def cli_weights_not_found(tmp_path):
    return cli("restore", "--model", "demo-cnn", "--weights", str(tmp_path / "missing.pt"), "--ratio", "0.5",
               "--out", str(tmp_path / "out"))  # fmt: skip


def cli_custom_model_without_input_shape(tmp_path):
    return cli("restore", "--model", "lbyl.models.demo:demo_cnn", "--weights", str(demo_state(tmp_path)),
               "--ratio", "0.5", "--out", str(tmp_path / "out"))  # fmt: skip


def cli_pickle_checkpoint(tmp_path):
    try:
        pickle_checkpoint(tmp_path)
    except ValueError:
        pass
    return cli("restore", "--model", "demo-cnn", "--weights", str(tmp_path / "train-checkpoint.pt"), "--ratio", "0.5",
               "--out", str(tmp_path / "out"))  # fmt: skip


def cli_export_unknown_suffix(tmp_path):
    return cli("export", "--restored", str(restored_folder(tmp_path)), "--out", str(tmp_path / "model.bin"))


CASES = {f.__name__.replace("_", "-"): f for f in [
    example_input_type, example_input_shape, ratio_out_of_range, ratio_mapping_value, unknown_method,
    unknown_criterion, negative_lambda, unknown_order, unknown_input_model, scale_spread_too_large,
    input_stats_zero_std, not_a_module, no_restorable_layer, nan_weights,
    unknown_layer, skipped_layer, unknown_layer_in_ratio_mapping, batchnorm_divides_by_zero, half_precision_overflow,
    unknown_model, inplace_not_bool, seed_not_int, layers_wrong_type, ratio_mapping_with_layers, ratio_and_kept,
    no_ratio, invalid_kept, kept_unequal_blocks, plan_with_other_choices, plan_for_another_model, method_class_not_object,
    correction_not_bool, threshold_out_of_range, target_out_of_range, target_unreachable, target_and_ratio,
    model_not_traceable, load_without_model, load_with_another_class, load_with_other_widths, save_without_report, criterion_wrong_shape, criterion_not_finite, custom_method_wrong_shape,
    unimportable_model, model_needs_torchvision, weights_not_found, corrupt_weights, truncated_weights, corrupt_safetensors,
    mismatched_state_dict, wrong_num_classes, pickle_checkpoint, no_state_dict, restored_folder_missing,
    not_a_restored_folder, tampered_weights, plan_from_another_architecture, missing_fashion_mnist,
    missing_cifar10, export_unknown_format, cli_ratio_out_of_range, cli_unknown_method, cli_weights_not_found,
    cli_custom_model_without_input_shape, cli_pickle_checkpoint, cli_export_unknown_suffix,
]}  # fmt: skip


def observed(case, tmp_path) -> tuple[str, str]:
    """(error kind, message) that the user sees for ``case``."""
    try:
        result = CASES[case](tmp_path)
    except Exception as error:
        return type(error).__name__, str(error)
    assert result is not None, f"{case} raised nothing"
    code, stderr = result
    lines = [line for line in stderr.splitlines() if line.strip()]
    return f"exit {code}", lines[-1]


# --- the document ----------------------------------------------------------------------------


def documented() -> dict[str, tuple[str, str]]:
    """``{case: (error kind, message)}`` from the catalogue table of docs/errors.md."""
    rows = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"\|\s*`([a-z0-9-]+)`\s*\|.*\|\s*`([^`]+)`\s*\|\s*`([^`]+)`\s*\|[^|]*\|\s*$", line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3))
    return rows


def as_pattern(message: str) -> re.Pattern:
    parts = re.split(r"<[^<>]*>", message)
    return re.compile(".*?".join(re.escape(p) for p in parts), re.DOTALL)


def test_document_lists_every_case():
    rows = documented()
    assert len(rows) >= 15
    assert sorted(rows) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_message_is_the_documented_one(case, tmp_path):
    kind, message = documented()[case]
    actual_kind, actual = observed(case, tmp_path)
    assert actual_kind == kind, actual
    assert as_pattern(message).fullmatch(actual), f"\ndocumented: {message}\nactual:     {actual}"
