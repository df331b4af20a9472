"""Mean-shift correction: restore the expected consumer input that pruning removes.

A BatchNorm output ``z_i = gamma_i * xhat_i + beta_i`` has, under its running
statistics, mean ``beta_i`` and standard deviation ``|gamma_i|``. Modelling it
as Gaussian gives ``E[relu(z_i)]`` in closed form, without data. After pruning,
the consumer misses ``sum_j V[:, j] * (E f(z_j) - sum_k S[k, j] E f(z_k))`` on
average; adding that constant to the consumer's output removes the mean shift.
"""
from __future__ import annotations

import math

import torch

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


def expected_activation(stats: ProducerStats, activation: str) -> torch.Tensor | None:
    """Expected output of every channel after the activation, or None without BatchNorm.

    Without BN nothing describes the channel's distribution, so no correction is made.
    """
    if stats.bn is None:
        return None
    mean, std = stats.bn.beta.to(torch.float64), stats.bn.gamma.to(torch.float64).abs()
    if activation == "relu":
        return expected_relu(mean, std)
    if activation == "identity":
        return mean
    raise ValueError(f"no mean model for activation {activation!r}")


def mean_shift(
    stats: ProducerStats, kept: torch.Tensor, pruned: torch.Tensor, delivery: torch.Tensor, activation: str
) -> torch.Tensor | None:
    """``E f(z_j) - sum_k S[k, j] E f(z_k)`` per pruned channel (None without BatchNorm)."""
    expected = expected_activation(stats, activation)
    if expected is None:
        return None
    return expected[pruned] - delivery.to(torch.float64).T @ expected[kept]


def consumer_offset(weight: torch.Tensor, positions: torch.Tensor, pruned: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Constant change of each consumer output: ``sum_j shift_j * sum(V[o, slots of j])``.

    Every spatial tap and flatten slot of a pruned channel sees the same mean.
    At a zero-padded border a conv sees fewer taps, so there the correction
    slightly overshoots; the interior is exact under the Gaussian model.
    """
    blocks = weight.detach().to(torch.float64)[:, positions[pruned]]  # (out, P, slots, *kernel)
    per_channel = blocks.flatten(start_dim=2).sum(dim=2)  # (out, P)
    return per_channel @ shift.to(per_channel.device)
