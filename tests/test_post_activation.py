"""LBYL solved after the ReLU where the kept filters span the input space (covariance.solve_space)."""
import math

import pytest
import torch
from torch import nn

import lbyl
from lbyl.covariance import channel_covariance, preactivation_covariance, relu_covariance, solve_space
from lbyl.covariance import spans_input_space
from lbyl.delivery import BatchNormStats, ProducerStats, scaled_filters, solve_normal_equations

F64 = torch.float64


def _phi(t):
    return math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)


def _cdf(t):
    return 0.5 * (1 + math.erf(t / math.sqrt(2)))


@pytest.mark.parametrize("rho", [-0.6, 0.0, 0.5, 0.9])
def test_relu_covariance_matches_the_arc_cosine_formula(rho):
    # zero means, unit variances: E[relu(x) relu(y)] = (sqrt(1 - rho^2) + rho (pi - arccos rho)) / (2 pi)
    cov = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=F64)
    found = relu_covariance(torch.zeros(2, dtype=F64), cov, samples=2**17)
    second = (math.sqrt(1 - rho**2) + rho * (math.pi - math.acos(rho))) / (2 * math.pi)
    assert float(found[0, 1]) == pytest.approx(second - 1 / (2 * math.pi), abs=4e-3)


@pytest.mark.parametrize("mean,std", [(0.7, 1.0), (-1.2, 0.5), (0.0, 2.0)])
def test_relu_variance_matches_the_truncated_normal_moments(mean, std):
    t = mean / std
    first = std * _phi(t) + mean * _cdf(t)
    second = (mean**2 + std**2) * _cdf(t) + mean * std * _phi(t)
    found = relu_covariance(torch.tensor([mean], dtype=F64), torch.tensor([[std**2]], dtype=F64), samples=2**17)
    assert float(found[0, 0]) == pytest.approx(second - first**2, rel=0.03)


def test_relu_covariance_is_deterministic_and_seeded():
    cov = torch.tensor([[1.0, 0.3], [0.3, 2.0]], dtype=F64)
    mean = torch.tensor([0.1, -0.4], dtype=F64)
    assert torch.equal(relu_covariance(mean, cov), relu_covariance(mean, cov))
    assert not torch.equal(relu_covariance(mean, cov, seed=0), relu_covariance(mean, cov, seed=1))


def test_spans_input_space():
    gen = torch.Generator().manual_seed(0)
    assert not spans_input_space(torch.randn(5, 9, generator=gen, dtype=F64))  # fewer rows than entries
    assert spans_input_space(torch.randn(10, 9, generator=gen, dtype=F64))
    low_rank = torch.randn(10, 3, generator=gen, dtype=F64) @ torch.randn(3, 9, generator=gen, dtype=F64)
    assert not spans_input_space(low_rank)  # enough rows, but a 3-dimensional span


def _wide_layer(n=16, m=9, seed=0):
    """A layer like a first convolution on one input channel: 3x3 filters, more filters than weights."""
    gen = torch.Generator().manual_seed(seed)
    filters = torch.randn(n, m, generator=gen, dtype=F64)
    bn = BatchNormStats(
        gamma=0.5 + torch.rand(n, generator=gen, dtype=F64),
        beta=0.5 * torch.randn(n, generator=gen, dtype=F64),
        mean=torch.zeros(n, dtype=F64),
        var=(filters**2).sum(dim=1) * (1 + torch.rand(n, generator=gen, dtype=F64)),
        eps=1e-5,
    )
    return ProducerStats(filters=filters, bn=bn)


KEPT, PRUNED = torch.arange(0, 11), torch.arange(11, 16)


def solve_in(covariance, kept=KEPT, pruned=PRUNED):
    """LBYL with lambdas 0 in the metric of ``covariance`` (N x N): ``S = C_KK^+ C_KP``."""
    return solve_normal_equations(covariance[kept][:, kept], covariance[kept][:, pruned])[0]


def lbyl_solve(stats, input_model, activation):
    return lbyl.LBYL(input_model=input_model).solve(stats, KEPT, PRUNED, activation)


def test_spanning_kept_filters_switch_to_the_post_activation_solve():
    stats = _wide_layer()
    w, b = scaled_filters(stats)
    beta = stats.bn.beta
    bn_covariance = preactivation_covariance(stats, "bn")
    after = solve_in(relu_covariance(beta, bn_covariance))  # Cov(relu(z)) under the BN input model
    before = solve_in(bn_covariance)
    solution = lbyl_solve(stats, "bn", "relu")
    assert solution.space == solve_space(stats, w[KEPT], "bn", "relu") == "after-relu"
    assert torch.allclose(solution.delivery, after)
    assert torch.allclose(channel_covariance(stats, "bn", "after-relu"), relu_covariance(beta, bn_covariance))
    assert not torch.allclose(after, before, atol=1e-3)
    # no ReLU, or the white input model: the pre-activation solve (exact here) as before
    no_relu = lbyl_solve(stats, "bn", "identity")
    assert no_relu.space == "bn" and torch.allclose(no_relu.delivery, before)
    white = lbyl_solve(stats, "white", "identity")
    assert white.space == "white"
    assert torch.allclose(w[KEPT].T @ white.delivery, w[PRUNED].T, atol=1e-8)  # exact rebuild before the ReLU
    # the white model solves after the ReLU too, under its own (white) covariance
    white_after = solve_in(relu_covariance(beta, w @ w.T))
    white_relu = lbyl_solve(stats, "white", "relu")
    assert white_relu.space == "after-relu" and torch.allclose(white_relu.delivery, white_after)
    assert not torch.allclose(white_after, after, atol=1e-3)
    # the solution restore() applies (its delivery and report losses) agrees
    assert torch.equal(lbyl.LBYL(input_model="bn").delivery(stats, KEPT, PRUNED, "relu"), solution.delivery)
    assert (solution.loss["re"] > 0).all()  # no longer an exact rebuild of the filter
    # the variance correction predicts with the covariance the delivery was solved in
    assert torch.allclose(solution.covariance, channel_covariance(stats, "bn", "after-relu"))


def test_post_activation_solve_copies_an_identical_channel():
    # a pruned channel identical to a kept one (filter and BN) has the same ReLU output: S copies it
    stats = _wide_layer()
    filters, bn = stats.filters.clone(), stats.bn
    filters[12] = filters[3]
    fields = {k: getattr(bn, k).clone() for k in ("gamma", "beta", "mean", "var")}
    for k in fields:
        fields[k][12] = fields[k][3]
    twin = ProducerStats(filters=filters, bn=BatchNormStats(**fields, eps=bn.eps))
    delivery = lbyl.LBYL(input_model="bn").delivery(twin, KEPT, PRUNED, "relu")
    column = delivery[:, PRUNED.tolist().index(12)]
    expected = torch.zeros(len(KEPT), dtype=F64)
    expected[3] = 1
    assert torch.allclose(column, expected, atol=1e-6)


def test_narrow_kept_set_keeps_the_pre_activation_solve():
    stats = _wide_layer(n=16, m=27)
    before = solve_in(preactivation_covariance(stats, "bn"))
    solution = lbyl_solve(stats, "bn", "relu")
    assert solution.space == "bn" and torch.allclose(solution.delivery, before)


def test_restore_uses_the_post_activation_solve_on_a_one_channel_first_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 4, 3, padding=1)).eval()  # fmt: skip
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].bias.uniform_(-0.5, 0.5)
    x = torch.randn(1, 1, 8, 8)
    # 12 of 16 kept, 9 weights per filter: the kept filters span the input space
    bn_model, report = lbyl.restore(model, x, 0.25, lbyl.LBYL(input_model="bn"))
    white_model, white = lbyl.restore(model, x, 0.25, lbyl.LBYL(input_model="white"))
    assert white.settings["input_model"] == "white" and report.settings["input_model"] == "bn"
    assert report.layers[0].channels_after == 12
    assert report.layers[0].re > 1e-6 and white.layers[0].re > 1e-6  # not the exact pre-ReLU rebuild (re ~ 0)
    with torch.no_grad():
        assert torch.isfinite(bn_model(x)).all()
        assert not torch.allclose(bn_model(x), white_model(x))


def test_report_says_where_each_layer_was_solved():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=1)).eval()  # fmt: skip
    x = torch.randn(1, 1, 8, 8)
    _, report = lbyl.restore(model, x, 0.25)  # 12 >= 9 weights: after the ReLU; 6 < 144: not
    assert "lbyl (after ReLU)" in report.table()
    _, bn = lbyl.restore(model, x, 0.25, lbyl.LBYL(input_model="bn"))
    assert [r.solve for r in bn.layers] == ["after-relu", "bn"]
    assert [r.solve for r in report.layers] == ["after-relu", "white"]
    _, nm = lbyl.restore(model, x, 0.25, method="nm")
    assert [r.solve for r in nm.layers] == ["", ""]
