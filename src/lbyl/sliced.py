"""BatchNorms after a concatenation (DenseNet): each consumer reads the producer's channels
through its own slice of a wider BatchNorm.

A DenseNet layer's new channels are concatenated into the input of every later layer of its
block, and each of those normalises the concatenation with a BatchNorm of its own before the
activation and its 1x1 conv. The producer has no BatchNorm; consumer ``c`` reads
``f(BN_c(z))`` with BN_c's entries at the producer's channels. Restoration is the problem of
sections 4-5d once per consumer: the statistics are the producer's filters with that slice as
their BatchNorm, the method solves them, and the solution goes to that consumer alone. The
channels removed are the same for every consumer (the criterion ranks the producer's filters),
and each BatchNorm loses its entries at them.
"""
from __future__ import annotations

from dataclasses import replace

from .delivery import BatchNormStats, ProducerStats
from .graph import RestorableGroup
from .planning import batchnorm_stats


def views(group: RestorableGroup, stats: ProducerStats) -> list[tuple[RestorableGroup, ProducerStats]]:
    """``(group, stats)`` for each consumer with a BatchNorm slice of its own, each with that
    consumer alone and the slice as its BatchNorm; ``[(group, stats)]`` for any other group."""
    if all(c.bn is None for c in group.consumers):
        return [(group, stats)]
    return [(replace(group, consumers=[c]), replace(stats, bn=slice_stats(c.bn, c.bn_positions)))
            for c in group.consumers]  # fmt: skip


def slice_stats(bn, positions) -> BatchNormStats:
    """The statistics of some channels of a BatchNorm (the producer's, in a concatenation)."""
    full = batchnorm_stats(bn, bn.num_features, bn.running_mean.device)
    positions = positions.to(full.gamma.device)
    return replace(full, gamma=full.gamma[positions], beta=full.beta[positions], mean=full.mean[positions],
                   var=full.var[positions])  # fmt: skip
