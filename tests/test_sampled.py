"""The data-free corrections, checked against sampled data instead of against their own formulas.

A Conv -> BN -> ReLU -> Conv -> BN network whose BatchNorm statistics are
measured on Gaussian inputs (so the restoration's Gaussian model of the BN
outputs holds): after restoring, the next BatchNorm's running statistics are
compared with the statistics of the restored consumer's output on the same
kind of data. Restoration itself never sees the samples.
"""
import pytest
import torch
import torch.nn as nn

import lbyl
from helpers import measure_batchnorms


def calibrated_net(seed: int = 0, width: int = 24) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    ).double()  # fmt: skip
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    measure_batchnorms(net, [sample(seed + 1)])  # exact statistics: one pass
    return net, sample(seed + 2)


def sample(seed: int, n: int = 512) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def consumer_stats(net: nn.Module, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance per channel of the consumer conv's output (what its BatchNorm normalises)."""
    with torch.no_grad():
        out = net[:4](data)
    return out.mean(dim=(0, 2, 3)), out.var(dim=(0, 2, 3), unbiased=False)


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_mean_correction_restores_the_sampled_mean(ratio):
    net, data = calibrated_net()
    errors = {}
    for corrected in (False, True):
        method = lbyl.LBYL(mean_correction=corrected, variance_correction=False)
        restored, _ = lbyl.restore(net, data[:1], ratio, method, layers=["0"])
        mean, _ = consumer_stats(restored, data)
        # the bias (or running-mean shift) that the correction adds is what BN subtracts
        bn = restored[4]
        expected = bn.running_mean - (restored[3].bias if restored[3].bias is not None else 0)
        errors[corrected] = float((mean - expected).abs().mean())
    assert errors[True] < 0.35 * errors[False]


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_variance_correction_predicts_the_sampled_variance(ratio):
    net, data = calibrated_net()
    errors = {}
    for corrected in (False, True):
        method = lbyl.LBYL(variance_correction=corrected)
        restored, _ = lbyl.restore(net, data[:1], ratio, method, layers=["0"])
        _, variance = consumer_stats(restored, data)
        errors[corrected] = float((restored[4].running_var / variance).log().abs().mean())
    # white inputs and channels constant over the window are approximations: measured 0.58 and 0.53 of the error
    assert errors[True] < 0.65 * errors[False]


def test_restoration_beats_pruning_on_sampled_outputs():
    net, data = calibrated_net()
    with torch.no_grad():
        reference = net[:6](data)
    errors = {}
    for method in ("prune", "nm", "lbyl"):
        restored, _ = lbyl.restore(net, data[:1], 0.5, method, layers=["0"])
        with torch.no_grad():
            errors[method] = float(((restored[:6](data) - reference) ** 2).mean())
    assert errors["lbyl"] < errors["prune"]
    assert errors["nm"] < errors["prune"]
