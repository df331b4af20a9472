"""The authors' released behaviours, for reproducing published tables.

``lbyl.paper.LBYL`` and ``lbyl.paper.NeuronMerging`` compute what the released
code computes, quirks included (see :func:`lbyl.delivery.lbyl_paper_delivery`
and :func:`lbyl.delivery.nm_paper_delivery`); :class:`lbyl.LBYL` and
:class:`lbyl.NeuronMerging` are the methods.
"""
from __future__ import annotations

from .delivery import lbyl_paper_delivery, nm_paper_delivery
from .methods import Method
from .validation import check_nonnegative

__all__ = ["LBYL", "NeuronMerging"]


class LBYL(Method):
    """LBYL as released: one ridge solve per pruned channel with the released BN terms."""

    name = "lbyl-paper"
    options = ("lambda1", "lambda2", "mean_correction", "variance_correction")

    def __init__(self, lambda1: float = 0.0, lambda2: float = 0.0, *,
                 mean_correction: bool = False, variance_correction: bool = False):  # fmt: skip
        super().__init__(mean_correction=mean_correction, variance_correction=variance_correction)
        self.lambda1 = check_nonnegative("lambda1", lambda1)
        self.lambda2 = check_nonnegative("lambda2", lambda2)

    def delivery(self, stats, kept, pruned, activation):
        return lbyl_paper_delivery(stats, kept, pruned, self.lambda1, self.lambda2)


class NeuronMerging(Method):
    """Neuron Merging as released; ``threshold`` is the cosine similarity below which
    a pruned channel is dropped instead of merged (None merges all; the released
    LeNet-300-100 script uses 0.45)."""

    name = "nm-paper"
    options = ("threshold", "mean_correction", "variance_correction")

    def __init__(self, threshold: float | None = None, *,
                 mean_correction: bool = False, variance_correction: bool = False):  # fmt: skip
        super().__init__(mean_correction=mean_correction, variance_correction=variance_correction)
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1 <= threshold <= 1:
                raise ValueError(f"threshold must be a cosine similarity in [-1, 1] or None, got {threshold!r}")
            threshold = float(threshold)
        self.threshold = threshold

    def delivery(self, stats, kept, pruned, activation):
        return nm_paper_delivery(stats, kept, pruned, threshold=self.threshold)
