"""The redesigned pipeline: ``lbyl.plan`` (a dry run), method objects, validation at the boundary,
the rank-revealing solve and the invariants every LBYL solve keeps."""
import json
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lbyl
from helpers import conv_bn_relu_conv
from lbyl.delivery import BatchNormStats, ProducerStats, lbyl_delivery, restoration_loss, solve_normal_equations
from random_models import build, example_input

F64 = torch.float64
X = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(1), dtype=F64)


def two_stage(seed=0):
    """Conv -> BN -> ReLU -> Conv -> BN -> ReLU -> Conv (float64), with non-trivial BN statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1),
    ).to(F64).eval()  # fmt: skip
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_var.uniform_(0.5, 2.0)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.bias.uniform_(-0.3, 0.3)
    return model


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def param_count(model):
    return sum(p.numel() for p in model.parameters())


# --- plan: a dry run --------------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True])
def test_plan_leaves_the_model_untouched(train):
    model = two_stage().train(train)
    before, flags = state(model), {n: p.requires_grad for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    plan = lbyl.plan(model, X[:1], 0.5)
    assert_same_state(before, model.state_dict())
    assert model.training is train and all(m.training is train for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(dict(model.named_modules())[n] is m for n, m in modules.items())
    assert model[0].out_channels == 8 and model[3].in_channels == 8
    assert [layer.name for layer in plan.layers] == ["0", "3"]
    assert plan.kept == {"0": plan.layers[0].kept, "3": plan.layers[1].kept}
    assert [len(k) for k in plan.kept.values()] == [4, 3]


def test_plan_records_the_layers_their_consumers_and_the_skipped_ones():
    plan = lbyl.plan(two_stage(), X[:1], 0.5)
    first, second = plan.layers
    assert (first.name, first.channels, first.consumers, first.bn, first.activation, first.ratio) == (
        "0", 8, ["3"], "1", "relu", 0.5
    )
    assert (second.name, second.channels, second.consumers, second.bn) == ("3", 6, ["6"], "4")
    assert first.pruned == [c for c in range(8) if c not in first.kept]
    assert [s.name for s in plan.skipped] == ["6"] and plan.restorable == ["0", "3"]
    assert plan.criterion == "auto" and plan.seed == 0
    # the L2 criterion on the raw filters
    norms = two_stage()[0].weight.reshape(8, -1).norm(dim=1)
    assert first.kept == sorted(norms.argsort(descending=True)[:4].tolist())


@pytest.mark.parametrize("method", ["prune", "nm", "lbyl", "lbyl-paper", "nm-paper"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, {"3": 0.5}])
def test_predicted_size_is_the_restored_size(method, ratio):
    model = two_stage()
    plan = lbyl.plan(model, X[:1], ratio)
    restored, report = lbyl.restore(model, X[:1], plan, method)
    assert plan.params_before == report.params_before == param_count(model)
    assert plan.macs_before == report.macs_before
    assert plan.params_after == report.params_after == param_count(restored)
    assert plan.macs_after == report.macs_after
    assert plan.params_after < plan.params_before and plan.macs_after < plan.macs_before


SIZE_SPECS = [
    ("cnn", 3, 8, (("conv", 7, True, "max", False), ("res", 8, True, 2), ("conv", 3, False, None, True)), ("flatten", 5)),
    ("cnn", 1, 5, (("conv", 8, False, "avg", True), ("conv", 2, True, None, False)), ("gap", 0)),
    ("mlp", 7, (8, 3), True),
    ("mlp", 10, (7, 8, 2), False),
]


@pytest.mark.parametrize("spec", SIZE_SPECS)
def test_predicted_size_on_varied_architectures(spec):
    model = build(spec, seed=3)
    x = example_input(spec)
    plan = lbyl.plan(model, x, 0.4, layers="all")
    restored, report = lbyl.restore(model, x, plan, "prune")
    assert (plan.params_after, plan.macs_after) == (report.params_after, report.macs_after)
    assert plan.params_after == param_count(restored)
    assert (plan.params_before, plan.macs_before) == (report.params_before, report.macs_before)


def test_restore_of_a_plan_equals_restore_of_its_ratio():
    model = two_stage()
    plan = lbyl.plan(model, X[:1], 0.5, criterion="l1")
    a, report_a = lbyl.restore(model, X[:1], plan)
    b, report_b = lbyl.restore(model, X[:1], 0.5, criterion="l1")
    assert_same_state(a.state_dict(), b.state_dict())
    assert [r.kept for r in report_a.layers] == [r.kept for r in report_b.layers] == list(plan.kept.values())
    assert report_a.settings["criterion"] == "l1"


def test_edited_plan_keeps_exactly_those_channels():
    model = two_stage()
    plan = lbyl.plan(model, X[:1], 0.5)
    assert plan.keep("0", [6, 1, 7]) is plan
    assert plan.layer("0").kept == [1, 6, 7] and plan.layer("0").ratio is None
    assert plan.params_after is None and plan.macs_after is None  # unknown after an edit
    assert "predicted size: unknown" in plan.table() and "8 -> 3" in str(plan)
    restored, report = lbyl.restore(model, X[:1], plan, "lbyl")
    assert [r.kept for r in report.layers] == [[1, 6, 7], plan.layer("3").kept]
    assert restored[0].out_channels == restored[1].num_features == restored[3].in_channels == 3
    assert report.layers[0].channels_after == 3 and report.layers[0].ratio == pytest.approx(5 / 8)
    with torch.no_grad():
        # the kept filters are the original filters 1, 6, 7
        assert torch.equal(restored[0].weight, model[0].weight[[1, 6, 7]])
        assert torch.equal(restored[1].running_var, model[1].running_var[[1, 6, 7]])
    # a fresh plan with the edited channels predicts the restored size again
    again = lbyl.plan(model, X[:1], kept=plan.kept)
    assert again.params_after == report.params_after == param_count(restored)
    assert again.macs_after == report.macs_after


def test_plan_keep_refuses_bad_channels():
    plan = lbyl.plan(two_stage(), X[:1], 0.5)
    kept = plan.layer("0").kept
    for bad, error, match in (
        ([8], ValueError, "out of range"), ([-1], ValueError, "out of range"), ([], ValueError, "none kept"),
        ([1, 1], ValueError, "repeated"), ([0.5], TypeError, "ints"), ([True], TypeError, "ints"),
        ("abc", TypeError, "list of ints"),
    ):  # fmt: skip
        with pytest.raises(error, match=match):
            plan.keep("0", bad)
        assert plan.layer("0").kept == kept  # unchanged by a refused edit
    with pytest.raises(KeyError, match="'conv9' is not in this plan"):
        plan.keep("conv9", [0])
    assert plan.keep("0", torch.tensor([3, 0])).layer("0").kept == [0, 3]


def test_plan_json_round_trip(tmp_path):
    model = two_stage()
    plan = lbyl.plan(model, X[:1], {"0": 0.5, "3": 0.25}, criterion="random", seed=7)
    text = plan.to_json()
    again = lbyl.Plan.from_json(text)
    assert again == plan and again.to_dict() == plan.to_dict()
    assert json.loads(text)["version"] == 1 and json.loads(text)["seed"] == 7
    assert all(isinstance(layer, lbyl.PlannedLayer) for layer in again.layers)
    path = tmp_path / "plan.json"
    plan.keep("3", [0, 2, 4, 5]).to_json(path)
    from_file = lbyl.Plan.from_json(path)
    assert from_file == plan and from_file.params_after is None
    assert lbyl.Plan.from_dict(plan.to_dict()) == plan
    # a round-tripped plan restores exactly like the original
    a, _ = lbyl.restore(model, X[:1], plan)
    b, _ = lbyl.restore(model, X[:1], from_file)
    assert_same_state(a.state_dict(), b.state_dict())
    with pytest.raises(ValueError, match="plan version 2 is not supported"):
        lbyl.Plan.from_dict(dict(plan.to_dict(), version=2))


def test_plan_for_another_model_is_refused():
    plan = lbyl.plan(two_stage(), X[:1], 0.5)
    narrower = conv_bn_relu_conv(6)
    with pytest.raises(ValueError, match="plan says '0' has 8 channels, the model has 6"):
        lbyl.restore(narrower, X[:1], plan)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    with pytest.raises(ValueError, match=r"plan names layer '0', which is not a restorable layer.*layers: 1\)"):
        lbyl.restore(mlp, torch.randn(1, 4), plan)


# --- kept= and callable criteria ----------------------------------------------------------------


def test_restore_with_kept_equals_restore_with_the_same_plan():
    model = two_stage()
    kept = {"0": [7, 0, 3, 5], "3": [1, 2]}
    a, report_a = lbyl.restore(model, X[:1], kept=kept)
    plan = lbyl.plan(model, X[:1], kept=kept)
    b, report_b = lbyl.restore(model, X[:1], plan)
    edited = lbyl.plan(model, X[:1], 0.5).keep("0", kept["0"]).keep("3", kept["3"])
    c, _ = lbyl.restore(model, X[:1], edited)
    assert_same_state(a.state_dict(), b.state_dict())
    assert_same_state(a.state_dict(), c.state_dict())
    assert [r.kept for r in report_a.layers] == [[0, 3, 5, 7], [1, 2]] == [r.kept for r in report_b.layers]
    assert plan.kept == {"0": [0, 3, 5, 7], "3": [1, 2]} and all(layer.ratio is None for layer in plan.layers)
    assert report_a.settings["ratio"] == report_b.settings["ratio"]
    # only the named layers are pruned
    d, report_d = lbyl.restore(model, X[:1], kept={"3": [0, 5]})
    assert [r.name for r in report_d.layers] == ["3"] and d[0].out_channels == 8 and d[3].out_channels == 2


def test_kept_names_must_be_restorable_layers():
    with pytest.raises(ValueError, match="layer '6' is not a restorable layer.*restorable layers: 0, 3"):
        lbyl.restore(two_stage(), X[:1], kept={"6": [0]})
    with pytest.raises(ValueError, match="out of range"):
        lbyl.restore(two_stage(), X[:1], kept={"0": [8]})


def smallest_first(filters):
    return -filters.norm(dim=1)


def test_callable_criterion_ranks_the_filters():
    model = two_stage()
    plan = lbyl.plan(model, X[:1], 0.5, criterion=smallest_first)
    norms = model[0].weight.reshape(8, -1).norm(dim=1)
    assert plan.layer("0").kept == sorted(norms.argsort()[:4].tolist())  # the smallest filters stay
    assert plan.layer("0").kept != lbyl.plan(model, X[:1], 0.5).layer("0").kept
    assert plan.criterion == "smallest_first"
    restored, report = lbyl.restore(model, X[:1], 0.5, criterion=lambda f: -f.norm(dim=1))
    assert report.layers[0].kept == plan.layer("0").kept and report.settings["criterion"] == "<lambda>"
    assert report.layers[0].criterion == "<lambda>"
    # the callable sees one row per filter (N x M, float64)
    seen = []
    lbyl.plan(model, X[:1], 0.5, criterion=lambda f: seen.append((tuple(f.shape), f.dtype)) or f.sum(dim=1))
    assert seen == [((8, 27), F64), ((6, 72), F64)]


@pytest.mark.parametrize(
    "criterion, match",
    [
        (lambda f: f.norm(), r"returned scores of shape \(\) for 8 filters"),
        (lambda f: f.norm(dim=0), r"returned scores of shape \(27,\) for 8 filters"),
        (lambda f: torch.full((f.shape[0],), math.nan), "NaN or infinite"),
        (lambda f: torch.full((f.shape[0],), math.inf), "NaN or infinite"),
    ],
)
def test_callable_criterion_with_bad_scores_is_refused(criterion, match):
    model = two_stage()
    before = state(model)
    with pytest.raises(ValueError, match=match):
        lbyl.restore(model, X[:1], 0.5, criterion=criterion, inplace=True)
    assert_same_state(before, model.state_dict())
    with pytest.raises(ValueError, match=match):
        lbyl.plan(model, X[:1], 0.5, criterion=criterion)


def test_unknown_criterion_names_the_callable_option():
    with pytest.raises(ValueError, match="unknown criterion 'norm'.*or pass a callable"):
        lbyl.plan(two_stage(), X[:1], 0.5, criterion="norm")


# --- method objects ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: lbyl.LBYL(lambda1=-1), ValueError, "lambda1 must be a finite number >= 0, got -1"),
        (lambda: lbyl.LBYL(lambda1=math.nan), ValueError, "lambda1 must be a finite number >= 0"),
        (lambda: lbyl.LBYL(lambda1=True), ValueError, "lambda1 must be a finite number >= 0"),
        (lambda: lbyl.LBYL(lambda2="aut"), ValueError, "lambda2 must be a finite number >= 0 or 'auto'"),
        (lambda: lbyl.LBYL(lambda2=-0.1), ValueError, "lambda2 must be a finite number >= 0 or 'auto'"),
        (lambda: lbyl.LBYL(input_model="x"), ValueError, "unknown input_model 'x'; choose one of propagated, white, bn"),
        (lambda: lbyl.LBYL(mean_correction=None), TypeError, "mean_correction must be True or False"),
        (lambda: lbyl.NeuronMerging(mean_correction="yes"), TypeError, "mean_correction must be True or False"),
        (lambda: lbyl.Prune(variance_correction=1), TypeError, "variance_correction must be True or False"),
        (lambda: lbyl.paper.NeuronMerging(threshold=2), ValueError, r"threshold must be a cosine similarity in \[-1, 1\]"),
        (lambda: lbyl.paper.NeuronMerging(threshold="0.4"), ValueError, "threshold must be a cosine similarity"),
        (lambda: lbyl.paper.LBYL(lambda2="auto"), ValueError, "lambda2 must be a finite number >= 0, got 'auto'"),
        (lambda: lbyl.paper.LBYL(lambda1=-2), ValueError, "lambda1 must be a finite number >= 0"),
        (lambda: lbyl.as_method(lbyl.LBYL), TypeError, r"not the class: pass LBYL\(\) instead"),
        (lambda: lbyl.as_method("merge"), ValueError, "unknown method 'merge'; choose one of prune, nm, nm-paper"),
        (lambda: lbyl.as_method(3), ValueError, "unknown method 3"),
    ],
)
def test_method_options_are_validated(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_valid_method_options_are_kept():
    method = lbyl.LBYL(1, "auto", "bn", mean_correction=False, variance_correction=False)
    assert method.settings() == {"method": "lbyl", "lambda1": 1.0, "lambda2": "auto", "input_model": "bn",
                                 "scale_spread": 0.5, "mean_correction": False, "variance_correction": False}  # fmt: skip
    assert isinstance(method.lambda1, float)
    assert lbyl.paper.NeuronMerging(-1).threshold == -1.0 and lbyl.paper.NeuronMerging(None).threshold is None
    assert lbyl.paper.NeuronMerging(0.45).settings() == {"method": "nm-paper", "threshold": 0.45,
                                                         "mean_correction": False, "variance_correction": False}  # fmt: skip
    assert repr(lbyl.LBYL(lambda2=0.1)) == (
        "lbyl.LBYL(lambda1=0.0, lambda2=0.1, input_model='propagated', scale_spread=0.5, mean_correction=True, "
        "variance_correction=True)"
    )
    assert repr(lbyl.paper.NeuronMerging(0.45)).startswith("lbyl.paper.NeuronMerging(threshold=0.45")


def test_methods_are_equal_and_hash_by_settings():
    assert lbyl.LBYL(lambda2=0.1) == lbyl.LBYL(0, 0.1) and hash(lbyl.LBYL(lambda2=0.1)) == hash(lbyl.LBYL(0, 0.1))
    assert lbyl.LBYL(lambda1=1) == lbyl.LBYL(lambda1=1.0)
    assert lbyl.LBYL(lambda2=0.1) != lbyl.LBYL(lambda2=0.2)
    assert lbyl.LBYL() != lbyl.LBYL(mean_correction=False) and lbyl.LBYL() != lbyl.LBYL(input_model="bn")
    assert lbyl.NeuronMerging() != lbyl.Prune() and lbyl.NeuronMerging() != lbyl.paper.NeuronMerging()
    assert lbyl.LBYL() != lbyl.paper.LBYL() and lbyl.LBYL() != "lbyl"
    assert len({lbyl.LBYL(), lbyl.LBYL(), lbyl.as_method("lbyl"), lbyl.NeuronMerging(), lbyl.as_method("nm")}) == 2
    assert {lbyl.Prune(): 1}[lbyl.as_method("prune")] == 1


def test_shortcuts_are_the_defaults():
    assert lbyl.as_method("nm-paper") == lbyl.paper.NeuronMerging()
    assert lbyl.as_method("lbyl-paper") == lbyl.paper.LBYL()
    assert lbyl.as_method("lbyl") == lbyl.LBYL() and lbyl.as_method("nm") == lbyl.NeuronMerging()
    assert lbyl.as_method("prune") == lbyl.Prune()
    assert [lbyl.as_method(name).name for name in lbyl.METHODS] == list(lbyl.METHODS)
    method = lbyl.LBYL(lambda2=0.3)
    assert lbyl.as_method(method) is method
    # the corrections: on for LBYL by default, off for the baselines and the released variants
    for name in lbyl.METHODS:
        method = lbyl.as_method(name)
        assert method.mean_correction is method.variance_correction is (name == "lbyl"), name


def test_report_settings_are_the_method_settings():
    model = two_stage()
    method = lbyl.LBYL(0.5, 0.01, "bn", variance_correction=False)
    _, report = lbyl.restore(model, X[:1], 0.5, method, criterion="l1", seed=3, order="sequential")
    assert report.settings == dict(method.settings(), criterion="l1", seed=3, order="sequential", ratio=0.5)
    _, report = lbyl.restore(model, X[:1], {"3": 0.5}, "nm-paper")
    assert report.settings == dict(lbyl.paper.NeuronMerging().settings(), criterion="auto", seed=0,
                                   order="original", ratio={"3": 0.5})  # fmt: skip
    assert "bias_correction" not in report.settings


def test_string_and_object_restore_identically():
    model = two_stage()
    for name in lbyl.METHODS:
        a, report_a = lbyl.restore(model, X[:1], 0.5, name)
        b, report_b = lbyl.restore(model, X[:1], 0.5, lbyl.as_method(name))
        assert_same_state(a.state_dict(), b.state_dict())
        assert report_a.settings == report_b.settings and report_a.layers[0].method == name


class ToFirstKept(lbyl.Method):
    """Every pruned channel is delivered, with weight 1, to the first kept channel."""

    name = "to-first"

    def delivery(self, stats, kept, pruned, activation):
        delivery = torch.zeros(len(kept), len(pruned), dtype=F64, device=stats.filters.device)
        delivery[0] = 1.0
        return delivery


def test_a_custom_method_goes_through_restore():
    model = two_stage()
    restored, report = lbyl.restore(model, X[:1], 0.5, ToFirstKept(), layers=["0"])
    record = report.layers[0]
    kept = record.kept
    pruned = [c for c in range(8) if c not in kept]
    assert record.method == "to-first" and report.settings["method"] == "to-first"
    assert report.settings["mean_correction"] is False and report.settings["variance_correction"] is False
    assert record.condition is None and record.solve == ""
    # the consumer's columns of the pruned channels were added to the first kept channel's
    original = model[3].weight.detach()
    expected = original[:, kept].clone()
    expected[:, 0] += original[:, pruned].sum(dim=1)
    assert torch.allclose(restored[3].weight, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(restored[4].running_var, model[4].running_var)  # no variance correction
    # the report scores its delivery matrix on the common loss
    stats = ProducerStats(model[0].weight.detach().reshape(8, -1).clone(), None,
                          BatchNormStats(model[1].weight.detach(), model[1].bias.detach(), model[1].running_mean,
                                         model[1].running_var, model[1].eps))  # fmt: skip
    k, p = torch.tensor(kept), torch.tensor(pruned)
    loss = restoration_loss(stats, k, p, ToFirstKept().delivery(stats, k, p, "relu"))
    assert record.re == pytest.approx(float(loss["re"].sum()), rel=1e-12)
    assert record.ae == pytest.approx(float(loss["ae"].sum()), rel=1e-12) and record.ae == len(pruned)


def test_a_custom_method_with_corrections_and_its_errors():
    model = two_stage()
    corrected, _ = lbyl.restore(model, X[:1], 0.5, ToFirstKept(mean_correction=True, variance_correction=True),
                                layers=["0"])  # fmt: skip
    plain, _ = lbyl.restore(model, X[:1], 0.5, ToFirstKept(), layers=["0"])
    assert torch.equal(corrected[3].weight, plain[3].weight)
    assert not torch.allclose(corrected[4].running_mean, plain[4].running_mean)  # the mean offset
    assert not torch.allclose(corrected[4].running_var, plain[4].running_var)  # the variance correction

    class WrongShape(lbyl.Method):
        def delivery(self, stats, kept, pruned, activation):
            return torch.zeros(len(pruned), len(kept) + 1)

    with pytest.raises(ValueError, match=r"returned a delivery of shape .*must be a tensor of shape \(kept, pruned\)"):
        lbyl.restore(model, X[:1], 0.5, WrongShape())
    with pytest.raises(NotImplementedError, match="must implement delivery"):
        lbyl.restore(model, X[:1], 0.5, lbyl.Method())


# --- restore's argument checks ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(ratio=0.5, inplace="yes"), TypeError, "inplace must be True or False, got 'yes'"),
        (dict(ratio=0.5, inplace=1), TypeError, "inplace must be True or False"),
        (dict(ratio=0.5, seed=1.5), TypeError, "seed must be an int, got 1.5"),
        (dict(ratio=0.5, seed=True), TypeError, "seed must be an int"),
        (dict(ratio=0.5, layers=3), TypeError, "layers must be a layer name"),
        (dict(ratio=0.5, layers=["0", 3]), TypeError, "layers must be a layer name"),
        (dict(ratio={"0": 0.5}, layers=["0"]), ValueError, "a ratio mapping already names its layers"),
        (dict(ratio=0.5, kept={"0": [0, 1]}), ValueError, "pass either ratio= or kept=, not both"),
        (dict(ratio={"0": 0.5}, kept={"0": [0, 1]}), ValueError, "pass either ratio= or kept=, not both"),
        (dict(), ValueError, r"pass ratio= \(a fraction in \[0, 1\) or \{layer: ratio\}\) or kept="),
        (dict(kept={"0": [0]}, layers=["0"]), ValueError, "kept= already names its layers"),
        (dict(kept=[[0, 1]]), TypeError, "kept must be a mapping"),
        (dict(ratio={0: 0.5}), TypeError, "ratio mapping keys must be layer names"),
        (dict(ratio=0.5, order="reverse"), ValueError, "unknown order 'reverse'"),
        (dict(ratio=0.5, method="merge"), ValueError, "unknown method 'merge'"),
    ],
)
def test_restore_arguments_are_validated(kwargs, error, match):
    model = two_stage()
    before = state(model)
    with pytest.raises(error, match=match):
        lbyl.restore(model, X[:1], **kwargs)
    assert_same_state(before, model.state_dict())
    assert model[0].out_channels == 8
    if "inplace" not in kwargs and "order" not in kwargs and "method" not in kwargs:
        with pytest.raises(error, match=match):  # plan() checks its arguments the same way
            lbyl.plan(model, X[:1], **kwargs)


# --- the solve: condition numbers and no cliff ---------------------------------------------------


def test_report_condition_is_finite_for_a_well_posed_layer():
    model = two_stage()
    _, report = lbyl.restore(model, X[:1], 0.5, lbyl.LBYL())
    for record in report.layers:
        assert record.solve == "white"
        assert record.condition is not None and math.isfinite(record.condition) and record.condition >= 1
    # the condition number of the normal matrix the first layer solved: its kept BN-scaled filters' Gram
    bn = model[1]
    g = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    w = g[:, None] * model[0].weight.detach().reshape(8, -1)
    kept = report.layers[0].kept
    values = torch.linalg.eigvalsh(w[kept] @ w[kept].T)
    exact = float(values[-1] / values[0])
    # a well-conditioned system is solved by Cholesky; its condition number comes from power
    # iterations, whose Rayleigh quotients estimate it from below
    assert 0.97 * exact <= report.layers[0].condition <= exact * (1 + 1e-9)
    # a larger lambda2 conditions the system better
    _, ridge = lbyl.restore(model, X[:1], 0.5, lbyl.LBYL(lambda2=1.0))
    assert ridge.layers[0].condition < report.layers[0].condition
    assert ridge.layers[0].lambda2 == 1.0
    # methods without a solve report none
    _, nm = lbyl.restore(model, X[:1], 0.5, "nm")
    assert [r.condition for r in nm.layers] == [None, None]


def test_solve_normal_equations_on_a_well_conditioned_system():
    gen = torch.Generator().manual_seed(0)
    root = torch.randn(5, 9, generator=gen, dtype=F64)
    matrix = root @ root.T
    rhs = torch.randn(5, 3, generator=gen, dtype=F64)
    solution, condition = solve_normal_equations(matrix, rhs)
    torch.testing.assert_close(solution, torch.linalg.solve(matrix, rhs), rtol=1e-10, atol=1e-12)
    assert condition == pytest.approx(float(torch.linalg.cond(matrix)), rel=1e-8)
    empty, condition = solve_normal_equations(torch.zeros(0, 0, dtype=F64), torch.zeros(0, 2, dtype=F64))
    assert empty.shape == (0, 2) and condition == 1.0
    zero, condition = solve_normal_equations(torch.zeros(2, 2, dtype=F64), torch.ones(2, 1, dtype=F64))
    assert torch.equal(zero, torch.zeros(2, 1, dtype=F64)) and condition == math.inf


def near_twins(gap):
    """Kept filters e1 and e1 + gap * e2; the pruned filter has a component along e2 that only
    their difference (tiny) can rebuild: exact least squares needs a coefficient of 0.5 / gap."""
    filters = torch.zeros(3, 4, dtype=F64)
    filters[0, 0] = 1.0
    filters[1, 0], filters[1, 1] = 1.0, gap
    filters[2] = torch.tensor([2.0, 0.5, 0.3, 0.0], dtype=F64)
    return ProducerStats(filters)


@pytest.mark.parametrize("gap", [1e-6, 1e-8, 1e-10])
def test_nearly_identical_kept_filters_have_no_cliff(gap):
    kept, pruned = torch.tensor([0, 1]), torch.tensor([2])
    reference = lbyl_delivery(near_twins(1e-10), kept, pruned)
    delivery = lbyl_delivery(near_twins(gap), kept, pruned)
    # bounded: the blow-up direction is cut, whichever side of double precision the gap lies
    assert delivery.abs().max() < 5 and reference.abs().max() < 5
    torch.testing.assert_close(delivery, reference, rtol=0, atol=1e-5)
    # the minimum-norm answer along the shared direction: the projection 2 e1 split evenly
    torch.testing.assert_close(delivery, torch.tensor([[1.0], [1.0]], dtype=F64), rtol=0, atol=1e-5)
    # the same through the method object, which reports the ill-conditioning
    solution = lbyl.LBYL().solve(near_twins(gap), kept, pruned, "identity")
    torch.testing.assert_close(solution.delivery, delivery, rtol=0, atol=1e-12)
    assert solution.condition > 1e10
    matrix = near_twins(gap).filters[kept] @ near_twins(gap).filters[kept].T
    rhs = near_twins(gap).filters[kept] @ near_twins(gap).filters[pruned].T
    direct, condition = solve_normal_equations(matrix, rhs)
    torch.testing.assert_close(direct, delivery, rtol=0, atol=1e-12)
    assert condition == solution.condition


def test_the_cut_off_is_relative_to_the_largest_eigenvalue():
    # a well-separated small direction is solved exactly: only eigenvalues <= rcond * largest are null
    kept, pruned = torch.tensor([0, 1]), torch.tensor([2])
    stats = near_twins(1e-3)  # smallest eigenvalue ~ 2.5e-7 of the largest: above 1e-10
    delivery = lbyl_delivery(stats, kept, pruned)
    assert restoration_loss(stats, kept, pruned, delivery)["re"].item() == pytest.approx(0.09, rel=1e-6)
    torch.testing.assert_close(delivery, torch.tensor([[2.0 - 500.0], [500.0]], dtype=F64), rtol=1e-8, atol=0)
    # with a coarser cut-off the same system is treated as rank one
    matrix, rhs = stats.filters[kept] @ stats.filters[kept].T, stats.filters[kept] @ stats.filters[pruned].T
    coarse, _ = solve_normal_equations(matrix, rhs, rcond=1e-6)
    assert coarse.abs().max() < 5


# --- the LBYL objective is never worse than pruning ------------------------------------------------


@st.composite
def random_layers(draw):
    n = draw(st.integers(2, 12))
    m = draw(st.integers(1, 20))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    filters = torch.randn(n, m, generator=gen, dtype=F64) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    for row in draw(st.lists(st.integers(0, n - 1), max_size=2)):  # dead filters
        filters[row] = 0.0
    if n > 2 and draw(st.booleans()):  # an exact or near duplicate
        filters[1] = filters[0] * (1 + draw(st.sampled_from([0.0, 1e-9, 1e-5])))
    bn = None
    if draw(st.booleans()):
        gamma = torch.rand(n, generator=gen, dtype=F64) + 0.5
        if draw(st.booleans()):
            gamma[0] = 0.0
        bn = BatchNormStats(gamma, torch.randn(n, generator=gen, dtype=F64), torch.randn(n, generator=gen, dtype=F64),
                            torch.rand(n, generator=gen, dtype=F64) + 0.1, 1e-5)  # fmt: skip
    bias = torch.randn(n, generator=gen, dtype=F64) if draw(st.booleans()) else None
    order = torch.randperm(n, generator=gen)
    n_kept = draw(st.integers(1, n - 1))
    kept, pruned = order[:n_kept].sort().values, order[n_kept:].sort().values
    return ProducerStats(filters, bias, bn), kept, pruned


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer=random_layers(), lambda1=st.sampled_from([0.0, 0.5]))
def test_lbyl_white_objective_is_never_above_pruning(layer, lambda1):
    stats, kept, pruned = layer
    solution = lbyl.LBYL(lambda1=lambda1).solve(stats, kept, pruned, "identity")
    assert solution.space == "white"
    prune = lbyl.Prune().solve(stats, kept, pruned, "identity")
    assert torch.isfinite(solution.delivery).all()
    objective = solution.loss["re"] + lambda1 * solution.loss["be"]
    baseline = prune.loss["re"] + lambda1 * prune.loss["be"]
    scale = float(baseline.sum()) + 1e-300
    # S = 0 is feasible: per pruned channel and in total, the minimiser does at least as well
    assert float(objective.sum()) <= float(baseline.sum()) + 1e-9 * scale
    assert (objective <= baseline + 1e-9 * scale).all()
    # and the report's residual (from the normal equations' products) is the direct one
    direct = restoration_loss(stats, kept, pruned, solution.delivery)
    torch.testing.assert_close(solution.loss["re"], direct["re"], rtol=1e-6, atol=1e-9 * scale)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.sampled_from(SIZE_SPECS),
    seed=st.integers(0, 2**10),
    ratio=st.floats(0.1, 0.9),
)
def test_restored_lbyl_layers_lose_no_more_than_pruning(spec, seed, ratio):
    model = build(spec, seed=seed, dtype=F64)
    x = example_input(spec, dtype=F64)
    plan = lbyl.plan(model, x, ratio, layers="all")
    _, lbyl_report = lbyl.restore(model, x, plan, lbyl.LBYL())
    _, prune_report = lbyl.restore(model, x, plan, "prune")
    for ours, pruned in zip(lbyl_report.layers, prune_report.layers):
        assert ours.name == pruned.name and ours.kept == pruned.kept
        if ours.solve == "white":  # the error measured in the white-input metric it minimised
            assert ours.re <= pruned.re * (1 + 1e-9) + 1e-12, ours.name


# --- library code leaves global state alone -------------------------------------------------------


def test_plan_and_restore_leave_the_thread_count_and_grad_mode_alone():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = two_stage()
        lbyl.plan(model, X[:1], 0.5)
        lbyl.restore(model, X[:1], 0.5, lbyl.LBYL(input_model="bn"))
        assert torch.get_num_threads() == 2
        assert torch.is_grad_enabled()
    finally:
        torch.set_num_threads(threads)


# --- the sweep takes method objects ----------------------------------------------------------------


def test_sweep_rows_describe_each_method_object():
    from lbyl.data import evaluate
    from lbyl.sweep import FIELDS, UNPRUNED, run_sweep

    model = nn.Sequential(*two_stage(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()  # 4 logits
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(24, 3, 10, 10, generator=gen, dtype=F64)
    labels = torch.randint(0, 4, (24,), generator=gen)
    ratio_method = lbyl.LBYL(lambda1=0.5, lambda2="auto", input_model="bn")
    rows = run_sweep(model, X[:1], images, labels, [0.5], [ratio_method, "prune", lbyl.paper.LBYL(0.2, 0.1)],
                     ["l2"], progress=False, channels_last=False)  # fmt: skip
    assert [r["method"] for r in rows] == [UNPRUNED, "lbyl", "prune", "lbyl-paper"]
    assert all(set(r) == set(FIELDS) for r in rows)
    lbyl_row, prune_row, paper_row = rows[1:]
    assert (lbyl_row["lambda1"], lbyl_row["lambda2"], lbyl_row["bias_correction"], lbyl_row["input_model"]) == (
        0.5, "auto", True, "bn"
    )
    assert (prune_row["lambda1"], prune_row["lambda2"], prune_row["bias_correction"], prune_row["input_model"]) == (
        "", "", False, ""
    )
    assert (paper_row["lambda1"], paper_row["lambda2"], paper_row["bias_correction"]) == (0.2, 0.1, False)
    # each row is the restoration that method object gives
    restored, report = lbyl.restore(model, X[:1], 0.5, ratio_method)
    assert lbyl_row["accuracy"] == evaluate(restored, images, labels)
    assert lbyl_row["params"] == report.params_after and lbyl_row["re"] == pytest.approx(sum(r.re for r in report.layers))
