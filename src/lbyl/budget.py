"""Budgets: the uniform pruning ratio that keeps at most a target fraction of the MACs or parameters."""
from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch.nn as nn

from .counting import count_ops_and_params
from .planning import PlannedLayer, match_plan
from .surgery import remove_channels, removal_indices

TARGETS = ("macs", "params")


def check_target(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= 1:
        noun = "MACs" if name.endswith("macs") else "parameters"
        raise ValueError(f"{name} must be the fraction of the model's {noun} to keep, in (0, 1], got {value!r}; "
                         f"e.g. {name}=0.6 keeps 60 %")  # fmt: skip
    return float(value)


def predicted_size(model: nn.Module, groups, layers: list[PlannedLayer], inputs: tuple) -> tuple[int, int]:
    """(MACs, parameters) of ``model`` once ``layers`` keep their channels; the model is not touched.

    The channels are removed from a copy (no restoration: sizes only) and the copy is counted.
    """
    memo: dict = {}
    twin = copy.deepcopy(model, memo)
    outputs, inputs_ = removal_indices((g, layer.pruned) for g, layer in match_plan(groups, layers))
    remove_channels({memo[id(m)]: i for m, i in outputs.items()}, {memo[id(m)]: i for m, i in inputs_.items()})
    macs, params = count_ops_and_params(twin, inputs)
    return int(macs), int(params)


def ratio_for_budget(
    size_at: Callable[[float], int], channels: list[int], before: int, target: float, what: str
) -> float:
    """The smallest uniform ratio whose predicted size is at most ``target * before``.

    The size only changes where some layer's kept count ``floor(c (1 - r))`` does, at
    ``r = 1 - k / c``; a bisection over those ratios needs about ``log2(sum c)`` predictions.
    """
    candidates = sorted({0.0} | {1 - k / c for c in set(channels) for k in range(1, c + 1)})
    limit = target * before
    smallest = size_at(candidates[-1])
    if smallest > limit:
        reachable = math.ceil(smallest / before * 10_000) / 10_000
        noun = "MACs" if what == "macs" else "parameters"
        raise ValueError(
            f"target_{what}={target:g} cannot be met by pruning the chosen layers: keeping one channel in each "
            f"still leaves {reachable:g} of the model's {noun}; pass target_{what} >= {reachable:g}, or let more "
            "layers be pruned (layers='all')"
        )
    low, high = 0, len(candidates) - 1  # the answer's index lies in [low, high]
    while low < high:
        middle = (low + high) // 2
        if size_at(candidates[middle]) <= limit:
            high = middle
        else:
            low = middle + 1
    return candidates[low]
