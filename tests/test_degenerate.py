"""Degenerate models: defined behaviour instead of NaN, crashes or silent damage.

What each case does is documented in docs/errors.md ("Odd models").
"""
import copy

import pytest
import torch
import torch.nn as nn

import lbyl
from helpers import conv_bn_relu_conv
from lbyl.delivery import BatchNormStats, ProducerStats


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread avoids thread start-up and contention dominating the runtime."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


X = torch.randn(6, 3, 10, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
DELIVERING = ("nm", "nm-paper", "lbyl", "lbyl-paper")


def outputs(model, x=X):
    with torch.no_grad():
        return model(x)


def assert_finite(model):
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name


def delivery_matrix(method, stats, kept, pruned):
    """The delivery matrix of a method's defaults (lambdas 0, white inputs, no activation)."""
    return lbyl.as_method(method).delivery(stats, kept, pruned, "identity")


def with_lambda1(method, lambda1):
    """The method of this name with its BN-bias weight ``lambda1`` (methods without one: their defaults)."""
    if method == "lbyl":
        return lbyl.LBYL(lambda1=lambda1)
    if method == "lbyl-paper":
        return lbyl.paper.LBYL(lambda1=lambda1)
    return lbyl.as_method(method)


def stats_with_bn(seed=0, n=6, m=12, **overrides):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda: torch.rand(n, generator=gen, dtype=torch.float64)  # noqa: E731
    bn = dict(gamma=rand() + 0.5, beta=rand() - 0.5, mean=rand() - 0.5, var=rand() + 0.5)
    for key, (index, value) in overrides.items():
        bn[key][index] = value
    filters = torch.randn(n, m, generator=gen, dtype=torch.float64)
    return ProducerStats(filters=filters, bn=BatchNormStats(eps=1e-5, **bn))


KEPT, PRUNED = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])


# --- BatchNorm gamma exactly 0 -------------------------------------------------------------


@pytest.mark.parametrize("method", lbyl.METHODS)
def test_zero_gamma_restores_to_finite_weights(method):
    model = conv_bn_relu_conv(6, seed=1)
    with torch.no_grad():
        model[1].weight[[0, 4]] = 0.0  # one kept, one pruned (L2 ranks the raw filters)
    for criterion in ("l2", "random"):
        restored, report = lbyl.restore(model, X[:1], 0.5, method=with_lambda1(method, 0.5), criterion=criterion)
        assert_finite(restored)
        assert torch.isfinite(outputs(restored)).all()
        assert all(map(torch.isfinite, torch.tensor([report.layers[0].re, report.layers[0].be])))


@pytest.mark.parametrize("method", DELIVERING)
def test_zero_gamma_channel_neither_takes_over_nor_delivers(method):
    # a zero-gamma channel outputs the constant beta: as a kept channel it cannot represent
    # anything that varies with the input, as a pruned one it has nothing input-dependent to hand over
    stats = stats_with_bn(gamma=(torch.tensor([1, 4]), 0.0))
    delivery = delivery_matrix(method, stats, KEPT, PRUNED)
    assert torch.isfinite(delivery).all()
    assert torch.equal(delivery[1], torch.zeros(3, dtype=torch.float64))  # kept channel 1
    assert torch.equal(delivery[:, 1], torch.zeros(3, dtype=torch.float64))  # pruned channel 4
    assert delivery[[0, 2]][:, [0, 2]].abs().sum() > 0  # the healthy channels still merge


def test_zero_gamma_pruned_channels_make_merging_equal_pruning():
    model = conv_bn_relu_conv(6, seed=2)
    with torch.no_grad():
        model[0].weight[3:] *= 0.1  # L2 prunes channels 3, 4, 5 ...
        model[1].weight[3:] = 0.0  # ... whose outputs are constants
    pruned = outputs(lbyl.restore(model, X[:1], 0.5, method="prune")[0])
    for method in DELIVERING:
        assert torch.allclose(outputs(lbyl.restore(model, X[:1], 0.5, method=method)[0]), pruned, atol=1e-12)


# --- tiny or zero running variance ---------------------------------------------------------


@pytest.mark.parametrize("var", [0.0, 1e-30])
@pytest.mark.parametrize("method", lbyl.METHODS)
def test_tiny_or_zero_running_variance(method, var):
    model = conv_bn_relu_conv(6, seed=1)
    with torch.no_grad():
        model[1].running_var[[0, 4]] = var
    restored, _ = lbyl.restore(model, X[:1], 0.5, method=with_lambda1(method, 0.5))
    assert_finite(restored)
    assert torch.isfinite(outputs(restored)).all()


@pytest.mark.parametrize("method", ["nm-paper", "lbyl-paper"])
def test_paper_variants_count_a_variance_below_eps_as_eps(method):
    # the released formulas divide by the running variance; BN never divides by less than sqrt(eps)
    zero = stats_with_bn(var=(torch.tensor([1, 4]), 0.0))
    at_eps = stats_with_bn(var=(torch.tensor([1, 4]), 1e-5))
    assert torch.allclose(delivery_matrix(method, zero, KEPT, PRUNED), delivery_matrix(method, at_eps, KEPT, PRUNED))


def test_batchnorm_dividing_by_zero_is_refused():
    model = conv_bn_relu_conv(6, seed=1)
    model[1].eps = 0.0
    with torch.no_grad():
        model[1].running_var[[0, 4]] = 0.0
    with pytest.raises(ValueError, match=r"BatchNorm 1 has running_var \+ eps <= 0 in channels \[0, 4\].*positive eps"):
        lbyl.restore(model, X[:1], 0.5)


def test_batchnorm_without_running_statistics_is_skipped():
    # track_running_stats=False normalises with each batch's statistics: no fixed affine map to restore
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, track_running_stats=False), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.ReLU(),
        nn.Conv2d(6, 4, 3),
    ).eval()  # fmt: skip
    _, report = lbyl.restore(model, torch.randn(1, 3, 10, 10), 0.5)
    assert [r.name for r in report.layers] == ["3"]
    assert "keeps no running statistics" in {s.name: s.reason for s in report.skipped}["0"]


# --- dead and identical filters ------------------------------------------------------------


@pytest.mark.parametrize("method", ["nm", "nm-paper"])
def test_dead_kept_filter_is_never_a_merge_partner(method):
    stats = stats_with_bn()
    stats.filters[1] = 0.0
    stats.filters[PRUNED] = -stats.filters[[0, 2, 0]].abs()  # negative cosine to every live kept filter ...
    stats.filters[[0, 2]] = stats.filters[[0, 2]].abs()  # ... and 0 to the dead one
    delivery = delivery_matrix(method, stats, KEPT, PRUNED)
    assert torch.isfinite(delivery).all() and torch.equal(delivery[1], torch.zeros(3, dtype=torch.float64))
    assert (delivery != 0).sum(dim=0).tolist() == [1, 1, 1]  # every pruned channel still merges


@pytest.mark.parametrize("method", lbyl.METHODS)
def test_dead_filters(method):
    model = conv_bn_relu_conv(6, seed=3)
    with torch.no_grad():
        model[0].weight[[1, 5]] = 0.0
    for criterion in ("l2", "random", "l2gm"):  # random and l2gm may keep a dead filter
        restored, _ = lbyl.restore(model, X[:1], 0.5, method=method, criterion=criterion, seed=1)
        assert_finite(restored)
        assert torch.isfinite(outputs(restored)).all()


def test_all_kept_filters_dead_delivers_nothing():
    stats = stats_with_bn()
    stats.filters[KEPT] = 0.0
    for method in DELIVERING:
        delivery = delivery_matrix(method, stats, KEPT, PRUNED)
        assert torch.isfinite(delivery).all()
        if method != "lbyl-paper":  # the release's penalty terms stay; its singular system gets the min-norm answer
            assert torch.equal(delivery, torch.zeros(3, 3, dtype=torch.float64)), method


def identical_pair_model():
    """Channels 0 and 5 are identical (filter and BN) and the smallest: L2 keeps 0, prunes 5."""
    model = conv_bn_relu_conv(6, seed=5)
    conv, bn = model[0], model[1]
    with torch.no_grad():
        conv.weight[0] *= 0.05
        conv.weight[5] = conv.weight[0]
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            t[5] = t[0]
    return model


@pytest.mark.parametrize("method", ["nm", "lbyl"])
def test_identical_filters_merge_exactly(method):
    model = identical_pair_model()
    restored, report = lbyl.restore(model, X[:1], 1 / 6, method=method)
    assert report.layers[0].kept == [0, 1, 2, 3, 4]
    ref = outputs(model)
    assert float((outputs(restored) - ref).norm() / ref.norm()) < 1e-10


@pytest.mark.parametrize("method", lbyl.METHODS)
def test_identical_kept_filters_stay_finite(method):
    # both copies kept: the LBYL systems are singular without lambdas
    model = identical_pair_model()
    restored, _ = lbyl.restore(model, X[:1], 0.34, method=method, criterion="random", seed=4)
    assert_finite(restored)
    assert torch.isfinite(outputs(restored)).all()


# --- extreme ratios --------------------------------------------------------------------------


@pytest.mark.parametrize("method", lbyl.METHODS)
def test_a_layer_never_vanishes(method):
    model = conv_bn_relu_conv(3, seed=1)
    restored, report = lbyl.restore(model, X[:1], 0.99, method=method)
    assert report.layers[0].channels_after == 1 == restored[0].out_channels == restored[3].in_channels
    assert outputs(restored).shape == outputs(model).shape


# --- training mode, frozen parameters --------------------------------------------------------


@pytest.mark.parametrize("inplace", [False, True])
def test_training_mode_leaves_batchnorm_statistics_alone(inplace):
    model = conv_bn_relu_conv(6, seed=1).train()
    bn = copy.deepcopy(model[1])
    restored, report = lbyl.restore(model, X[:2], 0.5, inplace=inplace)
    kept = report.layers[0].kept
    assert restored.training and model.training
    assert torch.equal(restored[1].running_mean, bn.running_mean[kept])
    assert torch.equal(restored[1].running_var, bn.running_var[kept])
    assert int(restored[1].num_batches_tracked) == int(bn.num_batches_tracked) == 0
    if not inplace:
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(model[1], key), getattr(bn, key))


def test_frozen_parameters_stay_frozen():
    model = conv_bn_relu_conv(6, seed=1)
    for p in model.parameters():
        p.requires_grad_(False)
    restored, _ = lbyl.restore(model, X[:1], 0.5)
    assert [n for n, p in restored.named_parameters() if p.requires_grad] == []


def test_partly_frozen_parameters_keep_their_flags():
    model = conv_bn_relu_conv(6, seed=1)
    model[0].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    restored, _ = lbyl.restore(model, X[:1], 0.5)
    flags = {n: p.requires_grad for n, p in restored.named_parameters()}
    assert flags == {n: p.requires_grad for n, p in model.named_parameters() if n in flags}
    assert flags["0.weight"] is False and flags["1.bias"] is False and flags["1.weight"] is True


# --- dtypes and devices ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(dtype):
    model = conv_bn_relu_conv(6, seed=1, dtype=dtype)
    reference = copy.deepcopy(model).float()  # the same values in float32
    x = X.to(dtype)
    restored, report = lbyl.restore(model, x[:1], 0.5)
    expected, expected_report = lbyl.restore(reference, x[:1].float(), 0.5)
    assert {t.dtype for t in restored.state_dict().values() if t.is_floating_point()} == {dtype}
    assert (report.params_after, report.macs_after) == (expected_report.params_after, expected_report.macs_after)
    assert report.macs_after < report.macs_before
    # restoration runs in float64 either way; only the final rounding to the storage dtype differs
    for name, tensor in restored.state_dict().items():
        if tensor.is_floating_point():
            assert torch.equal(tensor, expected.state_dict()[name].to(dtype)), name
    assert outputs(restored, x).dtype == dtype


def _devices():
    return [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
    ]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("affine", [True, False])
def test_device_is_respected(device, affine):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6, affine=affine), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 10 * 10, 4),
    ).double().eval()  # fmt: skip
    on_cpu = {m: lbyl.restore(model, X[:1], 0.5, method=m)[0] for m in lbyl.METHODS}
    moved = copy.deepcopy(model).to(device)
    for method in lbyl.METHODS:
        restored, _ = lbyl.restore(moved, X[:1].to(device), 0.5, method=method, criterion="l2")
        assert {t.device.type for t in restored.state_dict().values()} == {device}
        assert torch.allclose(outputs(restored, X.to(device)).cpu(), outputs(on_cpu[method]), atol=1e-9)


def test_nothing_pruned_adds_no_bias():
    # the mean-shift correction would otherwise give a bias-free consumer a (zero) bias
    for channels, ratio in ((3, 0.0), (1, 0.5)):  # a single channel is always kept
        model = conv_bn_relu_conv(channels, seed=1)
        model[3].bias = None
        restored, report = lbyl.restore(model, X[:1], ratio)
        assert restored[3].bias is None and report.params_after == report.params_before
        assert torch.equal(outputs(restored), outputs(model))
