"""Plans: which channels of which layer stay, decided before anything is edited.

A :class:`Plan` is plain data: it prints as a table, serialises to JSON, can
be edited (:meth:`Plan.keep`) and is accepted by :func:`lbyl.restore` in
place of a ratio.
"""
from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from . import grouped
from .covariance import read_covariance
from .criteria import AUTO, STATISTICAL_CRITERIA, criterion_name, keep_count, least_loss_scores, select_channels
from .delivery import BatchNormStats, ProducerStats
from .depthwise import depthwise_chain_stats
from .graph import RestorableGroup, SkippedLayer
from .methods import LBYL
from .report import SkippedRecord, format_table, percent
from .statistics import producer_moments, propagated_input_covariance, reads_layernorm

PLAN_VERSION = 1


@dataclass
class PlannedLayer:
    """One producer to prune: its channels, those it keeps (original indices) and who reads them."""

    name: str
    channels: int
    kept: list[int]
    consumers: list[str] = field(default_factory=list)
    bn: str | None = None
    activation: str = "identity"  # the name of the group's activation ("relu", "hardtanh", "silu"...)
    ratio: float | None = None  # None: the channels were chosen explicitly
    stage: str | None = None  # a depthwise conv between producer and consumers, pruned alike
    criterion: str | None = None  # what ranked its channels (None: chosen explicitly)

    @property
    def removed_fraction(self) -> float:
        """The planned ratio if the kept count matches it, else the fraction actually removed."""
        if self.ratio is not None and keep_count(self.channels, self.ratio) == len(self.kept):
            return self.ratio
        return 1 - len(self.kept) / self.channels

    @property
    def pruned(self) -> list[int]:
        keep = set(self.kept)
        return [c for c in range(self.channels) if c not in keep]


@dataclass
class Plan:
    """The layers to prune and their kept channels, the skipped layers and the predicted size.

    The predicted size is that of the pruned architecture; a restoration may add
    a bias to a consumer that has neither a bias nor a BatchNorm (the mean
    correction), one parameter per output channel of that consumer.
    """

    layers: list[PlannedLayer]
    skipped: list[SkippedRecord] = field(default_factory=list)
    restorable: list[str] = field(default_factory=list)
    criterion: str = AUTO
    seed: int = 0
    params_before: int | None = None
    params_after: int | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    targets: dict = field(default_factory=dict)  # {"macs" or "params": fraction to keep} of a budget

    @property
    def kept(self) -> dict[str, list[int]]:
        return {layer.name: list(layer.kept) for layer in self.layers}

    def layer(self, name: str) -> PlannedLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"{name!r} is not in this plan; planned layers: {', '.join(self.kept) or 'none'}")

    def keep(self, name: str, channels) -> "Plan":
        """Keep exactly ``channels`` (original indices) of layer ``name``; returns the plan.

        The predicted size after the edit is unknown until the plan is made
        again (``lbyl.plan(model, inputs, kept=plan.kept)``).
        """
        layer = self.layer(name)
        layer.kept = check_kept(name, channels, layer.channels)
        layer.ratio = None
        self.params_after = self.macs_after = None
        return self

    def table(self) -> str:
        header = ("layer", "channels", "consumers")
        rows = [(x.name, f"{x.channels} -> {len(x.kept)}", _consumers_cell(x)) for x in self.layers]
        out = [format_table(header, rows)]
        if self.skipped:
            out += ["", f"skipped ({len(self.skipped)}):", *(f"  {s.name}: {s.reason}" for s in self.skipped)]
        out.append("")
        if self.params_after is None or self.macs_after is None:
            out.append("predicted size: unknown after an edit (make the plan again with kept=plan.kept)")
        else:
            out.append(
                f"predicted: parameters {self.params_before:,} -> {self.params_after:,} "
                f"({percent(self.params_after, self.params_before)}), MACs {self.macs_before:,} -> "
                f"{self.macs_after:,} ({percent(self.macs_after, self.macs_before)})"
            )
            for what, target in self.targets.items():
                ratio = self.layers[0].ratio if self.layers else 0.0
                out.append(f"target: {what} <= {100 * target:.1f}%, met by pruning {100 * ratio:.2f}% of each layer's channels")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, **asdict(self)}

    def to_json(self, path: str | Path | None = None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: Mapping) -> "Plan":
        data = dict(data)
        version = data.pop("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise ValueError(f"plan version {version} is not supported (this lbyl reads version {PLAN_VERSION})")
        data["layers"] = [PlannedLayer(**row) for row in data["layers"]]
        data["skipped"] = [SkippedRecord(**row) for row in data.get("skipped", [])]
        return cls(**data)

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "Plan":
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text()
        return cls.from_dict(json.loads(text))


def _consumers_cell(layer: PlannedLayer) -> str:
    consumers = ", ".join(layer.consumers)
    return f"{consumers} (through {layer.stage})" if layer.stage else consumers


def check_kept(name: str, channels, total: int) -> list[int]:
    """Sorted, distinct, in-range channel indices, at least one."""
    if isinstance(channels, torch.Tensor):
        channels = channels.tolist()
    try:
        values = [int(c) for c in channels]
    except (TypeError, ValueError):
        raise TypeError(f"kept channels of {name!r} must be a list of ints, got {channels!r}") from None
    if any(isinstance(c, bool) or (isinstance(c, float) and not c.is_integer()) for c in channels):
        raise TypeError(f"kept channels of {name!r} must be ints, got {channels!r}")
    bad = [c for c in values if not 0 <= c < total]
    if bad or not values or len(set(values)) != len(values):
        why = f"indices {bad[:5]} out of range" if bad else ("none kept" if not values else "repeated indices")
        raise ValueError(
            f"kept channels of {name!r} are invalid ({why}): pass distinct indices in [0, {total}), at least one"
        )
    return sorted(values)


def producer_stats(group: RestorableGroup, dropped_inputs=(), moments: bool = False) -> ProducerStats:
    """Read a group's producer weights and BN statistics as float64 copies.

    ``dropped_inputs`` removes input columns (sequential order: inputs already
    pruned upstream no longer exist). Copies, never views: the module may be
    edited in place after this snapshot is taken. ``moments``: also the data-free
    statistics of a producer without BatchNorm (:func:`lbyl.statistics.producer_moments`).
    """
    weight = group.producer.weight.detach().to(torch.float64, copy=True)
    groups = getattr(group.producer, "groups", 1)
    if len(dropped_inputs) and groups > 1:  # filters of different groups read different inputs: zero, not drop
        width, rows = weight.shape[1], weight.shape[0] // groups
        for c in dropped_inputs:
            weight[c // width * rows:(c // width + 1) * rows, c % width] = 0
    elif len(dropped_inputs):
        keep = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
        keep[list(dropped_inputs)] = False
        weight = weight[:, keep]
    bias = group.producer.bias
    return ProducerStats(
        filters=weight.reshape(weight.shape[0], -1),
        bias=bias.detach().to(torch.float64, copy=True) if bias is not None else None,
        bn=batchnorm_stats(group.bn, weight.shape[0], weight.device) if group.bn is not None else None,
        moments=producer_moments(group, weight, bias, dropped_inputs) if moments else None,
    )


def layer_stats(group: RestorableGroup, dropped_inputs=(), moments: bool = False, input_model: str = "white",
                scale_spread: float = 0.0) -> ProducerStats:  # fmt: skip
    """The statistics a method solves with: the producer's, or, through a depthwise stage,
    those of the stage's output channels (:func:`lbyl.depthwise.depthwise_chain_stats`, with the
    producer's input covariance from ``input_model`` and the scale mixture of ``scale_spread``).
    ``moments``: see :func:`producer_stats`."""
    stats = producer_stats(group, dropped_inputs, moments)
    if input_model == "propagated":
        stats = replace(stats, input_covariance=propagated_input_covariance(group, dropped_inputs))
    stage = group.stage
    if stage is None:
        return stats
    kernels = stage.module.weight.detach().to(torch.float64)
    bias = stage.module.bias
    return depthwise_chain_stats(
        stats, group.activation, kernels.reshape(kernels.shape[0], -1),
        bias.detach().to(torch.float64) if bias is not None else None,
        batchnorm_stats(stage.bn, group.channels, kernels.device) if stage.bn is not None else None,
        stage.activation, input_model, scale_spread,
    )  # fmt: skip


def batchnorm_stats(m: nn.Module, n: int, device) -> BatchNormStats:
    """A BatchNorm's affine and running statistics as float64 copies (``n`` channels)."""
    def read(tensor, fill):
        if tensor is None:
            return torch.full((n,), fill, dtype=torch.float64, device=device)
        return tensor.detach().to(torch.float64, copy=True)

    return BatchNormStats(read(m.weight, 1.0), read(m.bias, 0.0), read(m.running_mean, 0.0),
                          read(m.running_var, 1.0), float(m.eps))  # fmt: skip


def ranking_filters(stats: ProducerStats) -> torch.Tensor:
    """What a criterion ranks: the filter, with its bias appended when no BatchNorm follows.

    Without BN the bias is the weight of a constant input and part of the neuron
    (the released LBYL code ranks LeNet's neurons this way); a BN absorbs it.
    """
    if stats.bn is None and stats.bias is not None:
        return torch.cat([stats.filters, stats.bias[:, None].to(stats.filters.dtype)], dim=1)
    return stats.filters


def default_layers(groups: list[RestorableGroup]) -> list[RestorableGroup]:
    """The paper's protocol as a generic rule: a network with restorable convolutions prunes
    those (its Linear head stays whole), together with the hidden layers of its transformer MLPs
    (Linear layers whose input goes back to a LayerNorm: ViT, Swin, ConvNeXt blocks); a network
    with neither (an MLP) prunes its hidden Linear layers."""
    body = [g for g in groups if not isinstance(g.producer, nn.Linear) or reads_layernorm(g.input_source)]
    return body or list(groups)


def select_groups(groups, skipped: list[SkippedLayer], layers) -> list[RestorableGroup]:
    """The groups named by ``layers`` (names or glob patterns, ``"all"``, None: :func:`default_layers`)."""
    if layers is None:
        return default_layers(groups)
    if layers == "all":
        return list(groups)
    chosen = []
    for pattern in [layers] if isinstance(layers, str) else list(layers):
        hits = [g for g in groups if fnmatch.fnmatchcase(g.name, pattern)]
        if not hits:
            reasons = [s for s in skipped if fnmatch.fnmatchcase(s.name, pattern)]
            why = f" ({reasons[0].name} is skipped: {reasons[0].reason})" if reasons else ""
            available = ", ".join(g.name for g in groups) or "none"
            raise ValueError(f"layer {pattern!r} is not a restorable layer{why}; restorable layers: {available}")
        chosen.extend(h for h in hits if h not in chosen)
    return [g for g in groups if g in chosen]


def plan_layers(groups, skipped, ratio=None, kept=None, criterion=AUTO, layers=None, seed=0,
                scores: dict | None = None) -> list[PlannedLayer]:  # fmt: skip
    """The planned layers, in module order, from a ratio (float or mapping) or explicit ``kept`` channels.
    ``scores``: a cache of the ``least-loss`` scores per layer name, with the number of channels
    they rank (filled here; the greedy order is nested, so it serves every smaller removal)."""
    if kept is not None:
        by_name = {g.name: g for g in groups}
        for name in kept:
            select_groups(groups, skipped, name)  # a clear error for a name that is not restorable
        chosen = [g for g in groups if g.name in kept]
        missing = [n for n in kept if n not in by_name]
        if missing:
            raise ValueError(f"kept names {missing[0]!r}, which is not a restorable layer (use its exact name)")
        return [_planned(g, check_kept(g.name, kept[g.name], g.channels), None) for g in chosen]
    if isinstance(ratio, Mapping):
        chosen = select_groups(groups, skipped, list(ratio))
        ratios = {g.name: next(v for k, v in ratio.items() if fnmatch.fnmatchcase(g.name, k)) for g in chosen}
    else:
        chosen = select_groups(groups, skipped, layers)
        ratios = {g.name: ratio for g in chosen}
    planned, cache = [], {} if scores is None else scores
    for group in chosen:
        ratio_here = float(ratios[group.name])
        chosen_criterion = layer_criterion(group, ratio_here, criterion)
        if isinstance(chosen_criterion, str) and chosen_criterion in STATISTICAL_CRITERIA:
            removed = group.channels - keep_count(group.channels, ratio_here)
            if cache.get(group.name, (-1,))[0] < removed:  # a longer ranking serves any smaller removal
                cache[group.name] = (removed, least_loss_channel_scores(group, removed))
            filters, rank = cache[group.name][1][:, None], "l1"  # one non-negative column: l1 is the score
        else:
            filters, rank = ranking_filters(producer_stats(group)), chosen_criterion
        layer = _planned(group, _select(filters, ratio_here, rank, seed, group.blocks), ratio_here)
        layer.criterion = criterion_name(chosen_criterion)
        planned.append(layer)
    return planned


def layer_criterion(group: RestorableGroup, ratio: float, criterion):
    """The criterion a layer is ranked by. ``auto``: ``least-loss`` where LBYL solves after the
    activation with the data-free statistics of a layer without BatchNorm (its kept neurons
    span its input: a transformer MLP, method.md 5g), so that the criterion ranks by the loss
    LBYL then minimises; ``l2`` (the paper's) everywhere else."""
    if criterion != AUTO:
        return criterion
    solved_after = (group.bn is None and group.stage is None and group.input_source is not None
                    and group.consumer_activation.name != "identity")  # fmt: skip
    spans = keep_count(group.channels, ratio) >= group.producer.weight[0].numel()
    return "least-loss" if solved_after and spans else "l2"


def _select(filters: torch.Tensor, ratio: float, criterion, seed: int, blocks: torch.Tensor | None) -> list[int]:
    """The kept channels: by the criterion over the layer, or within each block of a grouped conv."""
    if blocks is None:
        return select_channels(filters, ratio, criterion, seed)[0].tolist()
    kept = []
    for block in grouped.members(blocks):
        kept += block[select_channels(filters[block], ratio, criterion, seed)[0]].tolist()
    return sorted(kept)


def least_loss_channel_scores(group: RestorableGroup, removed: int | None = None) -> torch.Tensor:
    """Criterion ``least-loss``: :func:`lbyl.criteria.least_loss_scores` with the covariance of the
    channels as the consumers read them (lbyl's default statistics model, :func:`layer_stats`) and
    the consumers' weights; within each block of a grouped conv. Scores are non-negative.
    ``removed``: how many channels go (per layer; the ranking stops there)."""
    if removed == 0:  # nothing goes: nothing to rank
        return torch.zeros(group.channels, dtype=torch.float64)
    defaults = LBYL()
    stats = layer_stats(group, (), True, defaults.input_model, defaults.scale_spread)
    covariance = read_covariance(stats, defaults.input_model, group.consumer_activation)
    gram = consumer_gram(group, covariance.device)
    if group.blocks is None:
        return least_loss_scores(covariance, gram, removed=removed)
    scores = torch.empty(group.channels, dtype=torch.float64)
    blocks = grouped.members(group.blocks)
    per_block = None if removed is None else -(-removed // len(blocks))
    for block in blocks:
        scores[block] = least_loss_scores(covariance[block][:, block], gram[block][:, block], removed=per_block)
    return scores


def consumer_gram(group: RestorableGroup, device=None) -> torch.Tensor:
    """``V^T V`` (N x N) over every consumer of the group: ``V`` holds, per channel, the weights
    through which the consumers read it (every output row, slot and kernel tap). A consumer
    followed by its own BatchNorm is read after it (rows scaled by ``|gamma| / std``)."""
    n = group.channels
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    for consumer in group.consumers:
        module = consumer.module
        weight = module.weight.detach().to(torch.float64)
        weight = weight.reshape(weight.shape[0], weight.shape[1], -1)
        bn = consumer.next_bn
        if bn is not None and getattr(bn, "running_var", None) is not None:
            gamma = bn.weight.detach().to(torch.float64).abs() if bn.weight is not None else 1.0
            weight = weight * (gamma / (bn.running_var.detach().to(torch.float64) + bn.eps).sqrt())[:, None, None]
        for rows, channels, positions in grouped.consumer_parts(module, consumer.positions):
            v = weight[rows][:, positions.to(weight.device)]  # (outputs, channels, slots, taps)
            part = torch.einsum("ocst,odst->cd", v, v).to(gram.device)
            if channels is None:
                gram += part
            else:
                index = channels.to(gram.device)
                gram[index[:, None], index[None, :]] += part
    return gram


def _planned(group: RestorableGroup, kept: list[int], ratio: float | None) -> PlannedLayer:
    return PlannedLayer(group.name, group.channels, kept, [c.name for c in group.consumers], group.bn_name,
                        group.consumer_activation.name, ratio,
                        group.stage.name if group.stage is not None else None)  # fmt: skip


MAKE_A_NEW_PLAN = "the plan was made for another architecture: make a new plan for this model"


def match_plan(groups, layers: list[PlannedLayer], fix: str = MAKE_A_NEW_PLAN):
    """Pair each planned layer with this model's group of that name (kept channels sorted);
    errors name the mismatch and end with ``fix``."""
    by_name = {g.name: g for g in groups}
    pairs = []
    for layer in layers:
        group = by_name.get(layer.name)
        if group is None:
            raise ValueError(
                f"plan names layer {layer.name!r}, which is not a restorable layer of this model "
                f"(restorable layers: {', '.join(by_name) or 'none'}); {fix}"
            )
        if layer.channels >= 0 and group.channels != layer.channels:
            raise ValueError(f"plan says {layer.name!r} has {layer.channels} channels, the model has {group.channels}; {fix}")
        kept = check_kept(layer.name, layer.kept, group.channels)
        grouped.check_blocks(layer.name, kept, group.blocks)
        pairs.append((group, replace(layer, channels=group.channels, kept=kept)))
    order = {g.name: i for i, g in enumerate(groups)}
    return sorted(pairs, key=lambda pair: order[pair[0].name])
