"""Pruning criteria: which output channels of a layer to keep.

All functions are pure: they read a filter matrix and return indices.
"""
from __future__ import annotations

from fractions import Fraction

import torch

CRITERIA = ("l2", "l1", "l2gm", "random")


def keep_count(channels: int, ratio: float) -> int:
    """Number of channels kept when pruning ``ratio`` of ``channels``.

    The rule is ``floor(channels * (1 - ratio))`` evaluated in exact rational
    arithmetic on the ratio's shortest decimal form, so ``keep_count(300, 0.8)``
    is 60 (plain floats give ``int(59.999...) == 59``). At least one channel is
    always kept: a layer cannot vanish.
    """
    if channels < 1:
        raise ValueError(f"a layer needs at least one channel, got {channels}")
    exact = Fraction(repr(float(ratio)))
    return max(1, int(channels * (1 - exact)))


def channel_scores(filters: torch.Tensor, criterion, seed: int = 0) -> torch.Tensor:
    """Importance of each row of ``filters`` (N x M); larger is kept first.

    ``criterion`` is a name below or a callable ``(filters: Tensor[N, M]) -> scores[N]``.

    - ``l2``: Euclidean norm of the filter.
    - ``l1``: sum of absolute values.
    - ``l2gm``: summed Euclidean distance to the other filters (a filter far
      from the geometric median is hard to replace).
    - ``random``: a seeded random permutation.
    """
    filters = filters.reshape(filters.shape[0], -1).to(torch.float64)
    if callable(criterion):
        return _checked_scores(criterion, filters)
    if criterion == "l2":
        return filters.norm(dim=1)
    if criterion == "l1":
        return filters.abs().sum(dim=1)
    if criterion == "l2gm":
        return torch.cdist(filters, filters).sum(dim=1)
    if criterion == "random":
        generator = torch.Generator().manual_seed(int(seed))
        return torch.rand(filters.shape[0], generator=generator, dtype=torch.float64)
    raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")


def select_channels(
    filters: torch.Tensor, ratio: float, criterion: str = "l2", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the rows of ``filters`` into (kept, pruned) index tensors, both sorted.

    Ties are broken by the lower channel index, so the result is deterministic.
    """
    scores = channel_scores(filters, criterion, seed).cpu()
    n = scores.shape[0]
    n_keep = keep_count(n, ratio)
    # stable sort on -score keeps the lower index first among equal scores
    order = torch.sort(-scores, stable=True).indices
    kept = order[:n_keep].sort().values
    pruned = order[n_keep:].sort().values
    return kept, pruned


def criterion_name(criterion) -> str:
    """The name a report records for ``criterion`` (a callable's own name)."""
    if callable(criterion):
        return getattr(criterion, "__name__", type(criterion).__name__)
    return criterion


def check_criterion(criterion):
    if callable(criterion) or criterion in CRITERIA:
        return criterion
    raise ValueError(
        f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)} or pass a callable "
        "(filters: Tensor[N, M]) -> scores[N] (higher is kept)"
    )


def _checked_scores(criterion, filters: torch.Tensor) -> torch.Tensor:
    scores = criterion(filters)
    name = criterion_name(criterion)
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(scores)
    if tuple(scores.shape) != (filters.shape[0],):
        raise ValueError(
            f"criterion {name} returned scores of shape {tuple(scores.shape)} for {filters.shape[0]} filters; "
            f"it must return one score per filter (row), shape ({filters.shape[0]},)"
        )
    scores = scores.detach().to(torch.float64)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"criterion {name} returned NaN or infinite scores; return finite scores (higher is kept)")
    return scores
