"""The Python snippets of the README run as written."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_pipeline_snippets():
    text = "\n".join(python_blocks())
    for needle in ("lbyl.plan(", "plan.keep(", "lbyl.restore(model, example, plan"):
        assert needle in text


@pytest.mark.slow
def test_readme_python_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in python_blocks():
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the project's own README
    plan, report = namespace["plan"], namespace["report"]
    assert plan.layer("layer1.0.conv1").kept == list(range(8))
    row = next(r for r in report.layers if r.name == "layer1.0.conv1")
    assert (row.channels_before, row.channels_after) == (16, 8)
    assert (tmp_path / "plan.json").is_file() and (tmp_path / "report.json").is_file()
    assert namespace["small"].layer1[0].conv1.out_channels == 8
