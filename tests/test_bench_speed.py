"""``python -m lbyl.bench.speed`` runs end to end on a small model and writes its report (no timing checks)."""
import json
import sys

import pytest
import torch

from lbyl.bench import speed


def test_realistic_batchnorm_measures_statistics():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    inputs = torch.randn(8, 3, 6, 6)
    speed.realistic_batchnorm(model, inputs, seed=0)
    bn = model[1]
    with torch.no_grad():
        out = model[0](inputs)
    torch.testing.assert_close(bn.running_mean, out.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn.running_var, out.var(dim=(0, 2, 3), unbiased=True))
    assert not model.training and bool(((bn.weight >= 0.5) & (bn.weight < 1.5)).all())


def test_benchmark_writes_markdown_and_json(tmp_path, capsys):
    argv = [
        "--models", "resnet20", "--ratios", "0.5", "--repeats", "1", "--reference-repeats", "1",
        "--reference-sample", "2", "--latency-repeats", "1", "--batches", "1", "--out", str(tmp_path),
    ]
    if sys.platform != "linux":
        argv.append("--no-memory")
    assert speed.main(argv) == 0
    data = json.loads((tmp_path / "speed.json").read_text())
    [row] = data["models"][0]["ratios"]
    median = row["restore"]["median"]
    assert set(median) >= {"wall", "copy", "graph", "delivery", "surgery", "other", "forward", "restore_over_forward"}
    assert median["restore_over_forward"] == pytest.approx(median["wall"] / median["forward"])
    assert row["restore"]["forward_batch"] == 8 and len(row["restore"]["samples"]) == 1
    assert row["delivery"]["max_relative_difference"] < 1e-8
    assert row["delivery"]["reference_neurons"] < row["delivery"]["pruned_neurons"]
    assert 0 < row["mac_ratio"] < 1
    assert row["latency"]["1"]["restored"]["samples"]
    if sys.platform == "linux":
        assert row["memory"]["inplace"]["peak_extra_bytes"] >= 0, row["memory"]
    markdown = (tmp_path / "speed.md").read_text()
    assert "## Restore wall time" in markdown and "resnet20" in markdown and "restore / forward" in markdown
    assert capsys.readouterr().out.strip() == markdown.strip()


def test_cli_arguments_round_trip():
    import argparse

    parser = argparse.ArgumentParser()
    speed.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "speed", "--models", "resnet20", "--ratios", "0.2,0.4", "--no-onnx"])
    assert speed._to_argv(args) == ["--models", "resnet20", "--ratios", "0.2,0.4", "--no-onnx"]
    with pytest.raises(SystemExit):
        speed.build_parser().parse_args(["--ratios", "a,b"])
