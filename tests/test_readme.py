"""The Python snippets of the README run as written."""
import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_snippets():
    text = "\n".join(python_blocks())
    for needle in ("lbyl.plan(", "plan.keep(", "lbyl.restore(model, example, plan", "target_macs=0.6",
                   "lbyl.load_restored(\"net-restored\", model=Net())", "tp.importance", "torchvision.models"):  # fmt: skip
        assert needle in text, needle


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_snippet_runs(index, tmp_path, monkeypatch):
    block = python_blocks()[index]
    if re.search(r"\btorchvision\b", block) and importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed here (CI runs this snippet in its torch 2.14.1 + torchvision venv)")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    if "plan.keep(" in block:  # the pipeline snippet continues the first one
        exec(compile(python_blocks()[0], str(README), "exec"), namespace)  # noqa: S102 - the project's own README
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    small, report = namespace["small"], namespace["report"]
    assert report.params_after < report.params_before
    assert sum(p.numel() for p in small.parameters()) == report.params_after
    if "plan.keep(" in block:
        assert namespace["plan"].layer("layer1.0.conv1").kept == list(range(8))
        assert small.layer1[0].conv1.out_channels == 8
    if "load_restored" in block:
        import torch

        x = torch.randn(2, 3, 32, 32)
        assert torch.allclose(namespace["again"](x), small.eval()(x), atol=1e-6)
    if "kept=kept" in block:
        assert {r.name: r.kept for r in report.layers} == namespace["kept"]
