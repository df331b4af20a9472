"""Gaussian scale mixtures (docs/method.md, section 5l): the scale rule, and the depthwise chain's
covariance on a block whose inputs share a scale per image, against sampling."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lbyl
from helpers import measure_batchnorms
from lbyl import activations
from lbyl.correction import expected_activation
from lbyl.graph import find_groups
from lbyl.planning import layer_stats


def test_the_scale_rule_keeps_the_variance_and_gives_the_kurtosis():
    u, w = activations._gauss_hermite(activations.SCALE_MIXTURE_NODES)
    for power, moment in ((0, 1), (2, 1), (4, 3), (8, 105), (16, 2027025)):  # exact up to degree 17
        assert float((w * u**power).sum()) == pytest.approx(moment, rel=1e-9)
    assert torch.equal(activations.scale_mixture(0.0)[0], torch.ones(1, dtype=torch.float64))
    for spread in (0.2, 0.5, 0.8):  # the 9-node rule: within 1 % up to 0.8
        squares, weights = activations.scale_mixture(spread)
        assert float(weights.sum()) == pytest.approx(1, abs=1e-12)
        assert float((weights * squares).sum()) == pytest.approx(1, rel=1e-4)
        # kurtosis of a scaled Gaussian: 3 E s^4 / (E s^2)^2 = 3 exp(4 spread^2)
        assert float((weights * squares**2).sum()) == pytest.approx(math.exp(4 * spread**2), rel=1e-2)


class Block(nn.Module):
    """expand 1x1 -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> project 1x1 -> BN, reading the input."""

    def __init__(self, channels=8, hidden=32):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project, self.bn3 = nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, 10)

    def forward(self, x):
        y = F.relu6(self.bn2(self.dw(F.relu6(self.bn1(self.expand(x))))))
        return self.head(self.bn3(self.project(y)).mean((2, 3)))


def scaled_images(n, spread, seed):
    """White inputs times one log-normal scale per image: a Gaussian scale mixture."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.exp(spread * torch.randn(n, 1, 1, 1, generator=generator) - spread**2)
    return scale * torch.randn(n, 8, 16, 16, generator=generator)


def calibrated_block(seed, spread):
    torch.manual_seed(seed)
    model = Block()
    with torch.no_grad():  # BN shifts that put part of every channel in ReLU6's kinks
        for bn in (model.bn1, model.bn2):
            bn.bias.copy_(torch.randn(bn.num_features) * 0.8)
            bn.weight.copy_(torch.rand(bn.num_features) + 0.5)
    return measure_batchnorms(model, scaled_images(2048, spread, seed + 1).split(256))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_chain_covariance_of_scaled_images_is_closer_with_the_mixture(seed):
    spread = 0.5
    model = calibrated_block(seed, spread)
    seen = []
    hook = model.project.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        model(scaled_images(2048, spread, seed + 2))
    hook.remove()
    y = torch.cat(seen).double().permute(1, 0, 2, 3).flatten(1)
    measured = torch.cov(y)
    group = next(g for g in find_groups(model, (torch.zeros(1, 8, 16, 16),))[0] if g.name == "expand")
    errors, mean_errors = {}, {}
    for s in (0.0, spread):
        stats = layer_stats(group, input_model="white", scale_spread=s)
        errors[s] = float((stats.activation_covariance - measured).norm() / measured.norm())
        # what the mean correction reads: the chain's own mean with a spread, f2's Gaussian mean without
        mean = expected_activation(stats, group.consumer_activation)
        mean_errors[s] = float((mean - y.mean(1)).abs().max())
    assert mean_errors[spread] < mean_errors[0.0], mean_errors
    # the Gaussian model misses the correlated magnitudes that the shared scale causes
    assert errors[spread] < 0.3 and errors[spread] < 0.5 * errors[0.0], errors


def test_restore_reads_the_spread():
    model = calibrated_block(0, 0.5)
    x = torch.zeros(1, 8, 16, 16)
    a, _ = lbyl.restore(model, x, 0.3, lbyl.LBYL(scale_spread=0.0))
    b, _ = lbyl.restore(model, x, 0.3, lbyl.LBYL())
    c, _ = lbyl.restore(model, x, 0.3, lbyl.LBYL(scale_spread=0.5))
    assert not torch.equal(a.project.weight, b.project.weight)
    assert torch.equal(b.project.weight, c.project.weight) and torch.equal(b.bn3.running_var, c.bn3.running_var)
    with pytest.raises(ValueError, match="scale_spread must be at most"):
        lbyl.LBYL(scale_spread=1.5)
    with pytest.raises(ValueError, match="scale_spread must be a finite number >= 0"):
        lbyl.LBYL(scale_spread=-0.1)


def test_restoration_of_scaled_images_is_closer_with_the_mixture():
    """End to end, on blocks whose inputs follow the mixture: never worse than the Gaussian model, better
    on average, and both far better than plain pruning."""
    errors = {"prune": [], 0.0: [], 0.5: []}
    for seed in range(6):
        model = calibrated_block(seed, 0.5)
        test = scaled_images(512, 0.5, seed + 5)
        with torch.no_grad():
            reference = model(test)
        for key, method in (("prune", "prune"), (0.0, lbyl.LBYL(scale_spread=0.0)), (0.5, lbyl.LBYL())):
            restored, _ = lbyl.restore(model, torch.zeros(1, 8, 16, 16), 0.4, method)
            with torch.no_grad():
                errors[key].append(float(((restored(test) - reference) ** 2).mean()))
    for mixture, gaussian, pruned in zip(errors[0.5], errors[0.0], errors["prune"]):
        assert mixture <= gaussian * 1.001 and gaussian < pruned, errors
    assert sum(errors[0.5]) < 0.75 * sum(errors[0.0]), errors
