"""Variance correction: the BatchNorm after a consumer keeps normalising to the trained scale."""
import pytest
import torch
from torch import nn

import lbyl
from lbyl.correction import channel_sums, variance_ratio
from lbyl.covariance import preactivation_covariance
from lbyl.delivery import lbyl_delivery
from lbyl.graph import find_groups
from lbyl.planning import producer_stats

F64 = torch.float64


def _covariance(n, gen):
    root = torch.randn(n, n + 3, generator=gen, dtype=F64)
    return root @ root.T / n


def test_nothing_pruned_changes_nothing():
    gen = torch.Generator().manual_seed(0)
    sums, cov = torch.randn(4, 6, generator=gen, dtype=F64), _covariance(6, gen)
    ratio = variance_ratio(sums, torch.arange(6), torch.arange(0), torch.zeros(6, 0, dtype=F64), cov)
    assert torch.allclose(ratio, torch.ones(4, dtype=F64))


def test_exact_rebuild_keeps_the_variance():
    # channel 4 is exactly 2 x channel 1 and channel 5 is channel 0 - channel 3: S rebuilds both
    gen = torch.Generator().manual_seed(1)
    mix = torch.eye(4, dtype=F64)
    mix = torch.cat([mix, (2 * mix[1])[None], (mix[0] - mix[3])[None]])  # z = mix @ z_kept
    cov = mix @ _covariance(4, gen) @ mix.T
    kept, pruned = torch.arange(4), torch.tensor([4, 5])
    delivery = mix[pruned].T  # (kept, pruned)
    sums = torch.randn(3, 6, generator=gen, dtype=F64)
    assert torch.allclose(variance_ratio(sums, kept, pruned, delivery, cov), torch.ones(3, dtype=F64))


def test_plain_pruning_of_independent_channels():
    gen = torch.Generator().manual_seed(2)
    sums = torch.randn(3, 5, generator=gen, dtype=F64)
    variances = torch.rand(5, generator=gen, dtype=F64) + 0.1
    kept, pruned = torch.tensor([0, 2, 3]), torch.tensor([1, 4])
    ratio = variance_ratio(sums, kept, pruned, torch.zeros(3, 2, dtype=F64), torch.diag(variances))
    expected = (sums[:, kept] ** 2 * variances[kept]).sum(1) / (sums**2 * variances).sum(1)
    assert torch.allclose(ratio, expected)


def test_ratio_matches_sampled_variances():
    gen = torch.Generator().manual_seed(3)
    n, kept, pruned = 7, torch.tensor([0, 1, 3, 5]), torch.tensor([2, 4, 6])
    cov = _covariance(n, gen)
    sums = torch.randn(2, n, generator=gen, dtype=F64)
    delivery = torch.randn(4, 3, generator=gen, dtype=F64)
    z = torch.linalg.cholesky(cov) @ torch.randn(n, 200_000, generator=gen, dtype=F64)
    before = (sums @ z).var(dim=1)
    after = ((sums[:, kept] + sums[:, pruned] @ delivery.T) @ z[kept]).var(dim=1)
    assert torch.allclose(variance_ratio(sums, kept, pruned, delivery, cov), after / before, rtol=0.02)


def test_channel_sums_add_taps_and_slots():
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(5, 6, 3, 3, generator=gen, dtype=F64)
    positions = torch.arange(6)[:, None]  # a convolution: one slot per channel
    assert torch.allclose(channel_sums(weight, positions), weight.sum(dim=(2, 3)))
    linear = torch.randn(4, 12, generator=gen, dtype=F64)  # Linear after flatten: 2 slots per channel
    slots = torch.arange(12).reshape(6, 2)
    assert torch.allclose(channel_sums(linear, slots), linear.reshape(4, 6, 2).sum(dim=2))


def _two_stage(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1),
    ).to(F64).eval()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_var.uniform_(0.5, 2.0)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.bias.uniform_(-0.3, 0.3)
    return model


def test_restore_rescales_the_batchnorm_after_the_consumer():
    model = _two_stage()
    x = torch.randn(1, 3, 8, 8, dtype=F64)
    on, report = lbyl.restore(model, x, 0.5, layers=["0"])
    off, report_off = lbyl.restore(model, x, 0.5, lbyl.LBYL(variance_correction=False), layers=["0"])
    assert report.settings["variance_correction"] is True and report_off.settings["variance_correction"] is False
    group = next(g for g in find_groups(model, x)[0] if g.name == "0")
    stats = producer_stats(group)
    kept = torch.tensor(report.layers[0].kept)
    pruned = torch.tensor([i for i in range(8) if i not in report.layers[0].kept])
    # 4 kept filters of 27 weights do not span the input space: the white pre-activation solve
    delivery = lbyl_delivery(stats, kept, pruned)
    assert torch.equal(delivery, lbyl.LBYL().delivery(stats, kept, pruned, "relu"))
    expected = variance_ratio(channel_sums(model[3].weight, torch.arange(8)[:, None]), kept, pruned, delivery,
                              preactivation_covariance(stats, "white"))  # fmt: skip
    assert torch.allclose(on[4].running_var, off[4].running_var * expected)
    assert not torch.allclose(expected, torch.ones_like(expected))
    assert torch.equal(model[4].running_var, off[4].running_var)  # the caller's model is untouched
    # the baselines leave it off unless asked
    _, nm = lbyl.restore(model, x, 0.5, method="nm", layers=["0"])
    assert nm.settings["variance_correction"] is False


def test_snapshot_of_a_float64_producer_is_a_copy():
    model = _two_stage()
    group = next(g for g in find_groups(model, torch.randn(1, 3, 8, 8, dtype=F64))[0] if g.name == "3")
    stats = producer_stats(group)
    with torch.no_grad():
        model[3].weight.mul_(2)
        model[4].running_var.mul_(2)
    assert not torch.allclose(stats.filters, model[3].weight.reshape(6, -1))
    assert not torch.allclose(stats.bn.var, model[4].running_var)
