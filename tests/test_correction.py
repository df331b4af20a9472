"""Mean-shift correction: the closed forms against sampling, and the two ways to fold it."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lbyl
from lbyl.correction import consumer_offset, expected_relu, tap_coverage
from lbyl.surgery import add_output_offset


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (1.5, 0.5), (-2.0, 1.0), (0.3, 3.0), (-0.5, 0.1)])
def test_expected_relu_matches_monte_carlo(mean, std):
    gen = torch.Generator().manual_seed(0)
    z = mean + std * torch.randn(2_000_000, generator=gen, dtype=torch.float64)
    sampled = z.clamp_min(0).mean()
    closed = expected_relu(torch.tensor([mean], dtype=torch.float64), torch.tensor([std], dtype=torch.float64))
    # standard error of the sample mean is below std / 1000
    assert abs(float(closed) - float(sampled)) < 4 * std / 1000


def test_expected_relu_of_constant_channel():
    out = expected_relu(torch.tensor([0.7, -0.7]), torch.tensor([0.0, 0.0]))
    assert torch.allclose(out, torch.tensor([0.7, 0.0], dtype=torch.float64))


def test_negative_gamma_uses_its_magnitude():
    a = expected_relu(torch.tensor([0.2]), torch.tensor([-1.3]))
    b = expected_relu(torch.tensor([0.2]), torch.tensor([1.3]))
    assert torch.equal(a, b)


def test_tap_coverage_counts_padded_reads():
    # 4 inputs, kernel 3, padding 1, stride 1: tap 0 misses the first output, tap 2 the last
    coverage = tap_coverage((4,), (3,), (1,), (1,), (1,))
    assert torch.allclose(coverage, torch.tensor([0.75, 1.0, 0.75], dtype=torch.float64))
    unpadded = tap_coverage((6, 6), (3, 3), (1, 1), (0, 0), (1, 1))
    assert torch.equal(unpadded, torch.ones(3, 3, dtype=torch.float64))


def test_tap_coverage_makes_the_correction_exact_on_average():
    # a conv reading a constant map: the mean output change equals the weighted offset
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False).double()
    shift = torch.tensor([0.4, -1.1], dtype=torch.float64)
    constant = shift[None, :, None, None].expand(1, 2, 5, 5)
    mean_output = F.conv2d(constant, conv.weight, padding=1).mean(dim=(0, 2, 3))
    positions = torch.arange(2)[:, None]
    coverage = tap_coverage((5, 5), (3, 3), (1, 1), (1, 1), (1, 1))
    offset = consumer_offset(conv.weight, positions, torch.arange(2), shift, coverage)
    assert torch.allclose(offset, mean_output.detach())
    uniform = consumer_offset(conv.weight, positions, torch.arange(2), shift)
    assert not torch.allclose(uniform, mean_output.detach())


def test_offset_into_bias_or_running_mean_is_identical():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)).double().eval()
    with torch.no_grad():
        block[1].running_mean.uniform_(-1, 1), block[1].running_var.uniform_(0.5, 2)
    offset = torch.tensor([0.3, -0.2, 1.0, 0.05], dtype=torch.float64)
    into_bias, into_bn = copy.deepcopy(block), copy.deepcopy(block)
    assert add_output_offset(into_bias[0], offset, into_bias[1], where="bias") == "bias"
    assert add_output_offset(into_bn[0], offset, into_bn[1], where="bn") == "bn"
    assert into_bn[0].bias is None  # no new parameter
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(into_bias(x), into_bn(x), atol=1e-12)


def test_running_mean_target_needs_a_batchnorm():
    conv = nn.Conv2d(3, 4, 1)
    with pytest.raises(ValueError, match="fold into its bias instead"):
        add_output_offset(conv, torch.zeros(4), None, where="bn")


def test_correction_removes_the_mean_shift_of_plain_pruning():
    # a conv -> BN -> ReLU -> conv model whose BN statistics are those of its input
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).double()
    x = torch.randn(4096, 3, 1, 1, dtype=torch.float64)
    model.train()
    model[1].momentum = None  # cumulative average: exact statistics of x
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5), model[1].bias.uniform_(-0.5, 1.0)
        model(x)
    model.eval()
    with torch.no_grad():
        reference = model(x).mean(dim=0)
        plain = lbyl.restore(model, x[:1], 0.5, lbyl.Prune(mean_correction=False))[0](x).mean(dim=0)
        corrected = lbyl.restore(model, x[:1], 0.5, lbyl.Prune(mean_correction=True))[0](x).mean(dim=0)
    # the conv output of white noise is Gaussian, so the corrected mean is right up to sampling error
    assert (corrected - reference).abs().max() < 0.05
    assert (plain - reference).abs().max() > 4 * (corrected - reference).abs().max()
