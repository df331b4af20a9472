"""The pipeline: ``plan`` (which channels) -> ``solve`` (a method, per layer) -> ``apply`` (surgery)."""
from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import grouped, sliced, squeeze, statistics
from .correction import padded_conv_coverage
from .counting import MacTally, count_ops_and_params, count_params, counting, eval_mode, recount
from .budget import check_target, predicted_size, ratio_for_budget
from .criteria import AUTO, STATISTICAL_CRITERIA, check_criterion, criterion_name
from .graph import RestorableGroup, SkippedLayer, build_dependency_graph, find_groups, release_trace
from .methods import Method, as_method
from .planning import Plan, PlannedLayer, layer_stats, match_plan, plan_layers
from .report import LayerRecord, Report, SkippedRecord, attach_report
from .surgery import apply_solution, remove_channels, removal_indices
from .validation import all_finite, as_inputs, check_bool, check_choice, check_int, check_layers, check_model
from .validation import check_input_stats, check_selection

ORDERS = ("original", "sequential")


@dataclass
class Traced:
    groups: list[RestorableGroup]
    skipped: list[SkippedLayer]
    macs: float
    tally: MacTally
    inputs: tuple
    scores: dict = field(default_factory=dict)  # criterion least-loss: per layer, computed once


def plan(
    model: nn.Module, example_inputs, ratio=None, *, kept=None, target_macs: float | None = None,
    target_params: float | None = None, criterion=AUTO, layers=None, seed: int = 0, input_stats=None,
) -> Plan:
    """A dry run: the layers :func:`restore` would prune, the channels each keeps and the predicted size.

    Choose the channels with one of: ``ratio``, the fraction removed per layer (float in
    [0, 1), or ``{layer: ratio}``); ``kept``, ``{layer name: [channel indices]}``; or a budget,
    ``target_macs`` / ``target_params``, the fraction of the model's MACs / parameters to keep
    (the smallest uniform ratio over the chosen layers that meets it). ``criterion``: ``"auto"``
    (``"least-loss"`` where LBYL solves after the activation without BatchNorm, a transformer
    MLP; ``"l2"`` elsewhere: :func:`lbyl.planning.layer_criterion`), ``"l2"``, ``"l1"``,
    ``"l2gm"``, ``"random"`` (seeded by ``seed``), ``"least-loss"`` (the channels whose removal
    the restoration recovers best under the model's statistics,
    :func:`lbyl.criteria.least_loss_scores`) or a callable ``(filters: Tensor[N, M]) -> scores[N]``,
    higher kept. ``layers``, ``input_stats``: see :func:`restore`. The model is not modified.
    """
    check_model(model)
    declared = check_input_stats(input_stats)
    traced = _trace(model, as_inputs(example_inputs))
    _prepare_criterion(traced, criterion, declared)
    targets = {"macs": check_target("target_macs", target_macs), "params": check_target("target_params", target_params)}
    targets = {k: v for k, v in targets.items() if v is not None}
    if targets:
        ratio = _budget_ratio(model, traced, ratio, kept, targets, criterion, layers, seed)
    result = _make_plan(traced, ratio, kept, criterion, layers, seed)
    result.macs_after, result.params_after = predicted_size(model, traced.groups, result.layers, traced.inputs)
    result.params_before, result.targets = count_params(model), targets
    return result


def _budget_ratio(model, traced: Traced, ratio, kept, targets: dict, criterion, layers, seed) -> float:
    if ratio is not None or kept is not None or len(targets) != 1:
        raise ValueError("pass one of ratio=, kept=, target_macs= or target_params=")
    what, target = next(iter(targets.items()))
    before = int(traced.macs) if what == "macs" else count_params(model)
    _make_plan(traced, 0.0, None, criterion, layers, seed)  # the usual errors for the other arguments

    def size_at(candidate: float) -> int:
        planned = _make_plan(traced, candidate, None, criterion, layers, seed).layers
        return predicted_size(model, traced.groups, planned, traced.inputs)[0 if what == "macs" else 1]

    channels = [layer.channels for layer in _make_plan(traced, 0.0, None, criterion, layers, seed).layers]
    return ratio_for_budget(size_at, channels, before, target, what)


def restore(
    model: nn.Module,
    example_inputs,
    ratio: float | Mapping[str, float] | Plan | None = None,
    method: str | Method = "lbyl",
    *,
    kept: Mapping[str, Sequence[int]] | None = None,
    target_macs: float | None = None,
    target_params: float | None = None,
    criterion=AUTO,
    layers: str | Sequence[str] | None = None,
    seed: int = 0,
    order: str = "original",
    inplace: bool = False,
    input_stats=None,
) -> tuple[nn.Module, Report]:
    """Remove channels of every restorable layer and restore the model without data.

    ``ratio``: fraction of output channels removed per layer in [0, 1), a mapping
    ``{layer name or glob: ratio}`` (other layers stay whole), or a :class:`Plan` from
    :func:`plan`. ``kept``: ``{layer name: [channel indices]}`` instead of a ratio.
    ``target_macs`` / ``target_params``: a budget instead, the fraction of the MACs /
    parameters to keep (see :func:`plan`; the report gives the values reached).
    ``method``: a method object (:class:`lbyl.LBYL`, :class:`lbyl.NeuronMerging`,
    :class:`lbyl.Prune`, ``lbyl.paper.*``) or a shortcut for its defaults: ``"lbyl"``,
    ``"nm"``, ``"prune"``, ``"lbyl-paper"``, ``"nm-paper"``. ``criterion``, ``seed``: see
    :func:`plan`. ``layers``: producer names (globs), ``"all"``, or None for the paper's
    protocol (every restorable conv of a CNN, every hidden Linear layer of an MLP).
    ``order``: ``"original"`` solves every layer from the original weights (the paper's
    protocol); ``"sequential"`` from each producer as edited by the layers before it.
    ``input_stats``: ``(mean, std)`` of the model's input after your preprocessing (numbers, or
    tensors shaped like one input or ``(C, 1, 1)``), read by the statistics of layers without
    BatchNorm that the input feeds; None: standardised (mean 0, std 1).
    The caller's model is never modified unless ``inplace=True``.
    Returns the restored model (in the caller's train/eval mode) and a :class:`Report`.
    """
    method, order, inplace = as_method(method), check_choice("order", order, ORDERS), check_bool("inplace", inplace)
    declared = check_input_stats(input_stats)
    check_model(model)
    inputs, clock = as_inputs(example_inputs), _Clock()
    if target_macs is not None or target_params is not None:
        with clock("graph"):  # the budget is planned on the caller's model (read only)
            ratio = plan(model, inputs, ratio, kept=kept, target_macs=target_macs, target_params=target_params,
                         criterion=criterion, layers=layers, seed=seed, input_stats=input_stats)  # fmt: skip
        kept, criterion, layers, seed = None, AUTO, None, 0
    with clock("copy"):
        target = model if inplace else copy.deepcopy(model)
    params_before = count_params(target)
    with eval_mode(target):
        with clock("graph"):
            traced = _trace(target, inputs)
            if not isinstance(ratio, Plan):
                _prepare_criterion(traced, criterion, declared)
            chosen = _given_plan(ratio, kept, criterion, layers, seed) or _make_plan(traced, ratio, kept, criterion, layers, seed)
            pairs = match_plan(traced.groups, chosen.layers)
        records = _solve_and_apply(target, traced, pairs, method, order, chosen.criterion, clock, declared)
        with clock("surgery"):
            remove_channels(*removal_indices((g, layer.pruned) for g, layer in pairs))
            macs_after, params_after = recount(traced.tally, target, inputs)
    stats_setting = {} if declared is None else {"input_stats": [declared[0].tolist(), declared[1].tolist()]}
    settings = dict(method.settings(), criterion=chosen.criterion, seed=chosen.seed, order=order, **stats_setting,
                    ratio=_ratio_setting(ratio, chosen), **{f"target_{k}": v for k, v in chosen.targets.items()})  # fmt: skip
    report = Report(settings, records, [SkippedRecord(s.name, s.reason) for s in traced.skipped],
                    int(params_before), int(params_after), int(traced.macs), int(macs_after), clock.total(), clock.parts,
                    [list(x.shape) for x in inputs])  # fmt: skip
    attach_report(target, report)
    return target, report


class _Clock:
    """Wall time per named stage; a stage may be timed in several pieces."""

    def __init__(self):
        self.started, self.parts = time.perf_counter(), {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.parts[stage] = self.parts.get(stage, 0.0) + time.perf_counter() - t0

    def total(self) -> float:
        return time.perf_counter() - self.started


def _solve_and_apply(target, traced: Traced, pairs, method: Method, order: str, criterion: str, clock,
                     input_stats=None) -> list[LayerRecord]:  # fmt: skip
    """Per layer: read its statistics, let the method solve, fold the solution into the consumers."""
    reader = _StatsReader([g for g, _ in pairs], order, method)
    propagated = method.input_model == "propagated"
    sources = [g.input_source for g, _ in pairs if (g.bn is None and method.needs_statistics) or (g.bn is not None and propagated)]
    if sources:  # input moments, from the model before any edit
        statistics.prepare(sources, input_stats, tuple(traced.inputs[0].shape[1:]))
    coverage = {}
    if method.mean_correction and pairs:  # border taps of padded consumers read zeros: weight the mean offset by coverage
        seen = {call.module: tuple(call.in_shape[2:]) for call in traced.tally.calls or ()}
        modules = [c.module for g, _ in pairs for c in g.consumers]
        coverage = padded_conv_coverage(target, traced.inputs, modules, seen)
    records = []
    for group, layer in pairs:
        t0 = time.perf_counter()
        with clock("delivery"):
            stats = reader.read(group)
            device = stats.filters.device
            kept = torch.tensor(layer.kept, dtype=torch.long, device=device)
            pruned = torch.tensor(layer.pruned, dtype=torch.long, device=device)
            solved = [(view, grouped.solve(method, view_stats, kept, pruned, group.consumer_activation, group.blocks),
                       squeeze.group_gates(view, view_stats)) for view, view_stats in sliced.views(group, stats)]  # fmt: skip
        with clock("surgery"):
            reader.before_editing(group, pruned)
            for view, solution, gates in solved:
                apply_solution(view, kept, pruned, solution, coverage, gates)
            _check_finite_edit(group, method.name)
        records.append(_record(layer, method, criterion, [s for _, s, _ in solved], time.perf_counter() - t0))
    return records


class _StatsReader:
    """Producer statistics in the chosen order.

    ``original``: every producer as it was before any consumer was edited; a producer is
    snapshotted just before the first edit that reaches it, so one copy is held at a time.
    ``sequential``: as edited so far, without the input channels already removed upstream.
    The statistics are those ``method`` reads (its input model and scale mixture).
    """

    def __init__(self, groups: list[RestorableGroup], order: str, method: Method):
        self.unread = {g.producer: g for g in groups} if order == "original" else {}
        self.order, self.snapshots, self.dropped, self.method = order, {}, {}, method

    def _stats(self, group, dropped=()):
        method = self.method
        return layer_stats(group, dropped, method.needs_statistics, method.input_model, method.scale_spread)

    def read(self, group):
        self.unread.pop(group.producer, None)
        dropped = sorted(self.dropped.get(group.producer, ()))
        return self.snapshots.pop(group.name, None) or self._stats(group, dropped)

    def before_editing(self, group, pruned: torch.Tensor):
        for consumer in group.consumers:
            later = self.unread.pop(consumer.module, None)
            if later is not None:
                self.snapshots[later.name] = self._stats(later)
            if self.order == "sequential":  # the columns that go: a later producer no longer has them
                columns = consumer.positions[pruned.cpu()].flatten().tolist()
                self.dropped.setdefault(consumer.module, set()).update(columns)


def _record(layer: PlannedLayer, method: Method, criterion: str, solutions: list, seconds: float) -> LayerRecord:
    """One layer's report line; a layer solved once per BatchNorm slice (:mod:`lbyl.sliced`) sums the
    losses of its solutions and reports the largest condition number and lambda2."""
    loss = {k: sum(float(s.loss[k].sum()) for s in solutions) for k in ("re", "be", "ae")}
    conditions = [s.condition for s in solutions if s.condition is not None]
    return LayerRecord(
        name=layer.name, channels_before=layer.channels, channels_after=len(layer.kept), method=method.name,
        criterion=layer.criterion or criterion, ratio=layer.removed_fraction,
        re=loss["re"], be=loss["be"], ae=loss["ae"], seconds=seconds, consumers=list(layer.consumers), bn=layer.bn,
        activation=layer.activation, kept=list(layer.kept), lambda2=max(s.lambda2 for s in solutions),
        solve=solutions[0].space, condition=max(conditions) if conditions else None,
    )


def shrink(model: nn.Module, example_inputs, kept: Mapping[str, Sequence[int]], inplace: bool = False) -> nn.Module:
    """Remove channels so that producer ``name`` keeps exactly ``kept[name]`` (no restoration).

    Rebuilds the architecture of a restored model from its plan before its
    weights are loaded; the weights of the result are otherwise meaningless.
    """
    inputs = as_inputs(example_inputs)
    target = model if check_bool("inplace", inplace) else copy.deepcopy(model)
    groups, _ = find_groups(target, inputs)
    layers = [PlannedLayer(name, -1, list(indices)) for name, indices in kept.items()]
    fix = "the plan was written for another architecture: rebuild the model it was written for, or restore this model again"
    pairs = match_plan(groups, layers, fix)
    remove_channels(*removal_indices((g, layer.pruned) for g, layer in pairs))
    return target


def _trace(model: nn.Module, inputs: tuple) -> Traced:
    """Trace the dependency graph and find the groups; the same forward pass checks the inputs
    and counts the MACs, so restoring needs one forward pass, not four."""
    with eval_mode(model), counting(model, record=True) as tally:
        try:
            dg = build_dependency_graph(model, inputs)
        except Exception:
            _forward_check(model, inputs)  # a ValueError that names the input shapes, if they are the cause
            raise
        if tally.passes != 1:  # the tracer retried model(inputs) after model(*inputs) failed
            _forward_check(model, inputs)
        tally.resolve()
        shapes = {call.module: call.in_shape for call in tally.calls or ()}
        groups, skipped = find_groups(model, inputs, dg=dg, input_shapes=shapes)
        release_trace(dg)  # the recorded autograd graph would keep every replaced weight alive
    macs = tally.macs if tally.complete else count_ops_and_params(model, inputs)[0]
    return Traced(groups, skipped, macs, tally, inputs)


def _make_plan(traced: Traced, ratio, kept, criterion, layers, seed) -> Plan:
    check_selection(ratio, kept, check_layers(layers))
    check_criterion(criterion)
    check_int("seed", seed)
    if not traced.groups:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in traced.skipped) or "the model has no Conv/Linear layer"
        raise ValueError(
            "no restorable layer found (a Conv/Linear -> optional BatchNorm -> ReLU -> Conv/Linear chain "
            f"whose channels are not tied to a residual add). Skipped: {reasons}"
        )
    planned = plan_layers(traced.groups, traced.skipped, ratio, kept, criterion, layers, seed, traced.scores)
    skipped = [SkippedRecord(s.name, s.reason) for s in traced.skipped]
    return Plan(planned, skipped, [g.name for g in traced.groups], criterion_name(criterion), seed,
                macs_before=int(traced.macs))  # fmt: skip


def _prepare_criterion(traced: Traced, criterion, input_stats) -> None:
    """A criterion that reads the statistics needs the input moments, from the model before any
    edit: every layer's for ``least-loss``; for ``auto`` those of layers without BatchNorm, the
    only ones it may rank by them (:func:`lbyl.planning.layer_criterion`)."""
    if not isinstance(criterion, str) or criterion not in (AUTO, *STATISTICAL_CRITERIA):
        return
    sources = [g.input_source for g in traced.groups if criterion != AUTO or g.bn is None]
    statistics.prepare(sources, input_stats, tuple(traced.inputs[0].shape[1:]))


def _given_plan(ratio, kept, criterion, layers, seed) -> Plan | None:
    if not isinstance(ratio, Plan):
        return None
    extra = [name for name, value, default in (("kept", kept, None), ("layers", layers, None),
             ("criterion", criterion, AUTO), ("seed", seed, 0)) if value != default]  # fmt: skip
    if extra:
        raise ValueError(f"a Plan already fixes the channels of every layer; drop {'= / '.join(extra)}= "
                         "(or make the plan with them: lbyl.plan(model, inputs, ...))")  # fmt: skip
    return ratio


def _ratio_setting(ratio, chosen: Plan):
    """The report's ratio: one number when every layer lost the same fraction (as planned), else per layer."""
    fractions = {layer.name: layer.removed_fraction for layer in chosen.layers}
    if isinstance(ratio, (int, float)) or (not isinstance(ratio, Mapping) and len(set(fractions.values())) == 1):
        return float(ratio) if isinstance(ratio, (int, float)) else next(iter(fractions.values()))
    return fractions


def _check_finite_edit(group: RestorableGroup, method: str) -> None:
    """Safety net: restoration never leaves NaN or Inf in a consumer it edited."""
    for consumer in group.consumers:
        module = consumer.module
        tensors = [module.weight, module.bias, getattr(consumer.next_bn, "running_mean", None)]
        if any(t is not None and not all_finite(t) for t in tensors):
            raise ValueError(
                f"restoring layer {group.name!r} with method {method!r} produced NaN or Inf in {consumer.name!r} "
                f"(stored as {module.weight.dtype}): the layer is numerically degenerate (near-zero filters, "
                "BatchNorm gamma or variance) or the result overflows the weights' dtype. Convert a half-precision "
                "model to float32 first, use method lbyl.LBYL(lambda2=...) with lambda2 > 0, or leave the layer "
                "out (layers=... / a ratio mapping without it)."
            )


def _forward_check(model, inputs):
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as error:  # any failure here means the inputs do not fit the model
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
        raise ValueError(
            f"the model cannot run on example_inputs of shape {shapes}: {error}. "
            "Pass inputs shaped like one real batch for this model (batch size 1 is enough)."
        ) from error
