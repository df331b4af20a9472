"""Surgery: fold delivery matrices into consumers and remove channels physically."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch_pruning.pruner import function as tp_function

from .graph import BATCHNORMS, Consumer


def fold_into_consumer(
    weight: torch.Tensor,
    positions: torch.Tensor,
    kept: torch.Tensor,
    pruned: torch.Tensor,
    delivery: torch.Tensor,
) -> torch.Tensor:
    """Return the consumer weight with ``V[:, K] += V[:, P] @ S^T`` applied per slot.

    ``weight`` is (out, in, *kernel); ``positions`` (channels, slots) gives the
    input columns of each producer channel (one slot per channel for a conv,
    ``H*W`` after a flatten). Computed in float64, returned in the input dtype.
    """
    w = weight.detach().to(torch.float64).clone()
    blocks = w[:, positions]  # (out, channels, slots, *kernel)
    delivered = torch.einsum("oj...,kj->ok...", blocks[:, pruned], delivery.to(w.device, torch.float64))
    w[:, positions[kept]] = blocks[:, kept] + delivered
    return w.to(weight.dtype)


def apply_delivery(consumers: list[Consumer], kept, pruned, delivery) -> None:
    """Edit every consumer's weight in place (its pruned columns are removed later)."""
    with torch.no_grad():
        for consumer in consumers:
            weight = consumer.module.weight
            weight.copy_(fold_into_consumer(weight, consumer.positions.to(weight.device), kept, pruned, delivery))


def _out_pruner(module):
    if isinstance(module, nn.Linear):
        return tp_function.prune_linear_out_channels
    if isinstance(module, BATCHNORMS):
        return tp_function.prune_batchnorm_out_channels
    return tp_function.prune_conv_out_channels


def _in_pruner(module):
    if isinstance(module, nn.Linear):
        return tp_function.prune_linear_in_channels
    return tp_function.prune_conv_in_channels


def remove_channels(out_channels: dict[nn.Module, set[int]], in_channels: dict[nn.Module, set[int]]) -> None:
    """Physically remove output and input channels, given in the *original* index space.

    Indices for every module are collected first and removed in one call per
    module and dimension, so no index goes stale when a layer is both a
    consumer and a producer, or reads several producers through a concat.
    """
    for module, idxs in out_channels.items():
        if idxs:
            _out_pruner(module)(module, sorted(idxs))
    for module, idxs in in_channels.items():
        if idxs:
            _in_pruner(module)(module, sorted(idxs))
