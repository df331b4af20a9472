"""Element-wise activations: Gaussian moments against sampling, the graph reads them, restore uses them.

The moments are checked against seeded samples pushed through torch's own
functions (not :func:`lbyl.activations.evaluate`), with a tolerance of five
standard errors of the sampled statistic; zero-variance inputs must match exactly.
"""
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lbyl
from lbyl import activations as A
from lbyl.correction import expected_relu
from lbyl.graph import find_groups

from helpers import measure_batchnorms
from test_sampled import sample

SAMPLES = 2_000_000
Z_SCORE = 5.0
MUS = (-2.0, -0.5, 0.0, 0.7, 2.0)
SIGMAS = (0.0, 0.3, 1.0, 2.5)
PAIRS = (  # mu_i, sigma_i, mu_k, sigma_k, rho
    (0.3, 1.0, -0.5, 0.7, 0.6), (0.0, 2.0, 1.0, 1.5, -0.8), (-1.0, 0.5, 0.2, 2.5, 0.95), (0.5, 1.0, 0.5, 1.0, 1.0),
    (0.5, 0.0, 0.2, 1.0, 0.5), (1.0, 1.2, -1.0, 0.8, -1.0), (0.1, 1.0, 0.3, 1.0, 0.0), (0.0, 1.0, 0.2, 1.0, 0.999),
)  # fmt: skip

#: (activation, torch's own function, module, functional module)
CASES = {
    "identity": (A.Activation("identity"), lambda z: z),
    "relu": (A.Activation("relu"), torch.relu),
    "relu6": (A.as_activation("relu6"), F.relu6),
    "hardtanh": (A.Activation("hardtanh", -0.5, 1.0), lambda z: F.hardtanh(z, -0.5, 1.0)),
    "leaky_relu": (A.Activation("leaky_relu", slope=(0.1,)), lambda z: F.leaky_relu(z, 0.1)),
    "prelu": (A.Activation("prelu", slope=(0.3,)), lambda z: F.prelu(z, torch.tensor([0.3], dtype=z.dtype))),
    "silu": (A.Activation("silu"), F.silu),
    "hardswish": (A.Activation("hardswish"), F.hardswish),
    "hardsigmoid": (A.Activation("hardsigmoid"), F.hardsigmoid),
    "gelu": (A.Activation("gelu"), F.gelu),
    "gelu-tanh": (A.Activation("gelu", approximate="tanh"), lambda z: F.gelu(z, approximate="tanh")),
    "sigmoid": (A.Activation("sigmoid"), torch.sigmoid),
    "tanh": (A.Activation("tanh"), torch.tanh),
    "elu": (A.Activation("elu", alpha=0.7), lambda z: F.elu(z, 0.7)),
    "selu": (A.as_activation("selu"), F.selu),
    "celu": (A.Activation("elu", alpha=0.8, input_scale=1.25), lambda z: F.celu(z, 0.8)),
    "softplus": (A.Activation("softplus", beta=2.0, threshold=15.0), lambda z: F.softplus(z, 2.0, 15.0)),
    "mish": (A.Activation("mish"), F.mish),
    "logsigmoid": (A.Activation("logsigmoid"), F.logsigmoid),
}


@pytest.fixture(scope="module")
def normals():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, SAMPLES, generator=generator, dtype=torch.float64)


def _close(exact: float, sampled: torch.Tensor, terms: torch.Tensor):
    """``exact`` within Z_SCORE standard errors of the sample mean of ``terms`` (= ``sampled``)."""
    error = float(terms.std()) / math.sqrt(terms.numel())
    assert abs(exact - float(sampled)) <= Z_SCORE * error + 1e-12, (exact, float(sampled), error)


@pytest.mark.parametrize("case", list(CASES))
def test_mean_and_variance_match_sampling(case, normals):
    activation, function = CASES[case]
    x = normals[0]
    for mu, sigma in itertools.product(MUS, SIGMAS):
        mean, var = A.moments(activation, *(torch.tensor(v, dtype=torch.float64) for v in (mu, sigma)))
        f = function(mu + sigma * x)
        if sigma == 0:  # a constant: exact
            assert float(mean) == pytest.approx(float(function(torch.tensor([mu], dtype=torch.float64))), abs=1e-12)
            assert float(var) == 0
            continue
        _close(float(mean), f.mean(), f)
        centred = (f - f.mean()) ** 2
        _close(float(var), centred.mean(), centred)


@pytest.mark.parametrize("case", list(CASES))
def test_covariance_matches_sampling(case, normals):
    activation, function = CASES[case]
    x, y = normals
    for mu_i, sigma_i, mu_k, sigma_k, rho in PAIRS:
        values = (mu_i, sigma_i, mu_k, sigma_k, rho)
        exact = A.covariance(activation, *(torch.tensor(v, dtype=torch.float64) for v in values))
        f_i = function(mu_i + sigma_i * x)
        f_k = function(mu_k + sigma_k * (rho * x + math.sqrt(max(0.0, 1 - rho**2)) * y))
        terms = (f_i - f_i.mean()) * (f_k - f_k.mean())
        _close(float(exact), terms.mean(), terms)


def test_per_channel_prelu_moments_follow_the_channels(normals):
    slopes = torch.tensor([0.0, 0.25, -0.5, 1.5], dtype=torch.float64)
    activation = A.Activation("prelu", slope=tuple(slopes.tolist()))
    mu = torch.tensor([-0.5, 0.3, 0.0, 1.0], dtype=torch.float64)
    sigma = torch.tensor([1.0, 0.7, 2.0, 0.5], dtype=torch.float64)
    z = mu + sigma * normals[0, :500_000, None]  # (samples, channels): F.prelu's channel axis is 1
    f = F.prelu(z, slopes)
    mean, var = A.moments(activation, mu, sigma)
    for c in range(4):
        _close(float(mean[c]), f[:, c].mean(), f[:, c])
        centred = (f[:, c] - f[:, c].mean()) ** 2
        _close(float(var[c]), centred.mean(), centred)
    # the covariance matrix pairs slope c with channel c on both sides
    cov = torch.tensor([[1.0, 0.5, 0.2, 0.0], [0.5, 1.0, 0.3, 0.1], [0.2, 0.3, 1.0, 0.4], [0.0, 0.1, 0.4, 1.0]],
                       dtype=torch.float64) * torch.outer(sigma, sigma)  # fmt: skip
    matrix = A.channel_covariance(activation, mu, cov)
    rho = cov[0, 2] / (sigma[0] * sigma[2])
    pair = A.covariance(activation, mu[0], sigma[0], mu[2], sigma[2], rho, slopes[0], slopes[2])
    assert float(matrix[0, 2]) == pytest.approx(float(pair), abs=1e-12)
    assert torch.allclose(matrix, matrix.T) and torch.allclose(matrix.diagonal(), var)
    assert float(torch.linalg.eigvalsh(matrix)[0]) > 0


@pytest.mark.parametrize("name", A.CLOSED_FORM)
def test_closed_forms_equal_quadrature(name):
    special = {"hardtanh": A.Activation("hardtanh", -0.5, 1.0), "leaky_relu": A.Activation("leaky_relu", slope=(0.2,))}
    activation = special.get(name, A.Activation(name))
    mu = torch.linspace(-4, 4, 41, dtype=torch.float64)[:, None]
    sigma = torch.tensor([0.0, 0.01, 0.3, 1.0, 2.5, 5.0], dtype=torch.float64)
    closed = A.moments(activation, mu, sigma)
    ruled = A.moments(activation, mu, sigma, rule="quadrature")
    for a, b in zip(closed, ruled):
        assert torch.allclose(a, b, rtol=0, atol=1e-11)


def test_relu_mean_is_the_correction_formula():
    mu = torch.linspace(-3, 3, 31, dtype=torch.float64)
    for sigma in (0.0, 0.4, 1.7):
        sigmas = torch.full_like(mu, sigma)
        assert torch.allclose(A.mean("relu", mu, sigmas), expected_relu(mu, sigmas), rtol=0, atol=1e-14)


def test_covariance_at_full_correlation_is_the_variance():
    for name in ("relu", "hardswish", "silu", "tanh", "elu"):
        mu, sigma = torch.tensor([-0.4, 0.9]), torch.tensor([0.8, 2.0])
        cov = A.covariance(name, mu, sigma, mu, sigma, torch.ones(2))
        assert torch.allclose(cov, A.variance(name, mu, sigma), rtol=1e-10, atol=1e-12)
    # the identity's covariance is the Gaussian one
    assert float(A.covariance("identity", 0.3, 2.0, -1.0, 0.5, -0.4)) == pytest.approx(-0.4)


def test_activation_equals_its_name_only_with_default_parameters():
    assert A.Activation("relu") == "relu" and A.Activation("identity") == "identity"
    assert A.as_activation("relu6") == A.Activation("hardtanh", 0, 6) and A.as_activation("relu6") != "hardtanh"
    assert A.Activation("leaky_relu", slope=(0.2,)) != "leaky_relu"
    assert str(A.as_activation("relu6")) == "hardtanh(lower=0.0, upper=6.0)"
    assert len({A.Activation("relu"), A.Activation("relu")}) == 1
    with pytest.raises(ValueError, match="unknown activation"):
        A.Activation("softmax")


# ---------------------------------------------------------------- graph and restore


class Functional(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


class FunctionalPReLU(nn.Module):
    """``F.prelu`` with a weight of this module's own (not an ``nn.PReLU``)."""

    def __init__(self, slopes: int, init: float):
        super().__init__()
        self.slope = nn.Parameter(torch.full((slopes,), init))

    def forward(self, x):
        return F.prelu(x, self.slope)


RESTORE_CASES = {  # name: (activation layer, the activation the graph should read)
    "ReLU6": (nn.ReLU6(), A.Activation("hardtanh", 0, 6)),
    "F.relu6": (Functional(F.relu6), A.Activation("hardtanh", 0, 6)),
    "Hardtanh": (nn.Hardtanh(-0.5, 1.0), A.Activation("hardtanh", -0.5, 1.0)),
    "clamp": (Functional(lambda x: x.clamp(-1, 1)), A.Activation("hardtanh", -1, 1)),
    "LeakyReLU": (nn.LeakyReLU(0.1), A.Activation("leaky_relu", slope=(0.1,))),
    "F.leaky_relu": (Functional(lambda x: F.leaky_relu(x, 0.2)), A.Activation("leaky_relu", slope=(0.2,))),
    "PReLU": (nn.PReLU(init=0.5), A.Activation("prelu", slope=(0.5,))),
    "F.prelu": (FunctionalPReLU(1, 0.5), A.Activation("prelu", slope=(0.5,))),
    "SiLU": (nn.SiLU(), A.Activation("silu")),
    "F.silu": (Functional(F.silu), A.Activation("silu")),
    "Hardswish": (nn.Hardswish(), A.Activation("hardswish")),
    "F.hardswish": (Functional(F.hardswish), A.Activation("hardswish")),
    "GELU": (nn.GELU(), A.Activation("gelu")),
    "F.gelu-tanh": (Functional(lambda x: F.gelu(x, approximate="tanh")), A.Activation("gelu", approximate="tanh")),
    "Sigmoid": (nn.Sigmoid(), A.Activation("sigmoid")),
    "torch.sigmoid": (Functional(torch.sigmoid), A.Activation("sigmoid")),
    "Tanh": (nn.Tanh(), A.Activation("tanh")),
    "torch.tanh": (Functional(torch.tanh), A.Activation("tanh")),
    "ELU": (nn.ELU(0.7), A.Activation("elu", alpha=0.7)),
    "F.elu": (Functional(lambda x: F.elu(x, 0.5)), A.Activation("elu", alpha=0.5)),
    "SELU": (nn.SELU(), A.as_activation("selu")),
    "Identity": (nn.Identity(), A.Activation("identity")),
}


def net_with(activation: nn.Module, seed: int = 0, width: int = 24) -> tuple[nn.Module, torch.Tensor]:
    """Conv -> BN -> activation -> Conv -> BN -> ..., BatchNorm statistics measured on Gaussian inputs."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), activation,
        nn.Conv2d(width, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    ).double()  # fmt: skip
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    measure_batchnorms(net, [sample(seed + 1)])  # exact statistics: one pass
    return net, sample(seed + 2)


def consumer_mean_error(net: nn.Module, data: torch.Tensor, corrected: bool) -> tuple[float, nn.Module, object]:
    """Mean |sampled mean - what the next BatchNorm subtracts| of the consumer's outputs after restoring."""
    method = lbyl.LBYL(mean_correction=corrected, variance_correction=False)
    restored, report = lbyl.restore(net, data[:1], 0.5, method, layers=["0"])
    with torch.no_grad():
        mean = restored[:4](data).mean(dim=(0, 2, 3))
    expected = restored[4].running_mean - (restored[3].bias if restored[3].bias is not None else 0)
    return float((mean - expected).abs().mean()), restored, report


@pytest.mark.parametrize("case", list(RESTORE_CASES))
def test_restore_with_any_activation_corrects_the_mean(case):
    layer, expected = RESTORE_CASES[case]
    net, data = net_with(layer)
    groups, _ = find_groups(net, data[:1])
    group = next(g for g in groups if g.name == "0")
    assert group.activation == expected
    before, _, _ = consumer_mean_error(net, data, corrected=False)
    after, restored, report = consumer_mean_error(net, data, corrected=True)
    assert [layer.name for layer in report.layers] == ["0"] and "0" not in {s.name for s in report.skipped}
    assert report.layers[0].activation == group.activation.name
    with torch.no_grad():
        assert torch.isfinite(restored(data)).all()
    # measured: 0.002 to 0.04 of the uncorrected error
    assert after < 0.1 * before


def test_per_channel_prelu_is_pruned_with_its_producer():
    prelu = nn.PReLU(24)
    with torch.no_grad():
        prelu.weight.copy_(torch.linspace(-0.3, 0.6, 24))
    net, data = net_with(prelu)
    before, _, _ = consumer_mean_error(net, data, corrected=False)
    after, restored, report = consumer_mean_error(net, data, corrected=True)
    kept = report.layers[0].kept
    assert restored[2].weight.shape == (len(kept),)
    assert torch.equal(restored[2].weight, net[2].weight[kept])
    assert after < 0.1 * before
    # the architecture rebuilds from the plan: shrink prunes the PReLU too
    twin = lbyl.shrink(net_with(nn.PReLU(24))[0], data[:1], {"0": kept})
    twin.load_state_dict(restored.state_dict())


@pytest.mark.parametrize(
    "middle, reason",
    [
        (nn.Softmax(dim=1), "Softmax mixes the channels"),
        (nn.LogSoftmax(dim=1), "LogSoftmax mixes the channels"),
        (FunctionalPReLU(24, 0.2), "F.prelu with one slope per channel"),
        (Functional(lambda x: F.prelu(x, torch.full((1,), 0.2, dtype=x.dtype))), "cannot read the weight"),
        (nn.Sequential(nn.ReLU(), nn.SiLU()), "two activations in a row"),
        (Functional(lambda x: F.threshold(x, 0.5, 0.5)), "replacement value is not recorded"),
    ],
)
def test_unmodelled_activations_are_skipped_with_a_reason(middle, reason):
    net, data = net_with(middle)
    _, report = lbyl.restore(net, data[:1], 0.5, "lbyl", layers="all")
    assert "0" not in [layer.name for layer in report.layers]
    assert reason in {s.name: s.reason for s in report.skipped}["0"]
