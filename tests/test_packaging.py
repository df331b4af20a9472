"""What `pip install lbyl` asks of a user's environment."""
import re
import sys
import tomllib
from pathlib import Path

import pytest

import lbyl

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement(name: str) -> str:
    found = [r for r in PROJECT["dependencies"] if re.match(rf"{re.escape(name)}(?![\w-])", r)]
    assert len(found) == 1, found
    return found[0]


def test_torch_is_a_range_never_a_pin():
    torch_requirement = requirement("torch")
    assert "==" not in torch_requirement and "<" not in torch_requirement, torch_requirement
    assert ">=2.13" in torch_requirement  # the oldest version CI tests
    assert not any("==" in r for r in PROJECT["dependencies"])


def test_plotting_and_export_are_extras():
    core = " ".join(PROJECT["dependencies"])
    for optional in ("matplotlib", "onnx"):
        assert optional not in core
    extras = PROJECT["optional-dependencies"]
    assert any("matplotlib" in r for r in extras["plot"])
    assert any("onnxruntime" in r for r in extras["export"])


def test_versions_agree():
    assert PROJECT["version"] == lbyl.__version__


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    from lbyl.sweep import UNPRUNED, plot_accuracy, write_outputs

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    rows = [dict(model="m", weights="w", ratio=0.0, method=UNPRUNED, criterion="", accuracy=50.0, params=1, macs=1,
                 restore_seconds=0.0, re=0.0, be=0.0, ae=0.0)]  # fmt: skip
    with pytest.raises(ImportError, match=r"pip install 'lbyl\[plot\]'"):
        plot_accuracy(rows, tmp_path / "a.png")
    files, note = write_outputs(rows, tmp_path, "title")
    assert [f.name for f in files] == ["results.csv", "results.md"] and "lbyl[plot]" in note


def test_library_holds_no_path_into_a_checkout():
    for path in (ROOT / "src" / "lbyl").rglob("*.py"):
        assert "Path(__file__).resolve().parents" not in path.read_text(), path
