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
from .activations import Activation, hermite_channel_covariance, scale_mixture, standardise
from .covariance import preactivation_covariance
from .delivery import BatchNormStats, ProducerStats, scaled_filters


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


def window(kernels: torch.Tensor, rho: float) -> torch.Tensor:
    """``(1 - rho) h_j . h_k + rho (sum h_j)(sum h_k)`` (N x N): what the depthwise filters make of
    two channels' covariance when any two positions of a window have the correlation ``rho``."""
    sums = kernels.sum(dim=1)
    return (1 - rho) * (kernels @ kernels.T) + rho * torch.outer(sums, sums)


def depthwise_covariance(activation_covariance: torch.Tensor, kernels: torch.Tensor, measured_var: torch.Tensor | None) -> torch.Tensor:
    """``Cov(d)`` of a depthwise conv's outputs from the covariance of its input channels.

    Any two positions of a window are given the correlation ``rho`` fitted to ``measured_var``
    (the running variances of the BatchNorm after the conv; None: 0, positions independent).
    """
    rho = spatial_correlation(activation_covariance.diagonal(), kernels, measured_var) if measured_var is not None else 0.0
    return activation_covariance * window(kernels, rho)


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
    spread: float = 0.0,
) -> ProducerStats:  # fmt: skip
    """Statistics of a depthwise stage's output channels, from the producer before it.

    ``producer``: the producer's filters and BN1; ``activation``: ``f1``, between BN1 and
    the depthwise conv; ``kernels``: the depthwise filters flattened (N x taps);
    ``kernel_bias``: its bias (or None); ``bn``: BN2 (or None); ``consumer_activation``:
    ``f2``, after BN2 (with BN2, the covariance of ``f2(z2)`` is added: the consumers read it);
    ``input_model``: the producer's input covariance behind z1's correlations (``"white"``,
    ``"bn"`` or ``"propagated"``, :func:`lbyl.covariance.preactivation_covariance`).
    ``spread``: z1 is a Gaussian scale mixture, ``beta1 + s g`` with one scale ``s`` shared by
    the channels and the window's positions (:func:`lbyl.activations.scale_mixture`; 0: Gaussian).
    Given ``s`` the chain is the Gaussian model above; its moments are mixed over ``s``
    (docs/method.md, section 5l).
    """
    w, b = scaled_filters(producer)
    if producer.bn is not None:  # BN1's running statistics fix z1's mean and variance
        mean1, std1 = producer.bn.beta.to(torch.float64), producer.bn.gamma.to(torch.float64).abs()
        correlated = w @ w.T if input_model == "white" else preactivation_covariance(producer, input_model)
        cov1 = standardise(correlated)[1] * torch.outer(std1, std1)
    else:
        mean1, cov1 = b, w @ w.T
    squares, weights = scale_mixture(spread)
    std1 = cov1.diagonal().clamp_min(0).sqrt()
    # a = f1(z1) given each scale: means and variances (S x N) first, covariances one scale at a time
    given = [activations.moments(activation, mean1, std1 * s2.sqrt()) for s2 in squares]
    means, variances = torch.stack([m for m, _ in given]), torch.stack([v for _, v in given])
    average = weights @ means
    shared = (means - average).T @ ((means - average) * weights[:, None])  # Cov_s(E[a | s])
    kernels = kernels.to(torch.float64)
    sums = kernels.sum(dim=1)
    measured = bn.var.to(torch.float64).clamp_min(0) if bn is not None else None
    conditional_var = weights @ variances
    rest = None if measured is None else (measured - shared.diagonal() * sums**2).clamp_min(0)
    mixing = window(kernels, spatial_correlation(conditional_var, kernels, rest) if rest is not None else 0.0)
    predicted = conditional_var * mixing.diagonal() + shared.diagonal() * sums**2  # Var d
    # BN2 recorded Var d: every scale's deviations are rescaled to it
    ratio = torch.ones_like(predicted) if bn is None else torch.where(
        predicted > 0, (measured / predicted.clamp_min(torch.finfo(torch.float64).tiny)).sqrt(), 0.0)
    stage = bn is not None and consumer_activation is not None
    if stage:  # z2 given the scale: mean beta2 + g (E[d | s] - E d), covariance g Cov(d | s) g; consumers read f2(z2)
        offsets, gain = bn.beta.to(torch.float64), bn.gamma.to(torch.float64) / torch.sqrt(bn.var.to(torch.float64) + bn.eps) * ratio
    conditional, second, outputs = 0.0, 0.0, []
    for s2, q, m in zip(squares, weights, means):
        cov_a = hermite_channel_covariance(activation, mean1, cov1 * s2)
        conditional = conditional + q * cov_a
        if stage:
            mean2, cov2 = offsets + gain * sums * (m - average), torch.outer(gain, gain) * cov_a * mixing
            out_mean = activations.mean(consumer_activation, mean2, cov2.diagonal().clamp_min(0).sqrt())
            out_cov = hermite_channel_covariance(consumer_activation, mean2, cov2)
            second = second + q * (out_cov + torch.outer(out_mean, out_mean))
            outputs.append(out_mean)
    cov_d = (conditional * mixing + shared * torch.outer(sums, sums)) * torch.outer(ratio, ratio)
    if bn is None:  # the model's own prediction of the depthwise outputs
        bias = sums * average + (kernel_bias.to(torch.float64) if kernel_bias is not None else 0.0)
        return ProducerStats(filters=factor(cov_d), bias=bias, bn=None)
    stats = ProducerStats(filters=factor(cov_d), bias=bn.mean.to(torch.float64), bn=bn)
    if not stage:
        return stats
    out_average = weights @ torch.stack(outputs)
    covariance = second - torch.outer(out_average, out_average)
    # Gaussian (spread 0): the corrections read f2's moments at BN2's marginals, as they always have
    return replace(stats, activation_covariance=(covariance + covariance.T) / 2,
                   activation_mean=out_average if spread else None)  # fmt: skip
