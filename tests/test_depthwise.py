"""Depthwise chains (inverted residuals): expand 1x1 -> BN -> act -> depthwise -> BN -> act -> project 1x1."""
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lbyl
from lbyl import activations
from lbyl.delivery import BatchNormStats, ProducerStats
from lbyl.depthwise import depthwise_chain_stats, spatial_correlation
from helpers import measure_batchnorms


class InvertedResidual(nn.Module):
    def __init__(self, channels=8, hidden=24, act=F.relu6, prelu=False, multiplier=1):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(channels)
        self.expand = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act1 = nn.PReLU(hidden) if prelu else None
        self.dw = nn.Conv2d(hidden, hidden * multiplier, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden * multiplier)
        self.project = nn.Conv2d(hidden * multiplier, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, 10)
        self.act = act

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = self.bn1(self.expand(x))
        y = self.act1(y) if self.act1 is not None else self.act(y)
        y = self.act(self.bn2(self.dw(y)))
        x = x + self.bn3(self.project(y))
        return self.head(x.mean((2, 3)))


def randomise_batchnorms(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            bn.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
            bn.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            bn.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            bn.bias.data.copy_(torch.rand(n, generator=generator) * 2 - 1)
    return model.eval()


def copy_channel(model, source=2, copy=5):
    with torch.no_grad():
        for t in [model.expand.weight, model.dw.weight, model.bn1.weight, model.bn1.bias, model.bn1.running_mean,
                  model.bn1.running_var, model.bn2.weight, model.bn2.bias, model.bn2.running_mean,
                  model.bn2.running_var]:  # fmt: skip
            t[copy] = t[source]


X = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def test_the_chain_is_one_group_through_the_depthwise_conv():
    torch.manual_seed(0)
    model = randomise_batchnorms(InvertedResidual())
    groups, skipped = lbyl.find_groups(model, X)
    (group,) = groups
    assert group.name == "expand" and group.stage.name == "dw" and group.stage.bn_name == "bn2"
    assert [c.name for c in group.consumers] == ["project"]
    relu6 = activations.as_activation("relu6")
    assert group.activation == relu6 and group.consumer_activation == relu6
    reasons = {s.name: s.reason for s in skipped}
    assert reasons["dw"] == "depthwise convolution: pruned and restored with expand's channels"
    plan = lbyl.plan(model, X, 0.25)
    assert plan.layer("expand").stage == "dw"
    assert "project (through dw)" in plan.table()
    assert lbyl.Plan.from_json(plan.to_json()).layer("expand").stage == "dw"


@pytest.mark.parametrize("method", ["lbyl", "nm", "lbyl-paper", "nm-paper"])
def test_a_channel_copied_at_every_stage_is_restored_exactly(method):
    torch.manual_seed(0)
    data = torch.randn(256, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    model = measure_batchnorms(InvertedResidual(), data.split(64))
    copy_channel(model)
    kept = [c for c in range(24) if c != 5]
    restored, report = lbyl.restore(model, X, kept={"expand": kept}, method=method)
    with torch.no_grad():
        assert torch.allclose(restored(X), model(X), atol=1e-5)
    pruned, _ = lbyl.restore(model, X, kept={"expand": kept}, method="prune")
    with torch.no_grad():
        assert (pruned(X) - model(X)).abs().max() > 1e-2  # the copy mattered


def test_every_stage_loses_the_channels_physically():
    torch.manual_seed(0)
    model = randomise_batchnorms(InvertedResidual(prelu=True))
    restored, report = lbyl.restore(model, X, 0.5)
    assert restored.expand.out_channels == 12 and restored.bn1.num_features == 12
    assert restored.act1.weight.numel() == 12
    assert (restored.dw.in_channels, restored.dw.out_channels, restored.dw.groups) == (12, 12, 12)
    assert restored.bn2.num_features == 12 and restored.project.in_channels == 12
    assert report.macs_after < report.macs_before
    with torch.no_grad():
        assert torch.isfinite(restored(X)).all()
    assert model.dw.groups == 24  # the caller's model is untouched
    same, _ = lbyl.restore(model, X, 0.0)
    with torch.no_grad():
        assert torch.equal(same(X), model(X))


def test_a_depth_multiplier_is_skipped_with_the_reason():
    model = randomise_batchnorms(InvertedResidual(multiplier=2))
    groups, skipped = lbyl.find_groups(model, X)
    assert not any(g.name == "expand" for g in groups)
    assert {s.name: s.reason for s in skipped}["expand"] == "feeds the depthwise convolution dw, which widens each channel alone"


@pytest.mark.parametrize("act", [F.relu6, F.relu, F.silu, F.hardswish])
def test_restoration_beats_pruning_on_a_calibrated_block(act):
    torch.manual_seed(0)
    model = InvertedResidual(channels=8, hidden=32, act=act)
    data = torch.randn(512, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    measure_batchnorms(model, data.split(64))
    test = data[:128]
    with torch.no_grad():
        reference = model(test)
    errors = {}
    for method in ["prune", "nm", "lbyl"]:
        restored, _ = lbyl.restore(model, X, 0.4, method)
        with torch.no_grad():
            errors[method] = float(((restored(test) - reference) ** 2).mean())
    assert errors["lbyl"] < errors["prune"] and errors["lbyl"] < errors["nm"], errors


@pytest.mark.parametrize("name", ["relu", "relu6", "silu", "hardswish", "gelu", "tanh"])
def test_mehler_expansion_matches_the_pairwise_rule(name):
    generator = torch.Generator().manual_seed(3)
    n = 30
    mean = torch.randn(n, generator=generator, dtype=torch.float64)
    w = torch.randn(n, 6, generator=generator, dtype=torch.float64)
    covariance = w @ w.T / 3
    act = activations.as_activation(name)
    fast = activations.hermite_channel_covariance(act, mean, covariance)
    pairwise = activations.channel_covariance(act, mean, covariance)
    assert torch.allclose(fast, pairwise, atol=2e-4 * float(pairwise.abs().max()))
    assert torch.equal(fast.diagonal(), activations.variance(act, mean, covariance.diagonal().sqrt()))


def test_spatial_correlation_is_recovered_from_consistent_variances():
    generator = torch.Generator().manual_seed(4)
    kernels = torch.randn(40, 9, generator=generator, dtype=torch.float64)
    var_a = torch.rand(40, generator=generator, dtype=torch.float64) + 0.5
    for rho in (0.0, 0.3, 0.8, 1.0):
        measured = var_a * ((1 - rho) * (kernels**2).sum(1) + rho * kernels.sum(1) ** 2)
        assert spatial_correlation(var_a, kernels, measured) == pytest.approx(rho, abs=1e-9)


def test_chain_statistics_keep_the_batchnorm_marginals():
    generator = torch.Generator().manual_seed(5)
    n = 16

    def bn():
        return BatchNormStats(torch.rand(n, generator=generator, dtype=torch.float64) + 0.5,
                              torch.randn(n, generator=generator, dtype=torch.float64),
                              torch.randn(n, generator=generator, dtype=torch.float64),
                              torch.rand(n, generator=generator, dtype=torch.float64) + 0.5, 1e-5)  # fmt: skip

    producer = ProducerStats(torch.randn(n, 8, generator=generator, dtype=torch.float64), None, bn())
    bn2 = bn()
    stats = depthwise_chain_stats(producer, activations.as_activation("relu6"),
                                  torch.randn(n, 9, generator=generator, dtype=torch.float64), None, bn2)  # fmt: skip
    covariance = stats.filters @ stats.filters.T
    assert torch.allclose(covariance.diagonal(), bn2.var)
    from lbyl.delivery import bn_affine

    _, offsets = bn_affine(stats)
    assert torch.allclose(offsets, bn2.beta)


needs_torchvision = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None,
    reason="torchvision is not installed here; the torch 2.14 CI run (make test-torch-2.14) has it",
)


@needs_torchvision
def test_mobilenet_v2_restores_its_inverted_residuals():
    import torchvision

    torch.manual_seed(0)
    model = randomise_batchnorms(torchvision.models.mobilenet_v2(num_classes=10))
    x = torch.randn(1, 3, 64, 64)
    restored, report = lbyl.restore(model, x, 0.3)
    staged = [layer for layer in lbyl.plan(model, x, 0.3).layers if layer.stage]
    assert len(staged) == 17  # every inverted residual, the first (no expand) through the stem
    assert 1 - report.macs_after / report.macs_before >= 0.10
    with torch.no_grad():
        assert torch.isfinite(restored(x)).all()


def test_a_restored_chain_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = randomise_batchnorms(InvertedResidual())
    restored, report = lbyl.restore(model, X, 0.5)
    lbyl.save_restored(restored, tmp_path / "saved", report)
    reloaded, _ = lbyl.load_restored(tmp_path / "saved", model=randomise_batchnorms(InvertedResidual(), seed=9))
    assert reloaded.dw.groups == 12
    with torch.no_grad():
        assert torch.equal(reloaded(X), restored(X))


class PaddedInvertedResidual(InvertedResidual):
    """TensorFlow-style "same" padding before a strided depthwise conv (EfficientNet-Lite)."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(24, 24, 3, stride=2, groups=24, bias=False))

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        return self.head(self.bn3(self.project(y)).mean((2, 3)))


def test_zero_padding_before_the_depthwise_conv_passes_and_the_error_is_measured_after_the_activation():
    model = randomise_batchnorms(PaddedInvertedResidual())
    restored, report = lbyl.restore(model, X, 0.25)
    solved = {layer.name: layer.solve for layer in report.layers}
    assert solved["expand"] == "after-activation" and solved["stem"] != "after-activation"
    assert restored.dw[1].groups == 18
    with torch.no_grad():
        assert restored(X).shape == (4, 10)


def test_padding_of_the_channel_axis_is_refused():
    class ChannelPad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.b(F.pad(torch.relu(self.a(x)), (0, 0, 0, 0, 1, 1)))

    groups, skipped = lbyl.find_groups(ChannelPad().eval(), X)
    assert {s.name: s.reason for s in skipped}["a"] == "padding along the channel axis"
