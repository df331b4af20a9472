"""The ImageNet benchmark (benchmarks/imagenet_lite0.py): docs/imagenet.md against the tracked
results, the Lite0 conversion, and a smoke run on real weights and images that resumes."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

import lbyl

from benchmarks import imagenet_lite0 as bench
from benchmarks.imagenet_data import PACKAGES, SAMPLES
from benchmarks.imagenet_report import render_doc, targets
from lbyl.data import assets_root

REPO = Path(__file__).resolve().parents[1]


def _require(missing: str) -> None:
    """Skip when ``missing`` names something absent; under CI=true that is a failure."""
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)


def _lite0_packages() -> str:
    absent = [p for p in PACKAGES if importlib.util.find_spec(p.replace("-", "_")) is None]
    return f"not installed: {', '.join(absent)} (make setup installs them)" if absent else ""


def test_doc_is_what_the_csv_renders():
    rows = bench.read_rows(REPO / bench.DEFAULT_OUT / "results.csv")
    assert rows, "benchmarks/imagenet/results.csv is empty"
    assert (REPO / "docs" / "imagenet.md").read_text() == render_doc(rows), (
        "docs/imagenet.md is stale: python -m benchmarks.imagenet_lite0 --report-only --doc docs/imagenet.md"
    )


def test_tracked_rows_are_complete():
    rows = bench.read_rows(REPO / bench.DEFAULT_OUT / "results.csv")
    assert all(tuple(r) == bench.COLUMNS for r in rows)
    assert len({r["key"] for r in rows}) == len(rows)
    base = next(r for r in rows if r["variant"] == bench.UNPRUNED and r["images"] == 1000)
    assert abs(base["top1"] - bench.EXPECTED_TOP1) <= bench.TOLERANCE
    for row in rows:
        if row["error"]:  # a restoration that raised: recorded without accuracy
            assert row["top1"] == row["top5"] == "" and row["variant"] != bench.UNPRUNED
            continue
        assert 0 <= row["top1"] <= row["top5"] <= 100
        if row["variant"] != bench.UNPRUNED:
            assert row["params_after"] < row["params_before"] and row["macs_after"] < row["macs_before"]
            assert row["layers_pruned"] == len(row["pruned_layers"].split()) > 0


def test_targets_say_not_met_when_the_default_loses():
    base = dict(top1=80.0)
    series = {name: {0.05: dict(top1=top1)} for name, top1 in (("prune", 70.0), ("nm", 76.5), ("lbyl", 76.0))}
    lines = targets(base, series)
    assert "**not met** (not above at 5 %)" in lines[0]
    assert lines[1].endswith("**met** (95.0 %)") and "**not measured**" in lines[2]


def test_keys_hold_the_method_settings():
    a, b = bench.Run("lbyl", 0.1, 1000), bench.Run("lbyl-mean-only", 0.1, 1000)
    assert a.key() != b.key() and "variance_correction=True" in a.key() and "variance_correction=False" in b.key()
    assert a.key() != bench.Run("lbyl", 0.2, 1000).key() != bench.Run("lbyl", 0.1, 50).key()


def test_plain_convs_compute_the_same():
    _require(_lite0_packages())
    from efficientnet_lite_pytorch import EfficientNet

    from benchmarks.imagenet_data import plain_convs

    torch.manual_seed(0)
    model = EfficientNet.from_name("efficientnet-lite0").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
        got = plain_convs(model)(x)
    assert torch.equal(got, expected)
    assert all(type(m) in (torch.nn.Conv2d, torch.nn.Linear) for m in model.modules() if hasattr(m, "weight") and m.weight.dim() > 1)


def test_the_packages_own_convolutions_restore_like_plain_ones():
    """The benchmark converts the same-padding convolutions; a user restoring the package's model
    as it is (its Conv2d subclass passes lbyl.layouts' probe) gets the same restored model."""
    _require(_lite0_packages())
    import copy

    from efficientnet_lite_pytorch import EfficientNet

    from benchmarks.imagenet_data import plain_convs

    torch.manual_seed(0)
    model = EfficientNet.from_name("efficientnet-lite0").eval()
    x = torch.randn(2, 3, 224, 224)
    layers = ["_blocks.1._expand_conv", "_blocks.3._expand_conv", "_conv_head"]  # stride-2 stages with uneven padding
    assert len(lbyl.plan(model, x[:1], 0.1).layers) == 19  # as many as the converted model has
    own, own_report = lbyl.restore(model, x[:1], 0.1, layers=layers)
    plain, plain_report = lbyl.restore(plain_convs(copy.deepcopy(model)), x[:1], 0.1, layers=layers)
    with torch.no_grad():
        assert torch.allclose(own(x), plain(x), atol=1e-5)
    assert [r.name for r in own_report.layers] == [r.name for r in plain_report.layers] == layers
    assert (own_report.macs_before, own_report.macs_after) == (plain_report.macs_before, plain_report.macs_after)


def test_smoke_run_writes_a_row_and_resumes(tmp_path, capsys):
    tarball = assets_root() / SAMPLES
    _require(f"shared asset absent (set LBYL_ASSETS): {tarball}" if not tarball.is_file() else "")
    _require(_lite0_packages())
    argv = ["--limit", "50", "--ratios", "0.1", "--methods", "lbyl", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    rows = bench.read_rows(tmp_path / "results.csv")
    assert [r["variant"] for r in rows] == [bench.UNPRUNED, "lbyl"]
    base, restored = rows
    assert all(r["images"] == 50 for r in rows)
    assert base["top1"] >= 70  # the preprocessing is right: a wrong one falls far lower
    assert restored["ratio"] == 0.1 and restored["method_object"] == repr(bench.VARIANTS["lbyl"]())
    assert restored["layers_pruned"] == len(restored["pruned_layers"].split()) > 0
    assert restored["params_after"] < restored["params_before"] == base["params_before"]
    assert restored["macs_after"] < restored["macs_before"] == base["macs_before"]
    assert 0 <= restored["top1"] <= restored["top5"] <= 100 and restored["error"] == ""
    before = (tmp_path / "results.csv").read_text()
    capsys.readouterr()
    assert bench.main(argv) == 0
    assert (tmp_path / "results.csv").read_text() == before
    assert "0 to do" in capsys.readouterr().err


def test_layer_page_names_the_layers_where_lbyl_loses_to_prune():
    from benchmarks.imagenet_layers import METHODS, render

    rows = [
        dict(layer="a", channels="16 -> 14", **{m: (0.01, 90.0) for m in METHODS}),
        dict(layer="b", channels="96 -> 86", prune=(0.08, 89.0), lbyl=(0.17, 83.0), **{"lbyl-gaussian": (0.13, 85.0)}),
    ]
    page = render(rows, 90.0, 0.1, 200, "a machine", 60.0)
    assert "| `b` | 96 -> 86 | 0.0800 | 89.0 | 0.1700 | 83.0 | 0.1300 | 85.0 |" in page
    assert "`lbyl` has a larger KL than `prune` in: `b`." in page


def test_propagated_covariance_predicts_the_recorded_variances_of_lite0():
    """Data-free check of the propagated input covariance on real weights: the variance it predicts
    along every filter of a pointwise producer, against what that producer's BatchNorm recorded
    during training. Printed per layer with ``-s``; docs/method.md section 5k quotes them."""
    _require(_lite0_packages())
    from benchmarks.imagenet_data import load_lite0
    from lbyl.graph import find_groups
    from lbyl.statistics import propagated_input_covariance

    model = load_lite0()
    groups, _ = find_groups(model, (torch.zeros(1, 3, 224, 224),))
    medians = {}
    for group in groups:
        covariance = propagated_input_covariance(group)
        if covariance is None:
            continue
        weight = group.producer.weight.detach().double().reshape(group.channels, -1)
        ratio = ((weight @ covariance @ weight.T).diagonal() / group.bn.running_var.double()).sqrt()
        medians[group.name] = float(ratio.median())
        low, high = ratio.quantile(0.1), ratio.quantile(0.9)
        print(f"{group.name}: predicted / recorded std, median {medians[group.name]:.2f}, 10-90 % {low:.2f}-{high:.2f}")
    assert len(medians) == 18  # every restorable layer but the stem, which reads the image
    assert all(0.8 < m < 1.1 for m in medians.values()), medians
