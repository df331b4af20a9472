"""The architecture coverage page (docs/architectures.md) and the torchvision models behind it.

The page is generated from benchmarks/coverage/results.csv by benchmarks/coverage.py; the
first tests run everywhere. The last ones restore a few small torchvision models for real
and need torchvision (installed in the torch 2.14 CI run, ``make test-torch-2.14``).
"""
import importlib.util

import pytest

from benchmarks import coverage

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
needs_torchvision = pytest.mark.skipif(
    not HAS_TORCHVISION, reason="torchvision is not installed here; the torch 2.14 CI run (make test-torch-2.14) has it"
)


def rows():
    found = coverage.read_rows()
    assert found, f"{coverage.CSV_PATH} is missing or empty; run {coverage.COMMAND}"
    return found


def test_document_is_generated_from_the_csv():
    expected = coverage.render(rows())
    actual = coverage.DOC_PATH.read_text()
    assert actual == expected, f"docs/architectures.md does not match the CSV; regenerate it: {coverage.COMMAND} --doc-only"


def test_no_architecture_made_restore_raise():
    raised = [(r["model"], r["status"], r["error"]) for r in rows() if r["status"] in (coverage.REFUSED, coverage.CRASHED)]
    assert not raised
    for r in rows():
        if r["status"] == coverage.RESTORED:
            assert (r["finite"], r["ratio0_identical"]) == ("yes", "yes"), r["model"]
        else:
            assert r["status"] == coverage.NOTHING, r
            assert not r["error"], r["model"]


def test_reasons_group_across_layer_names():
    names = {"features.3.conv.0.0", "layer1.0.conv3", "layer1.1.conv3", "fc"}
    reason = "output channels are coupled with layer1.0.conv3, layer1.1.conv3 (residual add or shared channels)"
    assert coverage.normalised_reason(reason, names) == "output channels are coupled with <layer> (residual add or shared channels)"
    assert coverage.normalised_reason("feeds Linear fc", names) == "feeds Linear <layer>"
    hyphenated = "feeds the grouped or depthwise convolution trunk_output.block2.block2-0.f.b.0"
    assert coverage.normalised_reason(hyphenated, {"trunk_output.block2.block2-0.f.b.0"}).endswith("convolution <layer>")
    assert coverage.normalised_reason("concatenation along dim 1, not channels", names) == "concatenation along dim 1, not channels"


@needs_torchvision
def test_the_csv_covers_every_torchvision_classifier():
    import torchvision

    assert {r["model"] for r in rows()} == set(torchvision.models.list_models(module=torchvision.models))


@needs_torchvision
@pytest.mark.parametrize("name", ["mobilenet_v2", "shufflenet_v2_x0_5", "densenet121", "resnet18"])
def test_small_torchvision_models_restore(name):
    """Random weights, plausible BatchNorm statistics, a 64x64 image, ratio 0.3 (the CSV checks ratio 0)."""
    row = coverage.measure(name, size=64, ratio0=False)
    assert row["status"] == coverage.RESTORED, row["error"]
    assert int(row["restored"]) >= 1
    assert row["finite"] == "yes"
