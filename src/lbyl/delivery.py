"""Delivery matrices: how pruned channels leave their information to kept ones.

Pure functions on float64 tensors; no ``nn.Module`` here. Notation follows the
method note: a producer has ``N`` filters ``w_i`` (rows of ``filters``), an
optional BatchNorm, and the BN output of channel ``i`` is
``z_i = g_i * (w_i . x) + b_i``. A delivery matrix ``S`` has shape
``(len(kept), len(pruned))``; column ``j`` says how much of pruned channel ``j``
each kept channel takes over, and every consumer is rewritten as
``V[:, K] += V[:, P] @ S.T``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

@dataclass(frozen=True)
class BatchNormStats:
    """Parameters and running statistics of a BatchNorm layer (all length N)."""

    gamma: torch.Tensor
    beta: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    eps: float


@dataclass(frozen=True)
class PreactivationMoments:
    """Data-free mean (N) and covariance (N x N) of a producer's outputs before its activation,
    for a producer without BatchNorm (:mod:`lbyl.statistics`); ``source`` says where they come from."""

    mean: torch.Tensor
    covariance: torch.Tensor
    source: str = ""


@dataclass(frozen=True)
class ProducerStats:
    """Everything restoration may read about one producer layer.

    ``filters`` is N x M (flattened output filters), ``bias`` the producer's
    own bias (or None), ``bn`` the BatchNorm that follows it (or None), ``moments``
    the data-free statistics of its outputs when no BatchNorm follows (or None).
    ``activation_covariance``: the covariance of the channels as the consumers read
    them (after the activation), when the statistics are a model of a later stage
    (:mod:`lbyl.depthwise`); LBYL then measures its error there. ``input_covariance``: the
    covariance of the producer's input (M x M) propagated from the model (:mod:`lbyl.statistics`),
    for a pointwise producer with a BatchNorm (or None). ``activation_mean``: the channels' mean
    as the consumers read them, where the model of a later stage gives it (a depthwise stage
    with a scale mixture); the corrections then read it and the diagonal of ``activation_covariance``.
    """

    filters: torch.Tensor
    bias: torch.Tensor | None = None
    bn: BatchNormStats | None = None
    activation_covariance: torch.Tensor | None = None
    moments: PreactivationMoments | None = None
    input_covariance: torch.Tensor | None = None
    activation_mean: torch.Tensor | None = None

    @property
    def channels(self) -> int:
        return self.filters.shape[0]


def bn_affine(stats: ProducerStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale ``g`` and shift ``b`` with ``z_i = g_i (w_i . x) + b_i``.

    With BN: ``g = gamma / sqrt(var + eps)``, ``b = beta + g * (bias - mean)``;
    without BN: ``g = 1`` and ``b`` is the producer's bias (zero if it has none).
    """
    n = stats.channels
    dtype, device = torch.float64, stats.filters.device
    bias = stats.bias.to(dtype) if stats.bias is not None else torch.zeros(n, dtype=dtype, device=device)
    if stats.bn is None:
        return torch.ones(n, dtype=dtype, device=device), bias
    bn = stats.bn
    g = bn.gamma.to(dtype) / torch.sqrt(bn.var.to(dtype) + bn.eps)
    b = bn.beta.to(dtype) + g * (bias - bn.mean.to(dtype))
    return g, b


def scaled_filters(stats: ProducerStats) -> tuple[torch.Tensor, torch.Tensor]:
    """BN-scaled filters ``w'_i = g_i w_i`` (N x M) and BN biases ``b`` (N)."""
    g, b = bn_affine(stats)
    return g[:, None] * stats.filters.to(torch.float64), b


def prune_delivery(kept: torch.Tensor, pruned: torch.Tensor, *, device=None) -> torch.Tensor:
    """Plain pruning: nothing is delivered (``S = 0``)."""
    return torch.zeros(len(kept), len(pruned), dtype=torch.float64, device=device)


def _nearest_by_cosine(
    filters: torch.Tensor, kept: torch.Tensor, pruned: torch.Tensor, usable: torch.Tensor | None = None
) -> torch.Tensor:
    """For each pruned filter, the position (in ``kept``) of the most cosine-similar kept filter.

    ``usable`` (N bools) restricts the partners to the kept channels marked True.
    """
    unit = filters / filters.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    similarity = unit[kept] @ unit[pruned].T  # |K| x |P|
    if usable is not None:
        similarity[~usable[kept]] = -torch.inf
    return similarity.argmax(dim=0)


def _ratio_or_zero(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator``, and 0 where the denominator is 0."""
    nonzero = denominator != 0
    return torch.where(nonzero, numerator, 0) / torch.where(nonzero, denominator, 1)


def _one_per_column(match: torch.Tensor, factor: torch.Tensor, n_kept: int) -> torch.Tensor:
    delivery = torch.zeros(n_kept, len(match), dtype=torch.float64, device=factor.device)
    delivery[match, torch.arange(len(match), device=factor.device)] = factor
    return delivery


def nm_delivery(stats: ProducerStats, kept: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Neuron Merging with the exact BN factor.

    Each pruned ``j`` goes to the kept ``k`` of largest cosine similarity, with
    ``S[k, j] = (|w_j| / |w_k|) * (gamma_j / gamma_k) * (sigma_k / sigma_j)``:
    if ``w_j = c w_k`` (c > 0) and the BN biases agree, ReLU(z_j) = S[k, j] ReLU(z_k)
    exactly.

    Degenerate channels: a kept channel whose output does not depend on the
    input (all-zero filter, or BN gamma exactly 0) cannot take over a pruned
    one and is never chosen as a partner; a pruned channel of that kind has
    nothing to deliver (its column of ``S`` is 0), and so has one whose every
    possible partner is degenerate.
    """
    filters = stats.filters.to(torch.float64)
    g, _ = bn_affine(stats)
    norms = filters.norm(dim=1)
    live = (norms > 0) & (g != 0)
    match = _nearest_by_cosine(filters, kept, pruned, usable=live)
    k = kept[match]
    factor = _ratio_or_zero(norms[pruned] * g[pruned], norms[k] * g[k])
    return _one_per_column(match, factor, len(kept))


def nm_paper_delivery(
    stats: ProducerStats, kept: torch.Tensor, pruned: torch.Tensor, *, threshold: float | None = None
) -> torch.Tensor:
    """Neuron Merging as the authors' released code computes it.

    Only for reproducing published tables. With BN, the factor's BN ratio is
    inverted, ``(gamma_k / gamma_j) * (var_j / var_k)``, and uses the running
    variance where the standard deviation is meant; on exactly duplicated
    filters this is worse than plain pruning. Without BN, the release appends
    the producer's bias to every filter, so the cosine match and the norm ratio
    are taken on ``[w_i | bias_i]`` (without BN and without a bias this equals
    :func:`nm_delivery`).

    ``threshold``: the release merges a pruned channel only when the cosine
    similarity to its chosen partner is at least this value, and otherwise
    just drops it (its column of ``S`` stays zero). ``None`` merges every
    pruned channel. The released LeNet-300-100 script uses 0.45.

    Degenerate channels (the release would divide by zero): all-zero filters
    and BN gamma exactly 0 are handled as in :func:`nm_delivery` (never a
    partner, nothing delivered), and a running variance below BN's ``eps``
    counts as ``eps``.
    """
    filters = stats.filters.to(torch.float64)
    if stats.bn is None and stats.bias is not None:
        filters = torch.cat([filters, stats.bias.to(torch.float64)[:, None]], dim=1)
    norms = filters.norm(dim=1)
    live = norms > 0
    if stats.bn is not None:
        gamma = stats.bn.gamma.to(torch.float64)
        live = live & (gamma != 0)
    match = _nearest_by_cosine(filters, kept, pruned, usable=live)
    k = kept[match]
    tiny = torch.finfo(torch.float64).tiny
    factor = _ratio_or_zero(norms[pruned], norms[k])
    if stats.bn is not None:
        var = stats.bn.var.to(torch.float64).clamp_min(max(stats.bn.eps, tiny))
        factor = factor * _ratio_or_zero(gamma[k], gamma[pruned]) * (var[pruned] / var[k])
    factor = torch.where(live[k] & live[pruned], factor, 0)
    if threshold is not None:
        cosine = (filters[pruned] * filters[k]).sum(dim=1) / (norms[pruned] * norms[k]).clamp_min(tiny)
        factor = torch.where(cosine >= threshold, factor, torch.zeros_like(factor))
    return _one_per_column(match, factor, len(kept))


#: eigenvalues of the normal matrix below this fraction of the largest count as zero
RCOND = 1e-10


def solve_normal_equations(
    matrix: torch.Tensor, rhs: torch.Tensor, rcond: float = RCOND
) -> tuple[torch.Tensor, float]:
    """Solve ``matrix @ X = rhs`` for symmetric PSD ``matrix``, eigenvalues at most ``rcond``
    times the largest treated as zero (minimum-norm solution in their directions).

    So a nearly singular system (lambdas 0 and two kept filters almost equal) has a
    bounded solution that varies continuously up to the cut-off instead of a blow-up
    before it. The usual case is certified without an eigendecomposition: with the
    Cholesky factor ``L``, ``min eig >= 1 / tr(A^-1) = 1 / |L^-1|_F^2`` and
    ``max eig <= tr(A)``, so ``tr(A) tr(A^-1) < 1 / rcond`` proves that nothing falls
    below the cut-off and the Cholesky solution is the answer; otherwise the
    eigendecomposition decides. Returns ``(X, condition number)``: ``max / min``
    eigenvalue (``inf`` when singular), exact from the eigendecomposition, else from
    power iterations on ``A`` and ``A^-1`` (an estimate from below).
    """
    if matrix.shape[0] == 0:
        return rhs.new_zeros(rhs.shape), 1.0
    matrix = (matrix + matrix.T) / 2
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        inverse_factor = torch.linalg.solve_triangular(factor, eye, upper=False)  # A^-1 = Li^T Li
        if float(matrix.diagonal().sum()) * float((inverse_factor**2).sum()) * rcond < 1:
            solution = inverse_factor.T @ (inverse_factor @ rhs)
            return solution, _condition_estimate(matrix, inverse_factor)
    values, vectors = torch.linalg.eigh(matrix)
    top = float(values[-1])
    if top <= 0:
        return torch.zeros_like(rhs), float("inf")
    kept = values > rcond * top
    inverse = torch.where(kept, 1 / torch.where(kept, values, 1), 0)
    solution = vectors @ (inverse[:, None] * (vectors.T @ rhs))
    smallest = float(values[0])
    return solution, (top / smallest if smallest > 0 else float("inf"))


def _condition_estimate(matrix: torch.Tensor, inverse_factor: torch.Tensor, iterations: int = 20) -> float:
    """``max eig / min eig`` of SPD ``matrix`` by power iterations on it and on its inverse."""
    generator = torch.Generator().manual_seed(0)
    start = torch.rand(matrix.shape[0], generator=generator, dtype=matrix.dtype).to(matrix.device) + 0.5
    top, inverse_top = start / start.norm(), start / start.norm()
    for _ in range(iterations):
        top = matrix @ top
        top = top / top.norm()
        inverse_top = inverse_factor.T @ (inverse_factor @ inverse_top)
        inverse_top = inverse_top / inverse_top.norm()
    largest = float(top @ (matrix @ top))
    smallest = float(inverse_top @ (matrix @ inverse_top))
    return largest / smallest if smallest > 0 else float("inf")


def lbyl_system(
    gram: torch.Tensor, cross: torch.Tensor, b: torch.Tensor, kept: torch.Tensor, pruned: torch.Tensor,
    lambda1: float, lambda2: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = G + lambda1 b_K b_K^T + lambda2 I`` and ``R = C + lambda1 b_K b_P^T``; then ``S = A^{-1} R``."""
    b_kept, b_pruned = b[kept], b[pruned]
    eye = torch.eye(len(kept), dtype=torch.float64, device=gram.device)
    matrix = gram + lambda1 * torch.outer(b_kept, b_kept) + lambda2 * eye
    rhs = cross + lambda1 * torch.outer(b_kept, b_pruned)
    return matrix, rhs


def lbyl_solve(
    stats: ProducerStats, kept: torch.Tensor, pruned: torch.Tensor, lambda1: float = 0.0, lambda2: float = 0.0,
    covariance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """LBYL, exact closed form (method note, section 3): ``(S, condition number of A)``.

    Minimises, for every pruned ``j`` at once,
    ``|w'_j - W'_K s|^2 + lambda1 (b_j - b_K . s)^2 + lambda2 |s|^2``::

        A = W'_K W'_K^T + lambda1 b_K b_K^T + lambda2 I
        S = A^{-1} (W'_K W'_P^T + lambda1 b_K b_P^T)

    ``A`` is shared by all pruned channels: one factorisation per layer
    (:func:`solve_normal_equations`). ``covariance`` (N x N) replaces the
    white-input products ``W' W'^T`` by those of another metric, e.g. the
    channels' covariance under an input model (:mod:`lbyl.covariance`).
    """
    w, b = scaled_filters(stats)
    covariance = w @ w.T if covariance is None else covariance
    gram, cross = covariance[kept][:, kept], covariance[kept][:, pruned]
    return solve_normal_equations(*lbyl_system(gram, cross, b, kept, pruned, lambda1, lambda2))


def lbyl_delivery(
    stats: ProducerStats, kept: torch.Tensor, pruned: torch.Tensor, lambda1: float = 0.0, lambda2: float = 0.0,
    covariance: torch.Tensor | None = None,
) -> torch.Tensor:
    """The delivery matrix ``S`` of :func:`lbyl_solve`."""
    return lbyl_solve(stats, kept, pruned, lambda1, lambda2, covariance)[0]


def lbyl_paper_delivery(
    stats: ProducerStats,
    kept: torch.Tensor,
    pruned: torch.Tensor,
    lambda1: float = 0.0,
    lambda2: float = 0.0,
) -> torch.Tensor:
    """LBYL as the authors' released code computes it.

    Only for reproducing published tables; :func:`lbyl_delivery` is the method.
    Differences from the exact form (method note, section 3):

    - with BN: regresses the *raw* filters ``w_j`` on ``W_K`` with penalty
      ``lambda2 * sum_k (K_k d_k)^2``, ``K_k = (gamma_j/gamma_k)(var_k/var_j)``, and
      BN term ``lambda1 (gamma_j/var_j)^2 (a . d - a_j)^2`` with
      ``a = mean - bias - var * beta / gamma``; the outer product ``a a^T`` is
      replaced by ``|a|^2 I``; the running variance stands where sigma is meant;
      and ``d`` itself (not ``K * d``) is delivered. One solve per pruned channel.
    - without BN: ridge regression of ``[w_j | bias_j]`` on ``[W_K | bias_K]``
      with an intercept that is discarded (``lambda1`` is unused).

    Degenerate channels (the release would divide by zero): a channel with BN
    gamma exactly 0 outputs a constant, so as a kept channel it takes over
    nothing (its row of ``S`` is 0; the release's penalty ``K_k`` tends to
    infinity) and as a pruned channel it delivers nothing (its column is 0).
    A running variance below BN's ``eps`` counts as ``eps``. Singular systems
    (dead or duplicated kept filters with lambdas 0) get the minimum-norm
    solution.
    """
    filters = stats.filters.to(torch.float64)
    n_kept = len(kept)
    eye = torch.eye(n_kept, dtype=torch.float64, device=filters.device)
    if stats.bn is None:
        bias = stats.bias.to(torch.float64) if stats.bias is not None else None
        design = filters if bias is None else torch.cat([filters, bias[:, None]], dim=1)
        x = design[kept].T  # samples are filter entries, features are kept channels
        y = design[pruned].T
        x = x - x.mean(dim=0, keepdim=True)
        y = y - y.mean(dim=0, keepdim=True)
        return solve_normal_equations(x.T @ x + lambda2 * eye, x.T @ y)[0]

    bn = stats.bn
    gamma, beta = bn.gamma.to(torch.float64), bn.beta.to(torch.float64)
    delivery = torch.zeros(n_kept, len(pruned), dtype=torch.float64, device=filters.device)
    rows, columns = (gamma[kept] != 0).nonzero().flatten(), (gamma[pruned] != 0).nonzero().flatten()
    if len(rows) == 0 or len(columns) == 0:
        return delivery
    kept, pruned, n_kept = kept[rows], pruned[columns], len(rows)
    mean = bn.mean.to(torch.float64)
    var = bn.var.to(torch.float64).clamp_min(max(bn.eps, torch.finfo(torch.float64).tiny))
    bias = stats.bias.to(torch.float64) if stats.bias is not None else torch.zeros_like(mean)
    a = mean - bias - var * beta / torch.where(gamma != 0, gamma, 1)
    w_kept = filters[kept]
    gram = w_kept @ w_kept.T  # |K| x |K|, shared
    rhs = w_kept @ filters[pruned].T  # |K| x |P|
    k_ratio = (gamma[pruned][:, None] / gamma[kept][None, :]) * (var[kept][None, :] / var[pruned][:, None])  # |P| x |K|
    c2 = (gamma[pruned] / var[pruned]) ** 2  # |P|
    a_kept = a[kept]
    diagonal = lambda2 * k_ratio**2 + (lambda1 * c2 * a_kept.dot(a_kept))[:, None]  # |P| x |K|
    matrices = gram.expand(len(pruned), n_kept, n_kept) + torch.diag_embed(diagonal)
    rhs = rhs.T + (lambda1 * c2 * a[pruned])[:, None] * a_kept[None, :]  # |P| x |K|
    # Gram plus a non-negative diagonal: symmetric, so Cholesky (batched LU with several
    # threads returned invalid pivots on EfficientNet-Lite0's 1,152-channel layers)
    factors, info = torch.linalg.cholesky_ex(matrices)
    if int(info.max()) == 0:
        solution = torch.cholesky_solve(rhs.unsqueeze(-1), factors)
    else:  # singular: minimum-norm solutions
        solution = torch.linalg.pinv(matrices, hermitian=True) @ rhs.unsqueeze(-1)
    delivery[rows[:, None], columns[None, :]] = solution.squeeze(-1).T  # |K| x |P|
    return delivery


def gcv_lambda2(
    stats: ProducerStats,
    kept: torch.Tensor,
    pruned: torch.Tensor,
    lambda1: float = 0.0,
    grid: Sequence[float] | None = None,
) -> float:
    """lambda2 of the exact LBYL loss chosen by generalised cross-validation.

    The exact loss ``|w'_j - W'_K s|^2 + lambda1 (b_j - b_K . s)^2 + lambda2 |s|^2``
    is a ridge regression whose samples are the coordinates of the augmented
    filters ``[w'_i | sqrt(lambda1) b_i]`` and whose features are the kept
    channels. GCV scores each ``lambda2`` by how well the fit predicts held-out
    coordinates, in its rotation-invariant form (the loss itself is invariant
    under rotations of the input space when inputs are white)::

        GCV(lambda2) = n * RSS(lambda2) / (n - tr H(lambda2))^2

    pooled over all pruned channels of the layer (one lambda2 per layer, like
    the single factorisation of :func:`lbyl.delivery.lbyl_delivery`). Only the
    weights are read. ``grid`` defaults to ``v * 10**t`` for ``t`` in
    [-6, 2] in steps of 1/20, ``v`` being the mean squared norm of the kept
    augmented filters.
    """
    w, b = scaled_filters(stats)
    scale = math.sqrt(float(lambda1))
    x = torch.cat([w[kept], scale * b[kept, None]], dim=1).T  # n x |K|
    y = torch.cat([w[pruned], scale * b[pruned, None]], dim=1).T  # n x |P|
    n = x.shape[0]
    u, d, _ = torch.linalg.svd(x, full_matrices=False)
    d2 = d**2
    projected = ((u.T @ y) ** 2).sum(dim=1)  # energy of Y along each singular direction
    outside = float((y**2).sum() - projected.sum())  # part no lambda2 can fit
    if grid is None:
        v = float((x**2).sum(dim=0).mean())
        grid = [v * 10 ** (t / 20) for t in range(-120, 41)]
    best, best_score = None, math.inf
    for lam in grid:
        shrink = lam / (d2 + lam)
        rss = outside + float((shrink**2 * projected).sum())
        dof = n - float((d2 / (d2 + lam)).sum())
        if dof <= 0:
            continue
        score = n * rss / dof**2
        if score < best_score:
            best, best_score = float(lam), score
    if best is None:  # more kept channels than filter entries: every lambda2 interpolates
        return 0.0
    return best


def restoration_loss(
    stats: ProducerStats, kept: torch.Tensor, pruned: torch.Tensor, delivery: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The three data-free loss terms of a delivery matrix, per pruned channel.

    ``re``: residual error ``|w'_j - W'_K s_j|^2`` (BN-scaled filters);
    ``be``: BN error ``(b_j - b_K . s_j)^2``; ``ae``: activation-error proxy ``|s_j|^2``.
    Any method's ``S`` can be scored, so methods compare on one loss.
    """
    w, b = scaled_filters(stats)
    delivery = delivery.to(torch.float64)
    residual = w[pruned] - delivery.T @ w[kept]
    bias_residual = b[pruned] - delivery.T @ b[kept]
    return {
        "re": (residual**2).sum(dim=1),
        "be": bias_residual**2,
        "ae": (delivery**2).sum(dim=0),
    }


def residual_from_products(
    w: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, kept: torch.Tensor, pruned: torch.Tensor,
    delivery: torch.Tensor, cancellation: float = 1e-6,
) -> torch.Tensor:
    """``re_j = |w'_j - W'_K s_j|^2`` as ``|w'_j|^2 - 2 s_j . c_j + s_j^T G s_j``, from ``G`` and ``C``.

    Avoids forming the |P| x M residual. Where the terms cancel to below
    ``cancellation * |w'_j|^2`` (a nearly exact restoration, where the expanded
    form loses its digits), the residual is computed directly instead.
    """
    sq_norms = (w * w).sum(dim=1)[pruned]
    re = sq_norms - 2 * (delivery * cross).sum(dim=0) + (delivery * (gram @ delivery)).sum(dim=0)
    close = (re < cancellation * sq_norms).nonzero().flatten()
    if len(close):
        residual = w[pruned[close]] - delivery[:, close].T @ w[kept]
        re[close] = (residual**2).sum(dim=1)
    return re
