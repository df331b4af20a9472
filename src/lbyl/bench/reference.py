"""Slow reference implementations, kept out of the core for benchmarks and tests.

:func:`lbyl_delivery_per_neuron` computes the LBYL delivery matrix the way the
published code organises the work: one least-squares problem per pruned
neuron, each solved on its own. :func:`lbyl.delivery.lbyl_delivery` solves all
of them with one factorisation per layer; both minimise the same loss.
"""
from __future__ import annotations

import math

import torch

from ..delivery import ProducerStats, scaled_filters


def lbyl_design(stats: ProducerStats, kept: torch.Tensor, lambda1: float, lambda2: float) -> torch.Tensor:
    """Design matrix of the per-neuron least-squares problem, (M + 1 + |K|) x |K|.

    Rows: the BN-scaled kept filters (one row per filter entry), ``sqrt(lambda1) b_K``
    and ``sqrt(lambda2) I``, so that ``|X s - y_j|^2`` is the LBYL loss of channel ``j``.
    """
    w, b = scaled_filters(stats)
    w_kept, b_kept = w[kept], b[kept]
    eye = torch.eye(len(kept), dtype=torch.float64, device=w.device)
    return torch.cat([w_kept.T, math.sqrt(lambda1) * b_kept[None, :], math.sqrt(lambda2) * eye])


def lbyl_delivery_per_neuron(
    stats: ProducerStats,
    kept: torch.Tensor,
    pruned: torch.Tensor,
    lambda1: float = 0.0,
    lambda2: float = 0.0,
) -> torch.Tensor:
    """LBYL delivery matrix, one least-squares solve per pruned neuron.

    For each pruned ``j``: ``s_j = argmin |w'_j - W'_K s|^2 + lambda1 (b_j - b_K . s)^2
    + lambda2 |s|^2``, solved with ``torch.linalg.lstsq`` (minimum-norm solution when
    the problem is rank deficient, as the batched closed form's pseudo-inverse gives).
    Returns the (|K|, |P|) matrix; equals :func:`lbyl.delivery.lbyl_delivery`.
    """
    design = lbyl_design(stats, kept, lambda1, lambda2)
    w, b = scaled_filters(stats)
    zeros = torch.zeros(len(kept), dtype=torch.float64, device=w.device)
    columns = []
    for j in pruned.tolist():
        target = torch.cat([w[j], math.sqrt(lambda1) * b[j : j + 1], zeros])
        solution = torch.linalg.lstsq(design, target[:, None], driver="gelsy").solution
        columns.append(solution[:, 0])
    if not columns:
        return torch.zeros(len(kept), 0, dtype=torch.float64, device=w.device)
    return torch.stack(columns, dim=1)
