"""Grouped convolutions: channels that a grouped conv ties into blocks are pruned alike and
restored block by block.

A grouped consumer (ResNeXt's 3x3 with ``groups=g``) reads each block of ``in/g`` input
channels with filters of its own: a pruned channel can only be delivered to the kept
channels of its block, and every block must keep as many channels as the others for the
layer to stay a grouped conv. A grouped producer's output channels fall into blocks the
same way. :func:`lbyl.graph.channel_blocks` labels each channel with its block; here the
channel choice, the method's solve and the surgery run per block, each block on its own
statistics, so every method (and its corrections) works unchanged.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from .delivery import ProducerStats


def members(blocks: torch.Tensor) -> list[torch.Tensor]:
    """The sorted channel indices of each block."""
    return [torch.nonzero(blocks == b).flatten() for b in range(int(blocks.max()) + 1)]


def check_blocks(name: str, kept: list[int], blocks: torch.Tensor | None) -> None:
    """Refuse a channel choice that keeps different counts in different blocks."""
    if blocks is None:
        return
    counts = torch.bincount(blocks[torch.as_tensor(kept, dtype=torch.long)], minlength=int(blocks.max()) + 1)
    if counts.min() != counts.max():
        size = len(blocks) // len(counts)
        raise ValueError(
            f"kept channels of {name!r} must keep as many channels in each of its {len(counts)} blocks of {size} "
            f"(grouped convolution), but keep {counts.tolist()[:8]}{'...' if len(counts) > 8 else ''}: "
            "choose the same number in every block, or pass a ratio"
        )


def subset(stats: ProducerStats, channels: torch.Tensor) -> ProducerStats:
    """The statistics of some channels of a layer (a block)."""
    pick = lambda t: t[channels] if t is not None else None  # noqa: E731
    bn = stats.bn
    if bn is not None:
        bn = replace(bn, gamma=bn.gamma[channels], beta=bn.beta[channels], mean=bn.mean[channels], var=bn.var[channels])
    moments = stats.moments
    if moments is not None:
        moments = replace(moments, mean=moments.mean[channels], covariance=moments.covariance[channels][:, channels])
    covariance = stats.activation_covariance
    return replace(stats, filters=stats.filters[channels], bias=pick(stats.bias), bn=bn, moments=moments,
                   activation_covariance=covariance[channels][:, channels] if covariance is not None else None)  # fmt: skip


def local(indices: torch.Tensor, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of ``indices`` lie in ``block`` (a mask) and their positions within it."""
    inside = torch.isin(indices, block)
    return inside, torch.searchsorted(block, indices[inside])


def solve(method, stats: ProducerStats, kept, pruned, activation, blocks: torch.Tensor | None):
    """``method.solve`` per block, assembled into one :class:`lbyl.methods.Solution` of the layer:
    a block-diagonal delivery and covariance, per-channel terms in place."""
    if blocks is None:
        return method.solve(stats, kept, pruned, activation)
    from .methods import Solution

    n, device = stats.channels, stats.filters.device
    delivery = torch.zeros(len(kept), len(pruned), dtype=torch.float64, device=device)
    loss, shift, covariance, means, spaces, conditions, lambdas = {}, None, None, None, [], [], []
    for block in members(blocks.to(device)):
        in_kept, kept_local = local(kept, block)
        in_pruned, pruned_local = local(pruned, block)
        part = method.solve(subset(stats, block), kept_local, pruned_local, activation)
        delivery[in_kept.nonzero()[:, 0][:, None], in_pruned.nonzero()[:, 0]] = part.delivery
        for key, value in part.loss.items():
            loss.setdefault(key, torch.zeros(len(pruned), dtype=torch.float64, device=device))[in_pruned] = value
        if part.mean_shift is not None:
            shift = shift if shift is not None else torch.zeros(len(pruned), dtype=torch.float64, device=device)
            shift[in_pruned] = part.mean_shift.to(torch.float64)
        if part.covariance is not None:
            covariance = covariance if covariance is not None else torch.zeros(n, n, dtype=torch.float64, device=device)
            covariance[block[:, None], block] = part.covariance.to(torch.float64)
        if part.channel_means is not None:
            means = means if means is not None else torch.zeros(n, dtype=torch.float64, device=device)
            means[block] = part.channel_means.to(torch.float64)
        spaces.append(part.space)
        conditions += [part.condition] if part.condition is not None else []
        lambdas.append(part.lambda2)
    return Solution(delivery, loss, shift, covariance, means, space="/".join(dict.fromkeys(spaces)),
                    condition=max(conditions) if conditions else None, lambda2=max(lambdas))  # fmt: skip


def consumer_parts(module: nn.Module, positions: torch.Tensor):
    """``(rows, channels, positions)`` per group of a grouped consumer: its output rows, the
    producer channels it reads and their positions within the group's weight columns.
    A plain consumer is one part: every row and channel (``channels`` None)."""
    groups = getattr(module, "groups", 1)
    if groups == 1:
        yield slice(None), None, positions
        return
    width, rows = module.in_channels // groups, module.out_channels // groups
    first = positions[:, 0]
    for g in range(groups):
        channels = torch.nonzero((first >= g * width) & (first < (g + 1) * width)).flatten()
        if len(channels):
            yield slice(g * rows, (g + 1) * rows), channels, positions[channels] - g * width


def prune_in_channels(module: nn.Module, idxs: list[int]) -> None:
    """Remove input channels (original indices) of a grouped convolution: each group keeps
    its own columns (the same number in every group)."""
    groups = module.groups
    width, rows = module.in_channels // groups, module.out_channels // groups
    drop = set(idxs)
    columns = [[c - g * width for c in range(g * width, (g + 1) * width) if c not in drop] for g in range(groups)]
    if len({len(c) for c in columns}) != 1:
        raise ValueError(f"a grouped convolution must lose as many input channels in every group, got {columns}")
    weight = module.weight
    parts = [weight.data[g * rows:(g + 1) * rows][:, torch.tensor(c, dtype=torch.long, device=weight.device)]
             for g, c in enumerate(columns)]  # fmt: skip
    module.weight = nn.Parameter(torch.cat(parts), requires_grad=weight.requires_grad)
    module.in_channels = len(columns[0]) * groups
