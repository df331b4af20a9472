"""Safe loading: no code path unpickles untrusted files unless the user opts in."""
import argparse
import ast
from pathlib import Path

import pytest
import torch

from lbyl.cli import main
from lbyl.models.registry import build_model

SRC = Path(__file__).resolve().parents[1] / "src" / "lbyl"


def calls(name: str):
    """(file, line, call node) of every call to ``<anything>.<name>(...)`` or ``<name>(...)`` in the package."""
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    yield path.relative_to(SRC), node.lineno, node


def owner(node) -> str:
    func = node.func
    return ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""


def test_every_torch_load_is_weights_only_unless_trusted():
    found = [(f, line, n) for f, line, n in calls("load") if owner(n) == "torch"]
    assert found, "the checkpoint loader should be found"
    for file, line, node in found:
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        assert "weights_only" in keywords, f"{file}:{line} calls torch.load without weights_only"
        assert keywords["weights_only"] in ("True", "not trust_pickle"), f"{file}:{line}: {keywords['weights_only']}"


def test_no_plain_pickle_or_numpy_pickle_loads():
    for name in ("load", "loads"):
        for file, line, node in calls(name):
            assert owner(node) not in ("pickle", "cPickle", "dill", "joblib"), f"{file}:{line} unpickles a file"
            if owner(node) in ("np", "numpy"):
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert keywords.get("allow_pickle") == "False", f"{file}:{line} numpy load may unpickle"


@pytest.fixture
def pickled_checkpoint(tmp_path):
    path = tmp_path / "train-checkpoint.pt"
    state = build_model("demo-cnn").state_dict()
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1), "epoch": 3}, path)
    return path


def test_cli_refuses_a_pickle_checkpoint(pickled_checkpoint, tmp_path, capsys):
    code = main(["restore", "--model", "demo-cnn", "--weights", str(pickled_checkpoint), "--ratio", "0.5",
                 "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "needs full unpickling" in err and "--trust-pickle" in err
    assert not (tmp_path / "out").exists()


def test_cli_trust_pickle_loads_with_a_warning(pickled_checkpoint, tmp_path):
    with pytest.warns(UserWarning, match="full unpickling .* only do it for files from a source you trust"):
        code = main(["restore", "--model", "demo-cnn", "--weights", str(pickled_checkpoint), "--ratio", "0.5",
                     "--trust-pickle", "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 0 and (tmp_path / "out" / "plan.json").is_file()
