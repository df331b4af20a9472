"""Data-free second moments of a producer's channels.

Pure functions on float64 tensors. The BN output of channel ``i`` is
``z_i = g_i (w_i . x) + b_i`` (:func:`lbyl.delivery.bn_affine`); with an input
covariance ``Sigma`` its covariance is ``W' Sigma W'^T``. Three input models give
``Sigma`` without data: ``"white"`` (``Sigma = I``, the paper's loss), ``"bn"`` (fitted
to the BatchNorm's running variances, :func:`input_covariance`) and ``"propagated"``
(propagated from the layers upstream, :mod:`lbyl.statistics`, where the graph allows;
white elsewhere).
"""
from __future__ import annotations

import torch

from .activations import as_activation, hermite_channel_covariance, standardise
from .delivery import ProducerStats, bn_affine, scaled_filters

INPUT_MODELS = ("propagated", "white", "bn")


def spans_input_space(filters: torch.Tensor) -> bool:
    """Whether the rows of ``filters`` (K x M) span all of R^M, so that they rebuild any filter exactly.

    The eigenvalues of the M x M Gram matrix settle a well-conditioned case at a fraction of the
    cost of the rank (an SVD of K x M); a near-singular one is left to the rank's own tolerance.
    """
    if filters.shape[0] < filters.shape[1]:
        return False
    eigenvalues = torch.linalg.eigvalsh(filters.T @ filters)
    if eigenvalues[0] > 1e-10 * eigenvalues[-1] > 0:  # sigma_min / sigma_max > 1e-5: far above the rank's tolerance
        return True
    return int(torch.linalg.matrix_rank(filters)) == filters.shape[1]


def nonnegative_least_squares(matrix: torch.Tensor, target: torch.Tensor, iterations: int = 500) -> torch.Tensor:
    """``argmin_{a >= 0} |matrix @ a - target|^2`` by accelerated projected gradient (FISTA).

    A fixed number of steps of size ``1 / |matrix|_2^2``, from zero. The gradient
    step ``x - step * matrix^T (matrix x - target)`` is precomputed as the affine
    map ``(I - step matrix^T matrix) x + step matrix^T target``: one
    matrix-vector product per step.
    """
    normal = matrix.T @ matrix
    lipschitz = float(torch.linalg.eigvalsh(normal)[-1]) if normal.numel() else 0.0  # |matrix|_2^2
    step = 1.0 / max(lipschitz, torch.finfo(torch.float64).tiny)
    descent = torch.eye(normal.shape[0], dtype=torch.float64, device=matrix.device) - step * normal
    shifted = step * (matrix.T @ target)
    a = previous = torch.zeros(matrix.shape[1], dtype=torch.float64, device=matrix.device)
    for k in range(iterations):
        momentum = k + 1
        # Nesterov extrapolation a + (m - 1)/(m + 2) (a - previous), then a projected gradient step
        look = torch.lerp(a, previous, -(momentum - 1) / (momentum + 2)) if momentum > 1 else a
        previous, a = a, torch.addmv(shifted, descent, look).clamp_min_(0)
    return a


def input_covariance(stats: ProducerStats) -> tuple[float, torch.Tensor] | None:
    """The producer's input covariance, estimated from its BatchNorm's running variances.

    BN records ``var_i = w_i^T Sigma w_i`` for every filter: the input covariance
    ``Sigma`` along each filter direction. The estimate is
    ``Sigma = sigma2 I + sum_i alpha_i w_i w_i^T`` with ``alpha >= 0`` fitted to
    those variances (non-negative least squares), and ``sigma2 = min_i var_i / |w_i|^2``,
    the largest isotropic part that no channel contradicts. Returns
    ``(sigma2, alpha)``, or None without BN (nothing to estimate from).
    """
    terms = _covariance_terms(stats)
    return None if terms is None else terms[:2]


def _covariance_terms(stats: ProducerStats) -> tuple[float, torch.Tensor, torch.Tensor] | None:
    """``(sigma2, alpha, W W^T)`` of :func:`input_covariance` (the Gram matrix is reused)."""
    if stats.bn is None:
        return None
    filters = stats.filters.to(torch.float64)
    products = filters @ filters.T
    sq_norms = products.diagonal()
    var = stats.bn.var.to(torch.float64).clamp_min(0)
    live = sq_norms > 0
    if not bool(live.any()):
        return None
    sigma2 = float((var[live] / sq_norms[live]).min())
    excess = (var - sigma2 * sq_norms).clamp_min(0)
    alpha = nonnegative_least_squares(products**2, excess)
    return sigma2, alpha, products


def preactivation_covariance(stats: ProducerStats, input_model: str = "bn", gram: torch.Tensor | None = None) -> torch.Tensor:
    """``W' Sigma W'^T`` (N x N): the covariance of the BN outputs under the input model.

    ``"bn"``: ``Sigma`` from :func:`input_covariance`, kept in N x N form as
    ``sigma2 W' W'^T + (W' W^T) diag(alpha) (W W'^T)``; ``"white"``, or no BN: ``Sigma = I``.
    Without BN but with data-free statistics (``stats.moments``, :mod:`lbyl.statistics`):
    their covariance, ``W C_x W^T`` for the input covariance ``C_x`` of the statistics model.
    ``gram``: ``W' W'^T`` if the caller has it (not computed twice).
    """
    if input_model not in INPUT_MODELS:
        raise ValueError(f"unknown input_model {input_model!r}; choose one of {', '.join(INPUT_MODELS)}")
    if stats.bn is None and stats.moments is not None:  # the data-free statistics of a layer without BN
        return stats.moments.covariance
    w, _ = scaled_filters(stats)
    if input_model == "propagated" and stats.input_covariance is not None and stats.bn is not None:
        return propagated_covariance(stats, w)
    gram = w @ w.T if gram is None else gram
    terms = _covariance_terms(stats) if input_model == "bn" else None
    if terms is None:
        return gram
    sigma2, alpha, products = terms
    mixed = bn_affine(stats)[0][:, None] * products  # W' W^T = diag(g) W W^T
    return sigma2 * gram + (mixed * alpha) @ mixed.T


def propagated_covariance(stats: ProducerStats, scaled: torch.Tensor | None = None) -> torch.Tensor:
    """The BN outputs' covariance from the propagated input covariance: the correlations of
    ``W Sigma W^T``, the variances ``gamma^2`` that the BatchNorm fixes (N x N)."""
    scaled = scaled_filters(stats)[0] if scaled is None else scaled
    correlation = standardise(scaled @ stats.input_covariance.to(scaled) @ scaled.T)[1]
    gamma = stats.bn.gamma.to(torch.float64).abs()
    return correlation * torch.outer(gamma, gamma)


def relu_covariance(
    mean: torch.Tensor, covariance: torch.Tensor, samples: int = 2**15, seed: int = 0, chunk: int = 4096
) -> torch.Tensor:
    """Covariance of ``relu(z)`` for ``z ~ N(mean, covariance)``, by seeded Monte Carlo.

    Deterministic for a given ``seed`` (samples are drawn on the CPU); the
    error of each entry shrinks as ``1 / sqrt(samples)``. Bivariate ReLU moments
    with non-zero means have no elementary closed form, so they are sampled.
    """
    mean, covariance = mean.to(torch.float64), covariance.to(torch.float64)
    n = mean.shape[0]
    values, vectors = torch.linalg.eigh((covariance + covariance.T) / 2)
    root = vectors * values.clamp_min(0).sqrt()
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(n, dtype=torch.float64, device=mean.device)
    second = torch.zeros(n, n, dtype=torch.float64, device=mean.device)
    for start in range(0, samples, chunk):
        noise = torch.randn(n, min(chunk, samples - start), generator=generator, dtype=torch.float64)
        f = (mean[:, None] + root @ noise.to(mean.device)).clamp_min(0)
        total += f.sum(dim=1)
        second += f @ f.T
    average = total / samples
    return second / samples - torch.outer(average, average)


def solve_space(stats: ProducerStats, kept_filters: torch.Tensor, input_model: str, activation) -> str:
    """Where LBYL measures a pruned channel's error for this layer.

    ``"after-activation"`` when the statistics carry the covariance the consumers read
    (a depthwise stage, :mod:`lbyl.depthwise`); else
    ``"white"`` (the paper's filter distance), ``"bn"`` (the input covariance from
    the BatchNorm variances) or ``"after-relu"`` (the ReLU outputs under the input
    model's covariance, when the kept filters span the input space and a BN and a
    ReLU follow: every filter is then rebuilt exactly before the ReLU, that loss is
    zero and cannot tell solutions apart, so the activation error alone decides).
    ``kept_filters`` are the kept BN-scaled filters. ``activation``: an
    :class:`lbyl.activations.Activation` or its name; in that case any activation other
    than the identity is measured after it (``"after-activation"`` for all but the ReLU,
    whose sampled covariance predates the deterministic one and keeps the published tables).
    """
    if stats.activation_covariance is not None:
        return "after-activation"
    name = as_activation(activation).name
    if stats.bn is None:  # with the statistics of 5g, spanning kept filters are measured after the activation
        spans = stats.moments is not None and name != "identity" and spans_input_space(kept_filters)
        return "after-activation" if spans else "white"
    if name != "identity" and spans_input_space(kept_filters):
        return "after-relu" if name == "relu" else "after-activation"
    if input_model == "propagated" and stats.input_covariance is None:
        return "white"
    return input_model


def channel_covariance(
    stats: ProducerStats, input_model: str, space: str, gram: torch.Tensor | None = None, activation=None
) -> torch.Tensor:
    """Covariance of the channels a consumer reads, in the space LBYL was solved in (N x N).

    ``space="after-relu"``: of the ReLU outputs, ``z`` Gaussian with means ``beta``
    and the input model's covariance; otherwise of the BN outputs themselves.
    """
    if space == "after-activation" and stats.activation_covariance is not None:
        return stats.activation_covariance.to(torch.float64)
    covariance = preactivation_covariance(stats, input_model, gram)
    if space == "after-activation":  # deterministic (Mehler), unlike the ReLU's sampled covariance
        mean = stats.bn.beta if stats.bn is not None else stats.moments.mean
        return hermite_channel_covariance(activation, mean.to(torch.float64), covariance)
    if space == "after-relu":
        return relu_covariance(stats.bn.beta.to(torch.float64), covariance)
    return covariance


def read_covariance(stats: ProducerStats, input_model: str, activation) -> torch.Tensor:
    """Covariance of the channels as the consumers read them, after the activation (N x N).

    A depthwise chain's statistics carry it; otherwise the pre-activations are Gaussian with the
    input model's covariance (a BatchNorm fixes their variances to ``gamma^2`` and their means to
    ``beta``; without one, the data-free moments, or white inputs and the bias) and the
    activation's covariance follows by Mehler's expansion.
    """
    if stats.activation_covariance is not None:
        return stats.activation_covariance.to(torch.float64)
    covariance = preactivation_covariance(stats, input_model)
    if stats.bn is not None:
        gamma = stats.bn.gamma.to(torch.float64).abs()
        covariance = standardise(covariance)[1] * torch.outer(gamma, gamma)
        mean = stats.bn.beta.to(torch.float64)
    elif stats.moments is not None:
        mean = stats.moments.mean.to(torch.float64)
    else:
        mean = stats.bias.to(torch.float64) if stats.bias is not None else torch.zeros_like(covariance[0])
    if as_activation(activation).name == "identity":
        return covariance
    return hermite_channel_covariance(activation, mean, covariance)
