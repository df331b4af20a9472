"""The lbyl command line: help texts, restore -> eval round trip, sweep outputs."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import lbyl
from lbyl.cli import main
from lbyl.data import evaluate, load_fashion_mnist
from lbyl.demo import demo_weights, load_demo_model
from lbyl.models.registry import example_input, model_info
from lbyl.sweep import (
    FIELDS, UNPRUNED, format_table, markdown_table, plot_accuracy, read_csv, subset, write_csv, write_markdown,
)  # fmt: skip

SUBCOMMANDS = ("restore", "eval", "sweep", "demo")


def fashion_mnist_test():
    """The FashionMNIST test set; skips without it, but fails in CI where it must be installed."""
    try:
        return load_fashion_mnist("test")
    except FileNotFoundError as error:
        message = f"FashionMNIST test set not available: {error}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def weights_file():
    with demo_weights() as path:
        yield str(path)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- help -------------------------------------------------------------------


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in SUBCOMMANDS:
        assert command in out
    assert "examples:" in out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lbyl {command}")
    assert "examples:" in out
    if command in ("restore", "sweep"):
        # methods, criteria and the meaning of the ratio are explained
        for word in ("Neuron Merging", "least-squares", "l2gm", "random", "fraction of output channels"):
            assert word in out
    if command == "eval":
        assert "--restored" in out and "MACs" in out


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "lbyl", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.strip() == f"lbyl {lbyl.__version__}"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["restore", "--model", "demo-cnn", "--weights", "w", "--ratio", "1.5", "--out", "x"], "outside [0, 1)"),
        (["restore", "--model", "demo-cnn", "--weights", "w", "--ratio", "0.5", "--method", "magic", "--out", "x"], "invalid choice"),
        (["sweep", "--model", "demo-cnn", "--weights", "w", "--methods", "lbyl,magic"], "unknown 'magic'"),
        (["sweep", "--model", "demo-cnn", "--weights", "w", "--ratios", "0.1,abc"], "not a number"),
        (["restore", "--model", "demo-cnn", "--weights", "w", "--ratio", "0.5", "--input-stats", "0.5", "--out", "x"], "is not MEAN,STD"),
        (["restore", "--model", "demo-cnn", "--weights", "w", "--ratio", "0.5", "--input-stats", "0,-1", "--out", "x"], "std a finite number > 0"),
    ],
)
def test_bad_arguments_are_rejected(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_runtime_errors_are_one_clear_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", "--model", "demo-cnn", "--weights", str(tmp_path / "missing.safetensors"))
    assert code == 1
    assert "weights file not found" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "eval", "--data", "fashion-mnist")
    assert code == 1 and "--restored" in err
    code, _, err = run_cli(capsys, "eval", "--restored", str(tmp_path))
    assert code == 1 and "no plan.json" in err


def test_a_missing_optional_package_is_one_clear_line(capsys, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if torchvision were not installed
    code, _, err = run_cli(capsys, "eval", "--model", "vit-fashion", "--weights", str(tmp_path / "vit.safetensors"))
    assert code == 1
    assert "pip install torchvision" in err and "Traceback" not in err


# --- restore and eval -------------------------------------------------------------


@pytest.mark.slow
def test_restore_options_reach_the_plan(capsys, tmp_path, weights_file):
    out = tmp_path / "r"
    code, stdout, _ = run_cli(
        capsys, "restore", "--model", "demo-cnn", "--weights", weights_file, "--ratio", "0.25",
        "--method", "lbyl", "--lambda2", "auto", "--bias-correction", "off", "--layers", "all", "--out", str(out),
    )  # fmt: skip
    assert code == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["settings"]["lambda2"] == "auto" and plan["settings"]["mean_correction"] is False
    assert list(plan["kept"]) == ["conv1", "conv2", "conv3", "fc1"]  # 'all' includes the hidden Linear layer
    assert "fc1" in stdout and "256 -> 192" in stdout

    code, _, _ = run_cli(capsys, "restore", "--model", "demo-cnn", "--weights", weights_file, "--ratio", "0.25",
                         "--layers", "conv2", "--out", str(tmp_path / "one"))  # fmt: skip
    plan = json.loads((tmp_path / "one" / "plan.json").read_text())
    assert code == 0 and list(plan["kept"]) == ["conv2"] and plan["settings"]["mean_correction"] is True
    assert plan["settings"]["input_model"] == "propagated"  # the default

    code, _, _ = run_cli(capsys, "restore", "--model", "demo-cnn", "--weights", weights_file, "--ratio", "0.25",
                         "--input-model", "bn", "--out", str(tmp_path / "bn"))  # fmt: skip
    plan = json.loads((tmp_path / "bn" / "plan.json").read_text())
    assert code == 0 and plan["settings"]["input_model"] == "bn" and "input_stats" not in plan["settings"]

    code, _, _ = run_cli(capsys, "restore", "--model", "demo-cnn", "--weights", weights_file, "--ratio", "0.25",
                         "--input-stats=-0.43,0.71", "--out", str(tmp_path / "stats"))  # fmt: skip
    plan = json.loads((tmp_path / "stats" / "plan.json").read_text())
    assert code == 0 and plan["settings"]["input_stats"] == [-0.43, 0.71]
    assert plan["settings"]["variance_correction"] is True  # on for lbyl by default

    code, _, _ = run_cli(capsys, "restore", "--model", "demo-cnn", "--weights", weights_file, "--ratio", "0.25",
                         "--variance-correction", "off", "--out", str(tmp_path / "novc"))  # fmt: skip
    plan = json.loads((tmp_path / "novc" / "plan.json").read_text())
    assert code == 0 and plan["settings"]["variance_correction"] is False

    # the flags build the method object: its name and options are the recorded settings
    code, _, _ = run_cli(capsys, "restore", "--model", "demo-cnn", "--weights", weights_file, "--ratio", "0.25",
                         "--method", "nm-paper", "--nm-threshold", "0.45", "--bias-correction", "on",
                         "--out", str(tmp_path / "nmp"))  # fmt: skip
    plan = json.loads((tmp_path / "nmp" / "plan.json").read_text())
    assert code == 0 and plan["settings"]["method"] == "nm-paper" and plan["settings"]["threshold"] == 0.45
    assert plan["settings"]["mean_correction"] is True and plan["settings"]["variance_correction"] is False
    assert lbyl.paper.NeuronMerging(0.45, mean_correction=True).settings().items() <= plan["settings"].items()


@pytest.mark.slow
def test_restore_then_eval_matches_in_memory_model(capsys, tmp_path, weights_file):
    images, labels = fashion_mnist_test()
    images, labels = subset(images, labels, 500)
    out = tmp_path / "restored"
    code, stdout, _ = run_cli(
        capsys, "restore", "--model", "demo-cnn", "--weights", weights_file, "--ratio", "0.5",
        "--method", "lbyl", "--criterion", "l2", "--lambda1", "0.05", "--out", str(out),
    )  # fmt: skip
    assert code == 0
    assert "conv1" in stdout and "32 -> 16" in stdout
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "plan.json", "report.json"}

    code, stdout, _ = run_cli(capsys, "eval", "--restored", str(out), "--limit", "500", "--json")
    assert code == 0
    result = json.loads(stdout)

    model = load_demo_model()
    restored, report = lbyl.restore(model, example_input("demo-cnn"), 0.5, lbyl.LBYL(lambda1=0.05), criterion="l2")
    info = model_info("demo-cnn")
    expected = evaluate(restored, images, labels, mean=info.mean, std=info.std)
    assert result["images"] == 500 and result["data"] == "fashion-mnist"
    assert result["accuracy"] == expected
    assert result["params"] == report.params_after < report.params_before
    assert result["macs"] == report.macs_after < report.macs_before
    plan = json.loads((out / "plan.json").read_text())
    assert plan["source_weights"]["file"] == "demo-cnn-fashion-mnist.safetensors"


def test_eval_of_original_weights(capsys, weights_file):
    images, labels = fashion_mnist_test()
    code, stdout, _ = run_cli(capsys, "eval", "--model", "demo-cnn", "--weights", weights_file, "--limit", "300")
    assert code == 0
    info = model_info("demo-cnn")
    images, labels = subset(images, labels, 300)
    expected = evaluate(load_demo_model(), images, labels, mean=info.mean, std=info.std)
    assert f"top-1       {expected:.2f}%" in stdout
    assert "parameters  390,634" in stdout


# --- sweep ------------------------------------------------------------------------


@pytest.mark.slow
def test_sweep_writes_csv_markdown_and_plot(capsys, tmp_path, weights_file):
    fashion_mnist_test()
    out = tmp_path / "sweep"
    code, stdout, _ = run_cli(
        capsys, "sweep", "--model", "demo-cnn", "--weights", weights_file, "--data", "fashion-mnist",
        "--ratios", "0,0.5", "--methods", "prune,lbyl", "--limit", "300", "--out", str(out),
    )  # fmt: skip
    assert code == 0
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == FIELDS
    rows = read_csv(out / "results.csv")
    assert [(r["method"], r["ratio"]) for r in rows] == [
        (UNPRUNED, 0.0), ("prune", 0.0), ("lbyl", 0.0), ("prune", 0.5), ("lbyl", 0.5)
    ]
    baseline = rows[0]
    for row in rows[1:3]:  # removing nothing changes nothing
        assert row["accuracy"] == baseline["accuracy"]
        assert row["params"] == baseline["params"] and row["macs"] == baseline["macs"]
    for row in rows[3:]:
        assert row["params"] < baseline["params"] and row["restore_seconds"] > 0
        assert row["weights"] == "demo-cnn-fashion-mnist.safetensors" and row["criterion"] == "auto"
    assert rows[3]["re"] > 0  # plain pruning leaves the whole removed signal as error

    markdown = (out / "results.md").read_text()
    assert "| ratio | params | MACs | prune top-1 % | lbyl top-1 % |" in markdown
    assert f"| 0.5 | " in markdown and f"{rows[4]['accuracy']:.2f} |" in markdown
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "unpruned" in stdout and "lbyl" in stdout


def test_subset_spreads_over_the_set():
    labels = torch.arange(10).repeat_interleave(100)  # sorted by class, like the CIFAR-10 JPEG copy
    images = labels.clone()
    sub_images, sub_labels = subset(images, labels, 50)
    assert len(sub_labels) == 50 and torch.equal(sub_images, sub_labels)
    assert torch.equal(torch.bincount(sub_labels), torch.full((10,), 5))
    assert subset(images, labels, None)[1] is labels and subset(images, labels, 5000)[1] is labels


def _synthetic_rows():
    base = dict(model="m", weights="w.pt", lambda1=0.0, lambda2="auto", restore_seconds=0.5, re=1.0, be=0.0, ae=2.0)
    rows = [dict(base, ratio=0.0, method=UNPRUNED, criterion="", accuracy=92.5, params=1000, macs=5000,
                 restore_seconds=0.0, bias_correction="", input_model="")]  # fmt: skip
    for ratio, kept in ((0.3, 700), (0.6, 400)):
        for method, drop in (("prune", 20.0), ("lbyl", 5.0)):
            for criterion, extra in (("l1", 1.0), ("l2", 0.0)):
                rows.append(dict(base, ratio=ratio, method=method, criterion=criterion, bias_correction=method == "lbyl",
                                 input_model="bn" if method == "lbyl" else "", accuracy=92.5 - drop * ratio - extra, params=kept, macs=5 * kept))  # fmt: skip
    return rows


def test_sweep_files_from_rows(tmp_path):
    rows = _synthetic_rows()
    write_csv(rows, tmp_path / "r.csv")
    assert read_csv(tmp_path / "r.csv") == rows  # exact round trip, floats included
    table = markdown_table(rows)
    lines = table.splitlines()
    # several criteria: columns are method/criterion; one line per ratio plus the unpruned one
    assert lines[0] == "| ratio | params | MACs | prune/l1 top-1 % | prune/l2 top-1 % | lbyl/l1 top-1 % | lbyl/l2 top-1 % |"
    assert len(lines) == 2 + 1 + 2
    assert lines[2].startswith("| unpruned | 1.00k | 5.00k | 92.50 |")
    assert lines[4] == "| 0.6 | 400 | 2.00k | 79.50 | 80.50 | 88.50 | 89.50 |"
    write_markdown(rows, tmp_path / "r.md", title="T")
    assert (tmp_path / "r.md").read_text().startswith("# T\n")
    plot_accuracy(rows, tmp_path / "r.png", title="T")
    assert (tmp_path / "r.png").stat().st_size > 5000
    text = format_table(rows)
    assert len(text.splitlines()) == 2 + len(rows)
    assert "92.50" in text.splitlines()[2]
