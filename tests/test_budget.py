"""MAC and parameter budgets: the smallest uniform ratio that meets the target."""
import pytest
import torch

import lbyl
from lbyl.budget import ratio_for_budget
from lbyl.models import build_model

X = torch.randn(1, 3, 32, 32)


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return build_model("resnet20").eval()


@pytest.mark.parametrize("what, target", [("macs", 0.75), ("params", 0.6)])
def test_budget_is_met_by_the_smallest_ratio(resnet20, what, target):
    plan = lbyl.plan(resnet20, X, **{f"target_{what}": target})
    after, before = (plan.macs_after, plan.macs_before) if what == "macs" else (plan.params_after, plan.params_before)
    assert after <= target * before
    ratio = plan.layers[0].ratio
    assert {layer.ratio for layer in plan.layers} == {ratio}  # uniform
    # the next smaller ratio at which a kept count changes misses the target
    channels = sorted({layer.channels for layer in plan.layers})
    smaller = max(r for r in {1 - k / c for c in channels for k in range(1, c + 1)} | {0.0} if r < ratio)
    looser = lbyl.plan(resnet20, X, smaller)
    assert (looser.macs_after if what == "macs" else looser.params_after) > target * before
    assert plan.targets == {what: target} and f"target: {what} <= {100 * target:.1f}%" in plan.table()


def test_restore_with_a_budget_reports_it(resnet20):
    small, report = lbyl.restore(resnet20, X, target_macs=0.7)
    assert report.macs_after <= 0.7 * report.macs_before
    assert report.settings["target_macs"] == 0.7
    assert "target macs <= 70.0%: reached" in report.table()
    # the same channels as the plan with that budget
    assert {r.name: r.kept for r in report.layers} == lbyl.plan(resnet20, X, target_macs=0.7).kept


def test_bisection_finds_the_first_ratio_under_the_limit():
    sizes = []

    def size_at(r):  # a made-up size: 100 * kept fraction of one 10-channel layer
        sizes.append(r)
        return round(100 * max(1, int(10 * (1 - r) + 1e-9)) / 10)

    assert ratio_for_budget(size_at, [10], 100, 0.55, "macs") == pytest.approx(0.5)
    assert len(sizes) <= 6  # log2(11 candidates) + the feasibility check
    with pytest.raises(ValueError, match=r"target_macs=0.05 cannot be met.*>= 0.1"):
        ratio_for_budget(size_at, [10], 100, 0.05, "macs")


def test_budget_leaves_the_model_untouched(resnet20):
    before = {k: v.clone() for k, v in resnet20.state_dict().items()}
    lbyl.plan(resnet20, X, target_params=0.8)
    assert all(torch.equal(before[k], v) for k, v in resnet20.state_dict().items())


def test_cli_plan_and_restore_with_a_budget(tmp_path, capsys):
    from lbyl.cli import main
    from lbyl.demo import demo_weights

    with demo_weights() as weights:
        assert main(["plan", "--model", "demo-cnn", "--weights", str(weights), "--target-macs", "0.5",
                     "--out", str(tmp_path / "plan.json")]) == 0  # fmt: skip
        assert "target: macs <= 50.0%" in capsys.readouterr().out
        assert main(["restore", "--model", "demo-cnn", "--weights", str(weights), "--target-params", "0.7",
                     "--out", str(tmp_path / "r")]) == 0  # fmt: skip
    report = lbyl.io.read_report(tmp_path / "r")
    assert report.params_after <= 0.7 * report.params_before and report.settings["target_params"] == 0.7
    with pytest.raises(SystemExit):  # a ratio and a budget together: argparse refuses
        main(["restore", "--model", "demo-cnn", "--weights", "x", "--ratio", "0.3", "--target-macs", "0.5", "--out", "o"])
