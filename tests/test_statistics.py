"""The data-free statistics of layers without BatchNorm (lbyl.statistics), against sampled data."""
import pytest
import torch
import torch.nn as nn

import lbyl
from lbyl import activations, statistics
from lbyl.graph import find_groups
from lbyl.planning import producer_stats
from lbyl.statistics import input_moments, layernorm_moments, reads_layernorm

SAMPLES = 200_000


def _sampled(values: torch.Tensor):
    values = values.reshape(-1, values.shape[-1]).to(torch.float64)
    return values.mean(0), torch.cov(values.T)


def _errors_against_sampling(prefix: nn.Module, moments):
    """Sampled pre-activations of ``prefix`` on standardised inputs, and the largest errors of the
    predicted mean and covariance relative to the largest sampled standard deviation (variance)."""
    with torch.no_grad():
        z = prefix(torch.randn(SAMPLES, prefix[0].in_features, dtype=torch.float64))
    mean, cov = _sampled(z)
    scale = float(cov.diagonal().max().sqrt())
    mean_error = float((moments.mean - mean).abs().max()) / scale
    return z, mean_error, float((moments.covariance - cov).abs().max()) / scale**2


def _mlp(seed=0, widths=(12, 30, 20, 5), activation=nn.ReLU):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(activation())
    model = nn.Sequential(*layers).double().eval()
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.bias.uniform_(-0.5, 0.5)
    return model


def test_sources_on_the_graph():
    groups, _ = find_groups(_mlp(), torch.randn(1, 12, dtype=torch.float64))
    kinds = {g.name: g.input_source.kind for g in groups}
    assert kinds == {"0": "input", "2": "activation"}
    assert groups[1].input_source.upstream is groups[0].input_source  # shared, computed once

    block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).eval()
    (group,), _ = find_groups(block, torch.randn(2, 5, 8))
    assert group.input_source.kind == "layernorm" and group.input_source.module is block[0]
    assert reads_layernorm(group.input_source) and not reads_layernorm(groups[1].input_source)


class _AfterResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x + self.a(x))))


def test_unknown_origin_has_no_statistics():
    groups, _ = find_groups(_AfterResidual().eval(), torch.randn(1, 6))
    (group,) = [g for g in groups if g.name == "fc1"]
    assert group.input_source is None
    assert producer_stats(group, moments=True).moments is None


def test_layernorm_output_moments_match_sampling():
    """Isotropic tokens: a normalised token's covariance is d/(d-1) (I - 11^T/d), exactly."""
    torch.manual_seed(1)
    ln = nn.LayerNorm(6).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2.0)
        ln.bias.uniform_(-1, 1)
    mean, cov = layernorm_moments(ln)
    with torch.no_grad():
        sampled_mean, sampled_cov = _sampled(ln(3 * torch.randn(SAMPLES, 6, dtype=torch.float64) + 0.7))
    assert torch.allclose(mean, sampled_mean, atol=0.02)
    assert torch.allclose(cov, sampled_cov, atol=0.03)


@pytest.mark.parametrize("activation", [nn.ReLU, nn.GELU, nn.Tanh])
def test_hidden_layer_moments_match_sampling(activation):
    """Standardised inputs: the first layer's outputs are exactly Gaussian, so the moments of
    the second layer's pre-activations (mean W m + b, covariance W C W^T) are exact."""
    model = _mlp(2, activation=activation)
    groups, _ = find_groups(model, torch.randn(1, 12, dtype=torch.float64))
    moments = producer_stats(groups[1], moments=True).moments
    _, mean_error, covariance_error = _errors_against_sampling(model[:3], moments)
    assert mean_error < 0.02 and covariance_error < 0.03
    assert "activation" in moments.source or "of a Linear layer" in moments.source


def test_series_covariance_matches_the_quadrature():
    torch.manual_seed(3)
    w = torch.randn(25, 10, dtype=torch.float64) * 0.5
    mean, cov = torch.randn(25, dtype=torch.float64) * 0.7, w @ w.T
    for name in ("relu", "gelu", "silu", "tanh", "hardtanh", "elu"):
        series = activations.hermite_channel_covariance(name, mean, cov)
        exact = activations.channel_covariance(name, mean, cov)
        assert float((series - exact).abs().max()) < 1e-5 * float(exact.abs().max()), name


def test_input_moments_are_cached_from_the_weights_as_they_were():
    model = _mlp(4)
    groups, _ = find_groups(model, torch.randn(1, 12, dtype=torch.float64))
    first = input_moments(groups[1].input_source)
    with torch.no_grad():
        model[0].weight.mul_(3)
    assert input_moments(groups[1].input_source) is first


def _output_moments(model, x):
    with torch.no_grad():
        return _sampled(model(x))


def test_mean_and_variance_corrections_without_batchnorm():
    """On standardised inputs (the statistics model's own assumption) the restored layer keeps
    the consumer's mean, which plain pruning shifts; the variance correction then scales every
    output up about that mean (the lost variance predicted before the activation: here it
    overshoots, the outputs end with more variance than the original, docs/method.md 5g)."""
    model = _mlp(5, widths=(30, 40, 6))  # 10 kept filters do not span the 30 inputs
    x = torch.randn(SAMPLES, 30, dtype=torch.float64)
    mean, cov = _output_moments(model, x)
    kept = {"0": list(range(0, 40, 4))}
    moments = {}
    for label, method in [("prune", lbyl.Prune()), ("lbyl", lbyl.LBYL()),
                          ("mean only", lbyl.LBYL(variance_correction=False))]:  # fmt: skip
        restored, _ = lbyl.restore(model, x[:1], method=method, kept=kept)
        moments[label] = _output_moments(restored, x)
    error = {label: float((m - mean).abs().max()) for label, (m, _) in moments.items()}
    assert error["lbyl"] < 0.1 * error["prune"] and error["mean only"] < 0.1 * error["prune"]
    ratio = {label: c.diagonal() / cov.diagonal() for label, (_, c) in moments.items()}
    assert bool((ratio["prune"] < 1).all()) and bool((ratio["lbyl"] > ratio["mean only"]).all())
    assert bool((ratio["lbyl"] > 1).all())  # the overshoot the docs describe


def test_deeper_layers_are_approximately_gaussian():
    """Past the first layer the pre-activations are no longer Gaussian (sums of ReLU outputs):
    modelling them as Gaussian is an approximation, measured here three layers deep."""
    model = _mlp(6, widths=(12, 30, 30, 20, 5))
    groups, _ = find_groups(model, torch.randn(1, 12, dtype=torch.float64))
    assert [g.input_source.kind for g in groups] == ["input", "activation", "activation"]
    moments = producer_stats(groups[2], moments=True).moments
    predicted = activations.mean("relu", moments.mean, moments.covariance.diagonal().sqrt())
    z, mean_error, covariance_error = _errors_against_sampling(model[:5], moments)
    # measured: mean 2 %, covariance 10 % (of the largest variance), E relu 1.4 % of the largest std
    assert mean_error < 0.04 and covariance_error < 0.2
    scale = float(z.std(0).max())
    assert float((predicted - torch.relu(z).mean(0)).abs().max()) < 0.04 * scale


def test_declared_input_statistics_broadcast_to_the_features():
    mean, covariance = statistics.declared_moments(torch.tensor(0.5), torch.tensor(2.0), (1, 2, 3), 6)
    assert torch.equal(mean, torch.full((6,), 0.5, dtype=torch.float64))
    assert torch.equal(covariance, 4.0 * torch.eye(6, dtype=torch.float64))
    per_channel = torch.tensor([[[1.0]], [[2.0]]], dtype=torch.float64)
    mean, _ = statistics.declared_moments(per_channel, torch.tensor(1.0, dtype=torch.float64), (2, 1, 3), 6)
    assert mean.tolist() == [1, 1, 1, 2, 2, 2]
    tokens, _ = statistics.declared_moments(per_channel.reshape(2, 1), torch.tensor(1.0, dtype=torch.float64), (5, 2, 3), 3)
    assert tokens.tolist() == [1.5, 1.5, 1.5]  # a Linear layer on the last axis: averaged over the others
    with pytest.raises(ValueError, match="do not broadcast to one input of shape"):
        statistics.declared_moments(torch.ones(4, dtype=torch.float64), torch.tensor(1.0), (1, 2, 3), 6)


def test_declared_input_statistics_correct_the_mean_the_input_gives():
    """A model fed inputs with mean 2 and std 0.5: declaring them makes the mean correction right
    where the standardised default cannot be."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = 2.0 + 0.5 * torch.randn(4096, 1, 3, 4)
    with torch.no_grad():
        reference = model(x)

    def error(**options):
        restored, report = lbyl.restore(model, x[:1], 0.5, layers=["1"], **options)
        with torch.no_grad():
            return float((restored(x) - reference).mean(dim=0).abs().max()), report

    declared, report = error(input_stats=(2.0, 0.5))
    default, _ = error()
    assert declared < 0.25 * default
    assert report.settings["input_stats"] == [2.0, 0.5]


@pytest.mark.parametrize("bad", [(0.0, 0.0), (float("nan"), 1.0), (1.0,), "0,1"])
def test_invalid_input_statistics_are_refused(bad):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with pytest.raises(ValueError, match=r"input_stats"):
        lbyl.restore(model, torch.randn(1, 4), 0.5, input_stats=bad)
