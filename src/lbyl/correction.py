"""Mean-shift correction: restore the expected consumer input that pruning removes.

A BatchNorm output ``z_i = gamma_i * xhat_i + beta_i`` has, under its running
statistics, mean ``beta_i`` and standard deviation ``|gamma_i|``. Modelling it
as Gaussian gives ``E[f(z_i)]`` without data, for any element-wise activation
``f`` (:mod:`lbyl.activations`: closed form for ReLU, quadrature where there is
none). After pruning,
the consumer misses ``sum_j V[:, j] * (E f(z_j) - sum_k S[k, j] E f(z_k))`` on
average; adding that constant to the consumer's output removes the mean shift.
"""
from __future__ import annotations

import math

import torch

from . import activations
from .activations import Activation
from .delivery import ProducerStats


def expected_relu(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``E[max(z, 0)]`` for ``z ~ N(mean, std^2)``: ``std * phi(mean/std) + mean * Phi(mean/std)``."""
    mean, std = mean.to(torch.float64), std.to(torch.float64).abs()
    safe = std.clamp_min(torch.finfo(torch.float64).tiny)
    t = mean / safe
    pdf = torch.exp(-0.5 * t**2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2)))
    # a zero-variance channel is the constant relu(mean)
    return torch.where(std > 0, std * pdf + mean * cdf, mean.clamp_min(0))


def expected_activation(stats: ProducerStats, activation: Activation | str) -> torch.Tensor | None:
    """Expected output of every channel after the activation, or None without statistics.

    ``E[f(z)]`` for ``z ~ N(beta, gamma^2)`` after a BatchNorm, or ``z ~ N(m, C_ii)`` with
    the data-free moments of a layer without one (:mod:`lbyl.statistics`); a PReLU's
    per-channel slopes follow the channels. Without either nothing describes the
    channel's distribution, so no correction is made.
    """
    marginals = _marginals(stats)
    if marginals is None:
        return None
    mean, std = marginals
    activation = activations.as_activation(activation)
    if stats.activation_mean is not None:  # a later stage's own model (lbyl.depthwise)
        return stats.activation_mean
    if activation == "relu":
        return expected_relu(mean, std)
    if activation == "identity":
        return mean
    return activations.mean(activation, mean, std)


def activation_variance(stats: ProducerStats, activation: Activation | str) -> torch.Tensor | None:
    """``Var[f(z)]`` of every channel under the model of :func:`expected_activation`."""
    marginals = _marginals(stats)
    if marginals is None:
        return None
    if stats.activation_mean is not None:  # a later stage's own model (lbyl.depthwise)
        return stats.activation_covariance.diagonal()
    mean, std = marginals
    activation = activations.as_activation(activation)
    return std**2 if activation == "identity" else activations.variance(activation, mean, std)


def _marginals(stats: ProducerStats) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Mean and standard deviation of every channel before the activation, or None."""
    if stats.bn is not None:
        return stats.bn.beta.to(torch.float64), stats.bn.gamma.to(torch.float64).abs()
    if stats.moments is not None:
        return stats.moments.mean, stats.moments.covariance.diagonal().clamp_min(0).sqrt()
    return None


def mean_shift(
    stats: ProducerStats, kept: torch.Tensor, pruned: torch.Tensor, delivery: torch.Tensor,
    activation: Activation | str,
) -> torch.Tensor | None:  # fmt: skip
    """``E f(z_j) - sum_k S[k, j] E f(z_k)`` per pruned channel (None without BatchNorm)."""
    expected = expected_activation(stats, activation)
    if expected is None:
        return None
    return expected[pruned] - delivery.to(torch.float64).T @ expected[kept]


def tap_coverage(input_size, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """Fraction of a convolution's output positions at which each kernel tap reads the
    input rather than zero padding (a tensor shaped like the kernel)."""
    per_dim = []
    for size, k, s, p, d in zip(input_size, kernel_size, stride, padding, dilation):
        outputs = (size + 2 * p - d * (k - 1) - 1) // s + 1
        first = torch.arange(outputs) * s - p  # input index read by tap 0
        taps = first[None, :] + d * torch.arange(k)[:, None]  # (k, outputs)
        per_dim.append(((taps >= 0) & (taps < size)).to(torch.float64).mean(dim=1))
    coverage = per_dim[0]
    for factor in per_dim[1:]:
        coverage = coverage[..., None] * factor
    return coverage


def consumer_offset(
    weight: torch.Tensor,
    positions: torch.Tensor,
    pruned: torch.Tensor,
    shift: torch.Tensor,
    coverage: torch.Tensor | None = None,
) -> torch.Tensor:
    """Constant change of each consumer output: ``sum_j shift_j * sum(V[o, slots of j])``.

    Every spatial tap and flatten slot of a pruned channel sees the same mean.
    A convolution's taps that fall on zero padding at the border see nothing,
    so each tap is weighted by ``coverage`` (see :func:`tap_coverage`): the
    correction is then right on average over the output positions.
    """
    return channel_sums(weight, positions[pruned], coverage) @ shift.to(weight.device)


def channel_sums(weight: torch.Tensor, positions: torch.Tensor, coverage: torch.Tensor | None = None) -> torch.Tensor:
    """``sum(V[o, slots of c])`` for every consumer output ``o`` and channel row ``c`` of
    ``positions`` (a channel's flatten slots and kernel taps together), taps weighted by
    ``coverage`` if given: (out, channels)."""
    blocks = weight.detach()[:, positions].to(torch.float64)  # (out, C, slots, *kernel)
    if coverage is not None:
        blocks = blocks * coverage.to(blocks.device)
    return blocks.flatten(start_dim=2).sum(dim=2)


def variance_ratio(
    sums: torch.Tensor, kept: torch.Tensor, pruned: torch.Tensor, delivery: torch.Tensor, covariance: torch.Tensor
) -> torch.Tensor:
    """Variance of each consumer output after / before restoration, under the input model.

    ``sums`` are the consumer's :func:`channel_sums` (out, N), ``covariance`` the
    producer channels' covariance (N x N, :func:`lbyl.delivery.preactivation_covariance`).
    Each channel is taken as constant over the consumer's window, so an output's
    variance is ``u C u^T`` with ``u`` its row of ``sums``; after the delivery ``u``
    becomes ``u_K + u_P S^T`` over the kept channels. Outputs with no variance
    before keep ratio 1.
    """
    sums, covariance, delivery = sums.to(torch.float64), covariance.to(torch.float64), delivery.to(torch.float64)
    projected = sums @ covariance  # U C, shared by both variances
    before = (projected * sums).sum(dim=1)
    after_sums = sums[:, kept] + sums[:, pruned] @ delivery.T
    # U' C_KK = (U C)_K - U_P (C_PK - S^T C_KK): the small residual term replaces a second out x K x K product
    residual = covariance[pruned][:, kept] - delivery.T @ covariance[kept][:, kept]
    after = ((projected[:, kept] - sums[:, pruned] @ residual) * after_sums).sum(dim=1)
    return torch.where(before > 0, after / before.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(before))


def explained_share(sums: torch.Tensor, covariance: torch.Tensor, variances: torch.Tensor,
                    recorded: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Fraction of each consumer output's recorded variance that one producer's channels explain.

    For a consumer that also reads other layers (after a concatenation): ``u R u^T / recorded``
    per output, with ``u`` its :func:`channel_sums`, ``R`` the channels' covariance after the
    activation (``covariance``'s correlations at the ``variances`` of the activated channels)
    and ``recorded`` the running variance of the BatchNorm that reads the consumer; clamped to
    [0, 1]. The other layers' share is taken as unchanged by this layer's restoration.
    """
    std = variances.to(torch.float64).clamp_min(0).sqrt()
    real = activations.standardise(covariance.to(torch.float64))[1] * torch.outer(std, std)
    sums = sums.to(torch.float64)
    explained = ((sums @ real) * sums).sum(dim=1)
    recorded = recorded.to(torch.float64, copy=True).to(explained.device)
    return torch.where(recorded > 0, explained / recorded.clamp_min(torch.finfo(torch.float64).tiny), 1.0).clamp(0, 1)


def padded_conv_coverage(model, inputs, modules, input_sizes: dict | None = None) -> dict:
    """``tap_coverage`` of every padded convolution in ``modules``.

    ``input_sizes`` (module -> spatial input size) comes from a forward pass that
    already ran; modules it lacks are measured with one more (one-sample) pass.
    """
    convs = [m for m in modules if isinstance(m, torch.nn.modules.conv._ConvNd) and any(_padding(m))]
    sizes = {m: input_sizes[m] for m in convs if input_sizes and m in input_sizes}
    missing = [m for m in convs if m not in sizes]
    if missing:
        from .counting import shape_only_forward

        record = lambda mod, args, out: sizes.__setitem__(mod, tuple(args[0].shape[2:]))
        hooks = [m.register_forward_hook(record) for m in missing]
        try:
            shape_only_forward(model, inputs)
        finally:
            for hook in hooks:
                hook.remove()
    return {m: tap_coverage(sizes[m], m.kernel_size, m.stride, _padding(m), m.dilation) for m in convs if m in sizes}


def _padding(conv) -> tuple[int, ...]:
    if isinstance(conv.padding, str):  # "same" pads by (kernel - 1) * dilation / 2 around
        if conv.padding == "valid":
            return (0,) * len(conv.kernel_size)
        return tuple((k - 1) * d // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    return tuple(conv.padding)
