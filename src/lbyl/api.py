"""``lbyl.restore``: prune a model and restore it without data."""
from __future__ import annotations

import copy
import fnmatch
import math
import time
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from .correction import channel_sums, consumer_offset, mean_shift, padded_conv_coverage, variance_ratio
from .counting import MacTally, count_ops_and_params, count_params, counting, recount
from .delivery import delivery_and_loss, lbyl_solve_space, preactivation_covariance, relu_covariance, scaled_filters
from .criteria import CRITERIA, select_channels
from .delivery import INPUT_MODELS, METHODS, BatchNormStats, ProducerStats, delivery_matrix, gcv_lambda2, restoration_loss
from .graph import RestorableGroup, SkippedLayer, build_dependency_graph, find_groups, release_trace
from .report import LayerRecord, Report, SkippedRecord
from .surgery import add_output_offset, apply_delivery, remove_channels, scale_running_variance

ORDERS = ("original", "sequential")
#: methods whose mean shift is corrected unless the caller says otherwise
CORRECTED_BY_DEFAULT = ("lbyl",)


def producer_stats(group: RestorableGroup, dropped_inputs: Sequence[int] = ()) -> ProducerStats:
    """Read a group's producer weights and BN statistics as float64 tensors.

    ``dropped_inputs`` removes input columns (sequential order: inputs already
    pruned upstream no longer exist).
    """
    # copies, never views: the module may be edited in place after this snapshot is taken
    weight = group.producer.weight.detach().to(torch.float64, copy=True)
    if dropped_inputs:
        keep = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
        keep[list(dropped_inputs)] = False
        weight = weight[:, keep]
    bias = group.producer.bias
    bn = None
    if group.bn is not None:
        m = group.bn
        n = weight.shape[0]
        ones = torch.ones(n, dtype=torch.float64, device=weight.device)
        zeros = torch.zeros(n, dtype=torch.float64, device=weight.device)
        running_mean = m.running_mean if m.running_mean is not None else zeros
        running_var = m.running_var if m.running_var is not None else ones
        bn = BatchNormStats(
            gamma=(m.weight.detach() if m.weight is not None else ones).to(torch.float64, copy=True),
            beta=(m.bias.detach() if m.bias is not None else zeros).to(torch.float64, copy=True),
            mean=running_mean.detach().to(torch.float64, copy=True),
            var=running_var.detach().to(torch.float64, copy=True),
            eps=float(m.eps),
        )
    return ProducerStats(
        filters=weight.reshape(weight.shape[0], -1),
        bias=bias.detach().to(torch.float64, copy=True) if bias is not None else None,
        bn=bn,
    )


def ranking_filters(stats: ProducerStats) -> torch.Tensor:
    """What a criterion ranks: the filter, with its bias appended when no BatchNorm follows.

    Without BN the bias is the weight of a constant input and part of the neuron
    (the released LBYL code ranks LeNet's neurons this way); a BN absorbs it.
    """
    if stats.bn is None and stats.bias is not None:
        return torch.cat([stats.filters, stats.bias[:, None].to(stats.filters.dtype)], dim=1)
    return stats.filters


def _as_inputs(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(x, torch.Tensor) for x in example_inputs):
        return tuple(example_inputs)
    raise TypeError(
        "example_inputs must be a tensor or a tuple of tensors shaped like one real batch, "
        f"e.g. torch.randn(1, 3, 32, 32); got {type(example_inputs).__name__}"
    )


def _check_ratio(ratio, where="ratio"):
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0 <= ratio < 1:
        raise ValueError(f"{where} must be a number in [0, 1) (the fraction of channels to remove), got {ratio!r}")


def _validate(model, ratio, method, criterion, lambda1, lambda2, order):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(ratio, Mapping):
        for name, value in ratio.items():
            _check_ratio(value, f"ratio for {name!r}")
    else:
        _check_ratio(ratio)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    for label, value in (("lambda1", lambda1), ("lambda2", lambda2)):
        if label == "lambda2" and value == "auto":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(
                f"{label} must be a finite number >= 0" + (" or 'auto'" if label == "lambda2" else "") + f", got {value!r}"
            )
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise ValueError(
                f"{name} contains NaN or Inf values; restoration needs finite weights. "
                "Check the checkpoint (it may be corrupt or from a diverged run)."
            )
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            bad = (m.running_var.detach().to(torch.float64) + m.eps <= 0).nonzero().flatten().tolist()
            if bad:
                raise ValueError(
                    f"BatchNorm {name} has running_var + eps <= 0 in channels {bad[:8]} (eps={m.eps}), so it divides "
                    "by zero and the model's outputs are not finite. Give that layer a positive eps (PyTorch's "
                    "default is 1e-5) or check the checkpoint."
                )


def _all_finite(tensor: torch.Tensor) -> bool:
    """True when no entry is NaN or infinite.

    A sum is finite only if every entry is, so one reduction (no boolean copy of
    the tensor) settles the usual case; a sum that overflows is checked entry by entry.
    """
    with torch.no_grad():
        return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def default_layers(groups: list[RestorableGroup]) -> list[RestorableGroup]:
    """The paper's protocol as a generic rule: a network with restorable convolutions prunes
    those (its Linear head stays whole); a network without (an MLP) prunes its hidden Linear layers."""
    convs = [g for g in groups if not isinstance(g.producer, nn.Linear)]
    return convs or list(groups)


def _select(groups, skipped, layers):
    if layers is None:
        return default_layers(groups)
    if layers == "all":
        return list(groups)
    patterns = [layers] if isinstance(layers, str) else list(layers)
    chosen = []
    for pattern in patterns:
        hits = [g for g in groups if fnmatch.fnmatchcase(g.name, pattern)]
        if not hits:
            reasons = [s for s in skipped if fnmatch.fnmatchcase(s.name, pattern)]
            why = f" ({reasons[0].name} is skipped: {reasons[0].reason})" if reasons else ""
            available = ", ".join(g.name for g in groups) or "none"
            raise ValueError(f"layer {pattern!r} is not a restorable layer{why}; restorable layers: {available}")
        chosen.extend(h for h in hits if h not in chosen)
    return [g for g in groups if g in chosen]


def _check_finite_edit(group: RestorableGroup, method: str) -> None:
    """Safety net: restoration never leaves NaN or Inf in a consumer it edited."""
    for consumer in group.consumers:
        module = consumer.module
        tensors = [module.weight, module.bias]
        next_bn = getattr(consumer, "next_bn", None)  # a BatchNorm whose running mean may be edited
        if next_bn is not None:
            tensors.append(next_bn.running_mean)
        if any(t is not None and not _all_finite(t) for t in tensors):
            raise ValueError(
                f"restoring layer {group.name!r} with method {method!r} produced NaN or Inf in {consumer.name!r} "
                f"(stored as {module.weight.dtype}): the layer is numerically degenerate (near-zero filters, "
                "BatchNorm gamma or variance) or the result overflows the weights' dtype. Convert a half-precision "
                "model to float32 first, use method 'lbyl' with lambda2 > 0, or leave the layer out "
                "(layers=... / a ratio mapping without it)."
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


def _trace(model, inputs) -> tuple[tp.DependencyGraph, float, MacTally]:
    """Trace the dependency graph; its forward pass also checks the inputs and counts the MACs.

    Returns the graph, the model's MACs per sample (those of
    ``tp.utils.count_ops_and_params``) and the tally that recounts them once
    channels are removed, so restoring needs one forward pass, not four.
    """
    with counting(model, record=True) as tally:
        try:
            dg = build_dependency_graph(model, inputs)
        except Exception:
            _forward_check(model, inputs)  # a ValueError that names the input shapes, if they are the cause
            raise
    if tally.passes != 1:  # the tracer retried model(inputs) after model(*inputs) failed
        _forward_check(model, inputs)
    tally.resolve()
    macs = tally.macs if tally.complete else count_ops_and_params(model, inputs)[0]
    return dg, macs, tally


def restore(
    model: nn.Module,
    example_inputs,
    ratio: float | Mapping[str, float],
    method: str = "lbyl",
    criterion: str = "l2",
    lambda1: float = 0.0,
    lambda2: float | str = 0.0,
    layers: str | Sequence[str] | None = None,
    seed: int = 0,
    inplace: bool = False,
    order: str = "original",
    bias_correction: bool | None = None,
    input_model: str = "white",
    variance_correction: bool | None = None,
) -> tuple[nn.Module, Report]:
    """Remove ``ratio`` of the channels of every restorable layer and restore the model without data.

    Parameters
    ----------
    model : the trained network; never modified unless ``inplace=True``.
    example_inputs : a tensor (or tuple) shaped like one input batch, used only to trace the graph.
    ratio : fraction of output channels removed per layer, in [0, 1); a mapping
        ``{layer name: ratio}`` prunes layers at their own ratios (others stay whole).
    method : ``"lbyl"`` (exact closed form), ``"nm"`` (Neuron Merging, exact BN factor),
        ``"prune"`` (no compensation), or ``"lbyl-paper"`` / ``"nm-paper"`` (the authors'
        released behaviour, for reproducing published tables).
    criterion : ``"l2"``, ``"l1"``, ``"l2gm"`` or ``"random"`` (seeded by ``seed``).
    lambda1, lambda2 : weights of the BN-bias term and of the coefficient penalty in the LBYL loss.
        ``lambda2="auto"`` picks it per layer by generalised cross-validation over the
        filter coordinates (reads the weights only).
    layers : producer names to prune (glob patterns allowed), ``"all"`` for every restorable
        layer, or None (default) for the paper's protocol: every restorable convolution in a
        CNN (hidden Linear layers of the head stay whole), every hidden Linear layer in an MLP.
    order : ``"original"`` computes every delivery matrix from the original weights (the
        paper's protocol); ``"sequential"`` uses each producer's weights as already edited
        by the layers before it, without the input channels those layers removed.
    bias_correction : add the expected consumer input that pruning removes (computed from
        the BatchNorm statistics, no data) to the consumer's bias or the next BatchNorm's
        running mean. Layers without BatchNorm are not corrected. None (default) turns it on
        for ``"lbyl"``, where the benchmarks show it helps at every ratio, and off for the
        baselines and paper variants, which then behave as published.
    input_model : the covariance model of a layer's BN outputs, for ``"lbyl"``'s residual and
        for the predictions made without data (the variance correction, the solve after the
        ReLU). ``"white"`` (default): white inputs, plain squared distance between filters (the
        paper's loss). ``"bn"``: the input covariance estimated from the BatchNorm's running
        variances (layers without BatchNorm fall back to ``"white"``). Where the kept filters
        span the input space (more kept filters than weights per filter) and a BN and ReLU
        follow, the delivery is solved after the ReLU under a Gaussian model of the BN outputs.
    variance_correction : rescale the running variance of the BatchNorm that reads each
        consumer by the change of that consumer's output variance that the restoration
        causes, predicted under the input model (no data). None (default): on for ``"lbyl"``,
        off for the others, like ``bias_correction``. Consumers without such a BatchNorm are
        not corrected.

    Returns
    -------
    (restored model, report). The restored model has the caller's train/eval mode.
    """
    _validate(model, ratio, method, criterion, lambda1, lambda2, order)
    if input_model not in INPUT_MODELS:
        raise ValueError(f"unknown input_model {input_model!r}; choose one of {', '.join(INPUT_MODELS)}")
    if bias_correction is None:
        bias_correction = method in CORRECTED_BY_DEFAULT
    if variance_correction is None:
        variance_correction = method in CORRECTED_BY_DEFAULT
    inputs = _as_inputs(example_inputs)
    started = time.perf_counter()
    was_training = model.training
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    params_before = count_params(target)

    t0 = time.perf_counter()
    dg, macs_before, tally = _trace(target, inputs)
    groups, skipped = find_groups(target, inputs, dg=dg)
    release_trace(dg)  # the recorded autograd graph would keep every replaced weight alive
    timings = {"graph": time.perf_counter() - t0}
    if not groups:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped) or "the model has no Conv/Linear layer"
        raise ValueError(
            "no restorable layer found (a Conv/Linear -> optional BatchNorm -> ReLU -> Conv/Linear chain "
            f"whose channels are not tied to a residual add). Skipped: {reasons}"
        )
    if isinstance(ratio, Mapping):
        chosen = _select(groups, skipped, list(ratio))
        ratios = {g.name: next(v for k, v in ratio.items() if fnmatch.fnmatchcase(g.name, k)) for g in chosen}
    else:
        chosen = _select(groups, skipped, layers)
        ratios = {g.name: ratio for g in chosen}

    # the paper's protocol reads every producer as it was before any consumer was edited: a producer
    # is snapshotted just before the first edit that reaches it, so one layer's copy is held at a time
    original, unread = {}, ({g.producer: g for g in chosen} if order == "original" else {})
    # border taps of padded consumers read zeros: weight the mean correction by tap coverage
    coverage = {}
    if bias_correction:
        seen = {call.module: tuple(call.in_shape[2:]) for call in tally.calls or ()}
        coverage = padded_conv_coverage(target, inputs, [c.module for g in chosen for c in g.consumers], seen)
    out_channels, in_channels, records = {}, {}, []
    t_delivery = t_surgery = 0.0
    for group in chosen:
        t0 = time.perf_counter()
        unread.pop(group.producer, None)
        stats = original.pop(group.name, None) or producer_stats(group, sorted(in_channels.get(group.producer, ())))
        kept, pruned = select_channels(ranking_filters(stats), ratios[group.name], criterion, seed)
        device = stats.filters.device
        kept, pruned = kept.to(device), pruned.to(device)
        layer_lambda2 = lambda2
        if lambda2 == "auto":
            layer_lambda2 = gcv_lambda2(stats, kept, pruned, lambda1) if method == "lbyl" and len(pruned) else 0.0
        # the covariance of the BN outputs under the input model: computed once, for the solve and the variances
        covariance = None
        if (method == "lbyl" and input_model == "bn" and stats.bn is not None) or (variance_correction and len(pruned)):
            covariance = preactivation_covariance(stats, input_model)
        delivery, loss = delivery_and_loss(
            method, stats, kept, pruned, lambda1, layer_lambda2, input_model, group.activation, covariance
        )
        solve = ""
        if method == "lbyl":
            solve = lbyl_solve_space(stats, scaled_filters(stats)[0][kept], input_model, group.activation)
        shift = mean_shift(stats, kept, pruned, delivery, group.activation) if bias_correction else None
        for consumer in group.consumers:  # about to be edited: keep what a later group must read
            if consumer.module in unread:
                later = unread.pop(consumer.module)
                original[later.name] = producer_stats(later)
        t1 = time.perf_counter()
        if shift is not None and len(pruned):  # nothing removed: nothing to correct (and no new bias)
            for consumer in group.consumers:
                offset = consumer_offset(
                    consumer.module.weight, consumer.positions.to(device), pruned, shift, coverage.get(consumer.module)
                )
                add_output_offset(consumer.module, offset, consumer.next_bn)
        if variance_correction and len(pruned):
            if solve == "after-relu":  # variances in the space the delivery was solved in
                covariance = relu_covariance(stats.bn.beta, covariance)
            for consumer in group.consumers:
                if consumer.next_bn is not None and consumer.next_bn.running_var is not None:
                    sums = channel_sums(consumer.module.weight, consumer.positions.to(device))
                    scale_running_variance(consumer.next_bn, variance_ratio(sums, kept, pruned, delivery, covariance))
        apply_delivery(group.consumers, kept, pruned, delivery)
        _check_finite_edit(group, method)
        pruned_list = pruned.tolist()
        out_channels.setdefault(group.producer, set()).update(pruned_list)
        if group.bn is not None:
            out_channels.setdefault(group.bn, set()).update(pruned_list)
        for consumer in group.consumers:
            columns = consumer.positions[pruned.cpu()].flatten().tolist()
            in_channels.setdefault(consumer.module, set()).update(columns)
        t2 = time.perf_counter()
        t_delivery += t1 - t0
        t_surgery += t2 - t1
        records.append(
            LayerRecord(
                name=group.name,
                channels_before=stats.channels,
                channels_after=len(kept),
                method=method,
                criterion=criterion,
                ratio=float(ratios[group.name]),
                re=float(loss["re"].sum()),
                be=float(loss["be"].sum()),
                ae=float(loss["ae"].sum()),
                seconds=t2 - t0,
                consumers=[c.name for c in group.consumers],
                bn=group.bn_name,
                activation=group.activation,
                kept=kept.tolist(),
                lambda2=float(layer_lambda2),
                solve=solve,
            )
        )
    t0 = time.perf_counter()
    remove_channels(out_channels, in_channels)
    timings.update(delivery=t_delivery, surgery=t_surgery + time.perf_counter() - t0)

    macs_after, params_after = recount(tally, target, inputs)
    target.train(was_training)
    if inplace:
        model.train(was_training)
    settings = dict(
        ratio=dict(ratios) if isinstance(ratio, Mapping) else float(ratio),
        method=method,
        criterion=criterion,
        lambda1=float(lambda1),
        lambda2=lambda2 if lambda2 == "auto" else float(lambda2),
        seed=int(seed),
        order=order,
        bias_correction=bool(bias_correction),
        input_model=input_model,
        variance_correction=bool(variance_correction),
    )
    report = Report(
        settings=settings,
        layers=records,
        skipped=[SkippedRecord(s.name, s.reason) for s in skipped],
        params_before=int(params_before),
        params_after=int(params_after),
        macs_before=int(macs_before),
        macs_after=int(macs_after),
        seconds=time.perf_counter() - started,
        timings=timings,
    )
    return target, report


def shrink(model: nn.Module, example_inputs, kept: Mapping[str, Sequence[int]], inplace: bool = False) -> nn.Module:
    """Remove channels so that producer ``name`` keeps exactly ``kept[name]`` (no restoration).

    Rebuilds the architecture of a restored model from its plan before its
    weights are loaded; the weights of the result are otherwise meaningless.
    """
    inputs = _as_inputs(example_inputs)
    target = model if inplace else copy.deepcopy(model)
    was_training = target.training
    groups, skipped = find_groups(target, inputs)
    by_name = {g.name: g for g in groups}
    out_channels, in_channels = {}, {}
    for name, indices in kept.items():
        if name not in by_name:
            raise ValueError(
                f"plan names layer {name!r}, which is not a restorable layer of this model "
                f"(restorable layers: {', '.join(by_name) or 'none'}); the plan was written for another "
                "architecture: rebuild the model it was written for, or restore this model again"
            )
        group = by_name[name]
        keep = set(int(i) for i in indices)
        if not keep or max(keep) >= group.channels or min(keep) < 0:
            raise ValueError(f"plan keeps invalid channels for {name!r} (it has {group.channels} channels)")
        pruned = torch.tensor(sorted(set(range(group.channels)) - keep), dtype=torch.long)
        out_channels.setdefault(group.producer, set()).update(pruned.tolist())
        if group.bn is not None:
            out_channels.setdefault(group.bn, set()).update(pruned.tolist())
        for consumer in group.consumers:
            in_channels.setdefault(consumer.module, set()).update(consumer.positions[pruned].flatten().tolist())
    remove_channels(out_channels, in_channels)
    target.train(was_training)
    return target
