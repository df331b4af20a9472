"""The mathematics of method.md, checked on constructed cases where the answer is known."""
import numpy as np
import pytest
import torch

from lbyl.delivery import (
    BatchNormStats,
    ProducerStats,
    bn_affine,
    lbyl_delivery,
    lbyl_paper_delivery,
    nm_delivery,
    nm_paper_delivery,
    restoration_loss,
)
from lbyl.methods import as_method

F64 = torch.float64


def random_bn(n, gen, eps=1e-5):
    return BatchNormStats(
        gamma=0.5 + torch.rand(n, generator=gen, dtype=F64),
        beta=torch.randn(n, generator=gen, dtype=F64),
        mean=torch.randn(n, generator=gen, dtype=F64),
        var=0.3 + torch.rand(n, generator=gen, dtype=F64),
        eps=eps,
    )


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


KEPT = torch.tensor([0, 1, 2, 3])
PRUNED = torch.tensor([4, 5])


def combination_layer(gen, m=20):
    """Pruned BN-scaled filters and BN biases are the same known combination of kept ones."""
    bn = random_bn(6, gen)
    g = bn.gamma / torch.sqrt(bn.var + bn.eps)
    scaled_kept = torch.randn(4, m, generator=gen, dtype=F64)
    bias_kept = torch.randn(4, generator=gen, dtype=F64)
    coefficients = torch.randn(4, 2, generator=gen, dtype=F64)
    scaled = torch.cat([scaled_kept, coefficients.T @ scaled_kept])
    b = torch.cat([bias_kept, coefficients.T @ bias_kept])
    beta = b + g * bn.mean  # b = beta - g * mean
    bn = BatchNormStats(bn.gamma, beta, bn.mean, bn.var, bn.eps)
    return ProducerStats(filters=scaled / g[:, None], bn=bn), coefficients


def test_bn_affine_matches_batchnorm(gen):
    bn = random_bn(4, gen)
    stats = ProducerStats(torch.randn(4, 7, generator=gen, dtype=F64), torch.randn(4, generator=gen, dtype=F64), bn)
    g, b = bn_affine(stats)
    raw = torch.randn(4, dtype=F64)  # w_i . x + bias_i without bias
    layer = torch.nn.BatchNorm1d(4, eps=bn.eps).double().eval()
    with torch.no_grad():
        layer.weight.copy_(bn.gamma), layer.bias.copy_(bn.beta)
        layer.running_mean.copy_(bn.mean), layer.running_var.copy_(bn.var)
    expected = layer((raw + stats.bias)[None])[0]
    assert torch.allclose(g * raw + b, expected, atol=1e-12)


def test_lbyl_recovers_known_coefficients(gen):
    stats, coefficients = combination_layer(gen)
    delivery = lbyl_delivery(stats, KEPT, PRUNED, lambda1=0.0, lambda2=0.0)
    assert (delivery - coefficients).abs().max() < 1e-8
    loss = restoration_loss(stats, KEPT, PRUNED, delivery)
    assert loss["re"].max() < 1e-16 and loss["be"].max() < 1e-16


def test_lbyl_with_bias_term_still_exact_when_biases_agree(gen):
    stats, coefficients = combination_layer(gen)
    delivery = lbyl_delivery(stats, KEPT, PRUNED, lambda1=3.0, lambda2=0.0)
    assert (delivery - coefficients).abs().max() < 1e-8


def test_lbyl_is_the_minimiser_of_the_loss(gen):
    bn = random_bn(8, gen)
    stats = ProducerStats(torch.randn(8, 12, generator=gen, dtype=F64), bn=bn)
    kept, pruned = torch.tensor([0, 2, 4, 6, 7]), torch.tensor([1, 3, 5])
    lam1, lam2 = 0.7, 0.2
    delivery = lbyl_delivery(stats, kept, pruned, lam1, lam2)

    def loss(s):
        terms = restoration_loss(stats, kept, pruned, s)
        return (terms["re"] + lam1 * terms["be"] + lam2 * terms["ae"]).sum()

    best = loss(delivery)
    for _ in range(20):
        assert loss(delivery + 1e-3 * torch.randn(delivery.shape, generator=gen, dtype=F64)) > best


def test_lbyl_single_pruned_channel_is_least_squares(gen):
    stats = ProducerStats(torch.randn(5, 9, generator=gen, dtype=F64), bn=random_bn(5, gen))
    kept, pruned = torch.tensor([0, 1, 2, 3]), torch.tensor([4])
    w = stats.filters * bn_affine(stats)[0][:, None]
    expected = np.linalg.lstsq(w[kept].T.numpy(), w[pruned].T.numpy(), rcond=None)[0]
    assert np.allclose(lbyl_delivery(stats, kept, pruned).numpy(), expected, atol=1e-10)


def test_lbyl_singular_system_falls_back_to_minimum_norm(gen):
    # two identical kept filters and lambdas 0: A is singular, the solution splits evenly
    filters = torch.tensor([[1.0, 2.0], [1.0, 2.0], [2.0, 4.0]], dtype=F64)
    stats = ProducerStats(filters)
    delivery = lbyl_delivery(stats, torch.tensor([0, 1]), torch.tensor([2]))
    assert torch.allclose(delivery, torch.tensor([[1.0], [1.0]], dtype=F64))


def test_nm_exact_factor_for_rescaled_duplicate(gen):
    bn = random_bn(2, gen)
    w = torch.randn(1, 10, generator=gen, dtype=F64)
    stats = ProducerStats(torch.cat([w, 0.4 * w]), bn=bn)
    delivery = nm_delivery(stats, torch.tensor([0]), torch.tensor([1]))
    sigma = torch.sqrt(bn.var + bn.eps)
    expected = 0.4 * (bn.gamma[1] / bn.gamma[0]) * (sigma[0] / sigma[1])
    assert torch.allclose(delivery, expected.reshape(1, 1))


def test_nm_picks_most_similar_kept_filter(gen):
    kept_filters = torch.eye(3, 5, dtype=F64)
    pruned = torch.tensor([[0.1, 2.0, 0.1, 0, 0]], dtype=F64)
    stats = ProducerStats(torch.cat([kept_filters, pruned]))
    delivery = nm_delivery(stats, torch.tensor([0, 1, 2]), torch.tensor([3]))
    assert delivery[:, 0].nonzero().flatten().tolist() == [1]


# --- nm-paper and lbyl-paper differ from the exact forms exactly where method.md says ---


def test_nm_paper_uses_inverse_ratio_and_variance(gen):
    bn = random_bn(2, gen)
    w = torch.randn(1, 10, generator=gen, dtype=F64)
    stats = ProducerStats(torch.cat([w, 0.4 * w]), bn=bn)
    paper = nm_paper_delivery(stats, torch.tensor([0]), torch.tensor([1]))
    expected = 0.4 * (bn.gamma[0] / bn.gamma[1]) * (bn.var[1] / bn.var[0])
    assert torch.allclose(paper, expected.reshape(1, 1))
    assert not torch.allclose(paper, nm_delivery(stats, torch.tensor([0]), torch.tensor([1])))


def test_lbyl_paper_regresses_raw_filters_and_delivers_d(gen):
    # raw pruned filters are a known combination C of raw kept filters
    bn = random_bn(6, gen)
    kept_filters = torch.randn(4, 20, generator=gen, dtype=F64)
    coefficients = torch.randn(4, 2, generator=gen, dtype=F64)
    stats = ProducerStats(torch.cat([kept_filters, coefficients.T @ kept_filters]), bn=bn)
    paper = lbyl_paper_delivery(stats, KEPT, PRUNED, 0.0, 0.0)
    assert torch.allclose(paper, coefficients, atol=1e-10)  # d, not K * d
    g, _ = bn_affine(stats)
    exact = lbyl_delivery(stats, KEPT, PRUNED, 0.0, 0.0)
    # the exact method delivers K_k d_k with K = g_j / g_k (BN-scaled filters)
    assert torch.allclose(exact, coefficients * g[PRUNED][None, :] / g[KEPT][:, None], atol=1e-10)
    assert not torch.allclose(paper, exact, atol=1e-3)


def _paper_reference(stats, j, lam1, lam2, outer_product=False, true_sigma=False):
    """One pruned channel, assembled term by term from method.md's list."""
    w = stats.filters.numpy()
    bn = stats.bn
    gamma, beta, mean = bn.gamma.numpy(), bn.beta.numpy(), bn.mean.numpy()
    sigma = np.sqrt(bn.var.numpy() + bn.eps) if true_sigma else bn.var.numpy()
    k = KEPT.numpy()
    ratio = (gamma[j] / gamma[k]) * (sigma[k] / sigma[j])
    a = mean - sigma * beta / gamma
    c2 = (gamma[j] / sigma[j]) ** 2
    wk = w[k]
    bias_matrix = np.outer(a[k], a[k]) if outer_product else a[k] @ a[k] * np.eye(len(k))
    matrix = wk @ wk.T + lam2 * np.diag(ratio**2) + lam1 * c2 * bias_matrix
    rhs = wk @ w[j] + lam1 * c2 * a[j] * a[k]
    return np.linalg.solve(matrix, rhs)


def test_lbyl_paper_bias_term_uses_norm_on_diagonal(gen):
    stats = ProducerStats(torch.randn(6, 15, generator=gen, dtype=F64), bn=random_bn(6, gen))
    paper = lbyl_paper_delivery(stats, KEPT, PRUNED, lambda1=0.8, lambda2=0.0).numpy()
    for col, j in enumerate(PRUNED.tolist()):
        assert np.allclose(paper[:, col], _paper_reference(stats, j, 0.8, 0.0), atol=1e-10)
        assert not np.allclose(paper[:, col], _paper_reference(stats, j, 0.8, 0.0, outer_product=True), atol=1e-4)


def test_lbyl_paper_penalty_uses_variance_as_sigma(gen):
    stats = ProducerStats(torch.randn(6, 15, generator=gen, dtype=F64), bn=random_bn(6, gen))
    paper = lbyl_paper_delivery(stats, KEPT, PRUNED, lambda1=0.0, lambda2=5.0).numpy()
    for col, j in enumerate(PRUNED.tolist()):
        assert np.allclose(paper[:, col], _paper_reference(stats, j, 0.0, 5.0), atol=1e-10)
        assert not np.allclose(paper[:, col], _paper_reference(stats, j, 0.0, 5.0, true_sigma=True), atol=1e-4)


def test_lbyl_paper_without_bn_is_ridge_with_discarded_intercept(gen):
    filters = torch.randn(6, 15, generator=gen, dtype=F64)
    bias = torch.randn(6, generator=gen, dtype=F64)
    stats = ProducerStats(filters, bias)
    paper = lbyl_paper_delivery(stats, KEPT, PRUNED, lambda1=0.0, lambda2=0.3).numpy()
    design = np.concatenate([filters.numpy(), bias.numpy()[:, None]], axis=1)
    x, y = design[KEPT.numpy()].T, design[PRUNED.numpy()].T
    x, y = x - x.mean(0), y - y.mean(0)
    expected = np.linalg.solve(x.T @ x + 0.3 * np.eye(4), x.T @ y)
    assert np.allclose(paper, expected, atol=1e-10)
    # lambda1 is unused by the paper variant, not by the exact one
    assert torch.equal(lbyl_paper_delivery(stats, KEPT, PRUNED, 5.0, 0.3), lbyl_paper_delivery(stats, KEPT, PRUNED, 0.0, 0.3))
    assert not torch.allclose(lbyl_delivery(stats, KEPT, PRUNED, 5.0, 0.3), lbyl_delivery(stats, KEPT, PRUNED, 0.0, 0.3))


def test_prune_is_zero_and_loss_is_filter_energy(gen):
    stats = ProducerStats(torch.randn(6, 5, generator=gen, dtype=F64), bn=random_bn(6, gen))
    delivery = as_method("prune").delivery(stats, KEPT, PRUNED, "relu")
    assert delivery.shape == (4, 2) and not delivery.any()
    g, b = bn_affine(stats)
    loss = restoration_loss(stats, KEPT, PRUNED, delivery)
    assert torch.allclose(loss["re"], ((g[:, None] * stats.filters)[PRUNED] ** 2).sum(1))
    assert torch.allclose(loss["be"], b[PRUNED] ** 2)


def test_unknown_method_names_choices():
    with pytest.raises(ValueError, match="lbyl-paper"):
        as_method("magic")
