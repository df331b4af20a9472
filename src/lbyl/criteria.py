"""Pruning criteria: which output channels of a layer to keep.

All functions are pure: they read a filter matrix (or, for ``least-loss``, the
statistics :mod:`lbyl.planning` computes for the layer) and return scores or indices.
"""
from __future__ import annotations

from fractions import Fraction

import torch

AUTO = "auto"  # least-loss where LBYL solves after the activation without BatchNorm, else l2 (lbyl.planning)
CRITERIA = (AUTO, "l2", "l1", "l2gm", "random", "least-loss")
STATISTICAL_CRITERIA = ("least-loss",)  # read the layer's statistics and consumers, not only its filters


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

    ``least-loss`` reads more than the filters: see :func:`least_loss_scores`.
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
    if criterion == AUTO or criterion in STATISTICAL_CRITERIA:
        raise ValueError(f"criterion {criterion!r} reads the layer's statistics: use lbyl.plan or lbyl.restore")
    if criterion == "random":
        generator = torch.Generator().manual_seed(int(seed))
        return torch.rand(filters.shape[0], generator=generator, dtype=torch.float64)
    raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")


def least_loss_scores(covariance: torch.Tensor, consumer_gram: torch.Tensor, ridge: float = 1e-9,
                      removed: int | None = None) -> torch.Tensor:  # fmt: skip
    """Rank channels by the loss left when the removed ones are rebuilt from the kept ones.

    The consumers read channels ``x`` (covariance ``Sigma``, N x N) through weights ``V``
    (``consumer_gram`` is ``V^T V``). Removing a set and rebuilding it from the kept set ``K``
    by least squares (LBYL's delivery in the space of ``x``) leaves the loss
    ``tr(V Sigma V^T) - tr(Q H)``, ``Q = Sigma_KK^-1``, ``H = (Sigma V^T V Sigma)_KK``.
    Greedy backward elimination: from all channels, remove the one whose removal raises the
    loss least, ``(Q H Q)_jj / Q_jj``, and repeat; ``Q`` and ``Q H Q`` follow by rank-one
    updates, applied in blocks of :data:`BLOCK` steps (``O(N^3)`` in all). The score is the
    step at which a channel goes (the last ones left score highest): kept sets are nested. ``removed``: stop after that many
    (the rest share the top score). ``ridge`` (relative to the mean variance) keeps a singular
    ``Sigma`` invertible.
    """
    sigma = covariance.to(torch.float64)
    n = sigma.shape[0]
    removed = n if removed is None else min(int(removed), n)
    scale = float(sigma.diagonal().mean().clamp_min(1e-300))
    eye = torch.eye(n, dtype=sigma.dtype, device=sigma.device)
    q = torch.linalg.inv(sigma + ridge * scale * eye)
    gram = consumer_gram.to(sigma)
    shift = ridge * scale * float(q.diagonal().sum())  # bounds |Q Sigma - I|, Q Sigma = I - ridge Q
    if shift < 1e-9:  # Q H Q = (Q Sigma) G (Q Sigma)^T is G itself, to that accuracy
        r = gram.clone()
    else:
        m = eye - ridge * scale * q
        r = m @ gram @ m.T
    removed_mask = torch.zeros(n, dtype=torch.bool, device=sigma.device)
    scores = torch.full((n,), float(n), dtype=torch.float64)
    step = 0
    while step < removed:  # a removed channel's rows and columns of Q and R become zero: masked
        count = min(BLOCK, removed - step)
        gone, left, right = _eliminate_block(q, r, count, removed_mask)
        scores[gone.cpu()] = torch.arange(step, step + count, dtype=torch.float64)
        step += count
        q.addmm_(left[0], right[0], alpha=-1)
        r.addmm_(left[1], right[1], alpha=-1)
    return scores


BLOCK = 64  # eliminations per block: exact greedy steps on columns, then one product updates Q and R


def _eliminate_block(q: torch.Tensor, r: torch.Tensor, count: int, removed: torch.Tensor):
    """``count`` greedy eliminations from ``Q`` and ``R = Q H Q``, each exact: the columns and
    diagonals they need are updated at ``O(N)`` per earlier step; the updates of the whole
    matrices are returned as factors, ``Q~ = Q - L_q R_q`` and ``R~ = R - L_r R_r``.
    ``removed``: the channels already gone (updated here).
    Removing ``j`` with ``a = Q[:, j]``, ``c = a_j``, ``p = R[:, j]``, ``s = p_j``:
    ``Q~ = Q - a a^T / c`` and ``R~ = R - (p a^T + a p^T) / c + s a a^T / c^2``."""
    n = q.shape[0]
    dq, dr = q.diagonal().clone(), r.diagonal().clone()
    A, P = q.new_empty(n, count), q.new_empty(n, count)
    c, s = q.new_empty(count), q.new_empty(count)
    gone = []
    for t in range(count):
        j = int((dr / dq).masked_fill(removed, float("inf")).argmin())
        weights = A[j, :t] / c[:t]
        a = q[:, j] - A[:, :t] @ weights
        p = r[:, j] - P[:, :t] @ weights - A[:, :t] @ (P[j, :t] / c[:t] - s[:t] * weights / c[:t])
        A[:, t], P[:, t], c[t], s[t] = a, p, a[j], p[j]
        dq -= a * a / c[t]
        dr -= (2 * p - s[t] * a / c[t]) * a / c[t]
        removed[j] = True
        gone.append(j)
    left_r = torch.cat([P, A], dim=1)
    right_r = torch.cat([(A / c).T, (P / c - s * A / c**2).T], dim=0)
    return torch.tensor(gone, device=q.device), (A, left_r), ((A / c).T, right_r)


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
