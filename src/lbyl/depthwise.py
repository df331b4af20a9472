"""Data-free statistics of a depthwise chain (an inverted residual's hidden channels).

Producer ``z1 = BN1(W x)`` -> ``a = f1(z1)`` -> depthwise ``d_j = h_j * a_j + c_j``
-> ``z2 = BN2(d)`` -> ``f2`` -> consumer. Channel ``j`` of every stage is one
channel, removed together; the consumer reads ``f2(z2)``, so restoration is the
usual problem with ``z2`` in the place of a producer's BN output. Its statistics,
from the model alone (docs/method.md, section 5f):

* marginals: BN2's running statistics are those of ``d``: ``z2_j`` has mean
  ``beta2_j`` and variance ``gamma2_j^2`` (as for any producer with a BatchNorm);
* correlations: ``z1`` Gaussian with BN1's marginals and the correlation of the
  producer filters (white input); ``Cov(a)`` through ``f1`` (Mehler's expansion,
  :func:`lbyl.activations.hermite_channel_covariance`); the depthwise filter mixes
  positions: with equal correlation ``rho`` between any two positions in a window,
  ``Cov(d_j, d_k) = Cov(a_j, a_k) ((1 - rho) h_j . h_k + rho (sum h_j)(sum h_k))``.
  ``rho`` is the value in [0, 1] whose predicted ``Var(d_j)`` best fits BN2's running
  variances (:func:`spatial_correlation`): BN2 has measured it.

The result is a :class:`ProducerStats` whose ``filters`` ``F`` satisfy
``F F^T = Cov(d)`` (rows scaled to BN2's variances) and whose BatchNorm is BN2, so
every method and both corrections apply unchanged.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from . import activations
from .activations import Activation, hermite_channel_covariance, standardise
from .covariance import preactivation_covariance
from .delivery import BatchNormStats, ProducerStats, bn_affine, scaled_filters


def spatial_correlation(activation_var: torch.Tensor, kernels: torch.Tensor, measured_var: torch.Tensor) -> float:
    """The position correlation ``rho`` in [0, 1] that best explains the depthwise outputs' variances.

    ``Var(d_j) = v_j ((1 - rho) |h_j|^2 + rho (sum h_j)^2)`` with ``v_j`` the variance of the
    depthwise input channel; least squares on the ratio to ``measured_var`` (BN2's running
    variance). Channels with nothing measured or nothing predicted do not vote.
    """
    independent = activation_var * (kernels**2).sum(dim=1)
    together = activation_var * kernels.sum(dim=1) ** 2
    usable = (measured_var > 0) & (independent + together > 0)
    if not bool(usable.any()):
        return 0.0
    a = independent[usable] / measured_var[usable]
    b = together[usable] / measured_var[usable]
    slope = b - a
    denominator = float((slope**2).sum())
    if denominator == 0:
        return 0.0
    return min(1.0, max(0.0, float((slope * (1 - a)).sum()) / denominator))


def depthwise_covariance(activation_covariance: torch.Tensor, kernels: torch.Tensor, measured_var: torch.Tensor | None) -> torch.Tensor:
    """``Cov(d)`` of a depthwise conv's outputs from the covariance of its input channels.

    Any two positions of a window are given the correlation ``rho`` fitted to ``measured_var``
    (the running variances of the BatchNorm after the conv; None: 0, positions independent).
    """
    sums = kernels.sum(dim=1)
    rho = spatial_correlation(activation_covariance.diagonal(), kernels, measured_var) if measured_var is not None else 0.0
    return activation_covariance * ((1 - rho) * (kernels @ kernels.T) + rho * torch.outer(sums, sums))


def factor(covariance: torch.Tensor) -> torch.Tensor:
    """``F`` with ``F F^T = covariance`` (N x N). Methods read only ``F F^T``, so any factor
    does: Cholesky's, several times cheaper than an eigendecomposition, when the matrix is
    positive definite; else the eigenvectors, with negative eigenvalues of rounding set to 0."""
    symmetric = (covariance + covariance.T) / 2
    lower, info = torch.linalg.cholesky_ex(symmetric)
    if int(info) == 0:
        return lower
    values, vectors = torch.linalg.eigh(symmetric)
    return vectors * values.clamp_min(0).sqrt()


def depthwise_chain_stats(
    producer: ProducerStats, activation: Activation, kernels: torch.Tensor, kernel_bias: torch.Tensor | None,
    bn: BatchNormStats | None, consumer_activation: Activation | None = None, input_model: str = "white",
) -> ProducerStats:  # fmt: skip
    """Statistics of a depthwise stage's output channels, from the producer before it.

    ``producer``: the producer's filters and BN1; ``activation``: ``f1``, between BN1 and
    the depthwise conv; ``kernels``: the depthwise filters flattened (N x taps);
    ``kernel_bias``: its bias (or None); ``bn``: BN2 (or None); ``consumer_activation``:
    ``f2``, after BN2 (with BN2, the covariance of ``f2(z2)`` is added: the consumers read it);
    ``input_model``: the producer's input covariance behind z1's correlations (``"white"``,
    ``"bn"`` or ``"propagated"``, :func:`lbyl.covariance.preactivation_covariance`).
    """
    w, b = scaled_filters(producer)
    if producer.bn is not None:  # BN1's running statistics fix z1's mean and variance
        mean1, std1 = producer.bn.beta.to(torch.float64), producer.bn.gamma.to(torch.float64).abs()
        correlated = w @ w.T if input_model == "white" else preactivation_covariance(producer, input_model)
        cov1 = standardise(correlated)[1] * torch.outer(std1, std1)
    else:
        mean1, cov1 = b, w @ w.T
    cov_a = hermite_channel_covariance(activation, mean1, cov1)
    kernels = kernels.to(torch.float64)
    sums = kernels.sum(dim=1)
    measured = bn.var.to(torch.float64).clamp_min(0) if bn is not None else None
    cov_d = depthwise_covariance(cov_a, kernels, measured)
    if bn is None:  # the model's own prediction of the depthwise outputs
        expected = sums * activations.mean(activation, mean1, cov1.diagonal().clamp_min(0).sqrt())
        bias = expected + (kernel_bias.to(torch.float64) if kernel_bias is not None else 0.0)
        return ProducerStats(filters=factor(cov_d), bias=bias, bn=None)
    std2 = measured.sqrt()
    cov_d = standardise(cov_d)[1] * torch.outer(std2, std2)
    stats = ProducerStats(filters=factor(cov_d), bias=bn.mean.to(torch.float64), bn=bn)
    if consumer_activation is None:
        return stats
    # z2 ~ N(beta2, g2 Cov(d) g2): the consumers read f2(z2), whose covariance is as cheap as z2's
    scale, offsets = bn_affine(stats)
    covariance = cov_d * torch.outer(scale, scale)  # = w w^T of the scaled filters, without the N^3 product
    return replace(stats, activation_covariance=hermite_channel_covariance(consumer_activation, offsets, covariance))
