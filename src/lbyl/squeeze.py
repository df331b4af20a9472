"""Squeeze-and-excitation: consumers that read the channels through a data-dependent gate.

The gate scales channel ``c`` by ``g_c = gate(expand(inner(reduce(pool(x)))))_c``. Its input
is each channel's mean over the feature map, which over a map of many positions is close
to the channel's expected value ``m_c``; the gate is modelled as the constant it takes
there (docs/method.md, section 5h). A consumer behind the gate reads ``y_c = g_c x_c``,
so a solution found for the channels ``x`` carries over: ``x_j ~ sum_k S[k, j] x_k`` is
``y_j ~ sum_k S[k, j] g_j / g_k y_k``; the mean shift of ``y_j`` is ``g_j`` times that of
``x_j``; the covariance of ``y`` is ``diag(g) C diag(g)``. The squeeze's ``reduce`` layer
reads ``x`` itself (through the pooling) and is restored like any consumer, which keeps
the gate's input, and so the gate, as it was.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .activations import evaluate
from .correction import expected_activation


def group_gates(group, stats) -> torch.Tensor | None:
    """The modelled gates of a group with a squeeze-and-excitation (None: no gate, or no
    statistics to model it with; its consumers then read the channels as they are)."""
    if group.excitation is None:
        return None
    means = expected_activation(stats, group.consumer_activation)
    return gate_values(group.excitation, means) if means is not None else None


def gate_values(excitation, means: torch.Tensor) -> torch.Tensor:
    """The gate of every channel when each channel's pooled input is its expected value ``means``."""
    def layer(module, x):
        weight = module.weight.detach().to(torch.float64).reshape(module.weight.shape[0], -1)
        bias = module.bias.detach().to(torch.float64) if module.bias is not None else 0.0
        return weight @ x + bias

    hidden = evaluate(excitation.inner, layer(excitation.reduce, means.to(torch.float64)))
    return evaluate(excitation.gate, layer(excitation.expand, hidden))


def behind_gate(solution, gates: torch.Tensor, kept: torch.Tensor, pruned: torch.Tensor):
    """The solution as a consumer behind the gate sees it (``y = g x``; see the module's docstring).
    A channel whose gate is zero is never read: nothing is delivered to it."""
    gates = gates.to(solution.delivery.device, torch.float64)
    kept_gates = gates[kept]
    inverse = torch.where(kept_gates.abs() > torch.finfo(torch.float64).tiny, 1 / kept_gates, torch.zeros_like(kept_gates))
    covariance = solution.covariance
    return replace(
        solution,
        delivery=inverse[:, None] * solution.delivery * gates[pruned][None, :],
        mean_shift=solution.mean_shift * gates[pruned] if solution.mean_shift is not None else None,
        covariance=gates[:, None] * covariance * gates[None, :] if covariance is not None else None,
        channel_means=solution.channel_means * gates if solution.channel_means is not None else None,
    )
