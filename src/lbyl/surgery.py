"""Surgery: fold delivery matrices into consumers and remove channels physically."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
from torch_pruning.pruner import function as tp_function

from . import grouped, squeeze
from .correction import channel_sums, consumer_offset, explained_share, variance_ratio
from .graph import BATCHNORMS, Consumer, RestorableGroup


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
    result = weight.detach().clone()
    fold_into_consumer_(result, positions, kept, pruned, delivery)
    return result


def fold_into_consumer_(
    weight: torch.Tensor,
    positions: torch.Tensor,
    kept: torch.Tensor,
    pruned: torch.Tensor,
    delivery: torch.Tensor,
) -> None:
    """In-place :func:`fold_into_consumer`: only the kept columns are read, computed and written.

    Same float64 arithmetic; no copy of the whole weight. Output rows are done in
    blocks of about ``_FOLD_BLOCK_BYTES`` of float64 work (a 4096 x 25088 Linear
    layer after a flatten would otherwise need gigabytes at once).
    """
    kept_columns, pruned_columns = positions[kept], positions[pruned]  # (|K| or |P|, slots)
    delivery = delivery.to(weight.device, torch.float64)
    per_row = (2 * kept_columns.numel() + pruned_columns.numel()) * weight[0, 0].numel() * 8
    rows = max(1, _FOLD_BLOCK_BYTES // max(per_row, 1))
    for start in range(0, weight.shape[0], rows):
        block = weight[start : start + rows]  # a view: writes go to ``weight``
        pruned_blocks = block[:, pruned_columns].to(torch.float64)  # (rows, |P|, slots, *kernel)
        delivered = torch.einsum("oj...,kj->ok...", pruned_blocks, delivery)
        block[:, kept_columns] = (block[:, kept_columns].to(torch.float64) + delivered).to(weight.dtype)


_FOLD_BLOCK_BYTES = 32 * 2**20


def scale_running_variance(bn: nn.Module, ratio: torch.Tensor) -> None:
    """Multiply a BatchNorm's running variance by ``ratio`` (per channel), in its own dtype."""
    with torch.no_grad():
        var = bn.running_var
        var.copy_((var.to(torch.float64) * ratio.to(var.device, torch.float64)).to(var.dtype))


def add_output_offset(module: nn.Module, offset: torch.Tensor, next_bn: nn.Module | None = None, where: str = "auto") -> str:
    """Add a constant ``offset`` to every output channel of ``module``; returns where it went.

    ``where="bias"`` adds it to the layer's bias (creating one if needed);
    ``"bn"`` subtracts it from the running mean of the BatchNorm that reads the
    layer (same outputs, no new parameter); ``"auto"`` uses the bias if the layer
    has one, else that BatchNorm, else a new bias.
    """
    if where not in ("auto", "bias", "bn"):
        raise ValueError(f"where must be 'auto', 'bias' or 'bn', got {where!r}")
    use_bn = next_bn is not None and next_bn.running_mean is not None and (
        where == "bn" or (where == "auto" and module.bias is None)
    )
    if where == "bn" and not use_bn:
        raise ValueError("no BatchNorm with running statistics reads this layer; fold into its bias instead")
    with torch.no_grad():
        if use_bn:
            mean = next_bn.running_mean
            mean.copy_((mean.to(torch.float64) - offset.to(mean.device)).to(mean.dtype))
            return "bn"
        if module.bias is None:
            weight = module.weight
            module.bias = nn.Parameter(
                torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                requires_grad=weight.requires_grad,
            )
        bias = module.bias
        bias.copy_((bias.to(torch.float64) + offset.to(bias.device)).to(bias.dtype))
        return "bias"


def _out_pruner(module):
    if isinstance(module, nn.Linear):
        return tp_function.prune_linear_out_channels
    if isinstance(module, BATCHNORMS):
        return tp_function.prune_batchnorm_out_channels
    if isinstance(module, nn.PReLU):
        return tp_function.prune_prelu_out_channels
    if module.groups == module.in_channels > 1:  # a depthwise stage: its input channels go with its outputs
        return tp_function.prune_depthwise_conv_out_channels
    return tp_function.prune_conv_out_channels


def _in_pruner(module):
    if isinstance(module, nn.Linear):
        return tp_function.prune_linear_in_channels
    if module.groups != 1:
        return grouped.prune_in_channels
    return tp_function.prune_conv_in_channels


def remove_channels(out_channels: dict[nn.Module, set[int]], in_channels: dict[nn.Module, set[int]]) -> None:
    """Physically remove output and input channels, given in the *original* index space.

    Indices for every module are collected first and removed in one call per
    module and dimension, so no index goes stale when a layer is both a
    consumer and a producer, or reads several producers through a concat.
    Torch-Pruning replaces the parameters it cuts; their ``requires_grad``
    flags are carried over, so frozen parameters stay frozen.
    """
    flags = {
        (module, name): p.requires_grad
        for module in {*out_channels, *in_channels}
        for name, p in module.named_parameters(recurse=False)
    }
    for module, idxs in out_channels.items():
        if idxs:
            _out_pruner(module)(module, sorted(idxs))
    for module, idxs in in_channels.items():
        if idxs:
            _in_pruner(module)(module, sorted(idxs))
    for (module, name), flag in flags.items():
        getattr(module, name).requires_grad_(flag)


def apply_solution(group: RestorableGroup, kept, pruned, solution, coverage: dict | None = None,
                   gates: torch.Tensor | None = None) -> None:  # fmt: skip
    """Fold one layer's solution into its consumers: mean offsets, running variances, delivery.

    The corrections read the consumer weights before the delivery edits them. A grouped
    consumer is edited group by group (:func:`lbyl.grouped.consumer_parts`); a consumer
    behind a squeeze-and-excitation gets the solution for the gated channels
    (``gates``: :func:`lbyl.squeeze.group_gates`).
    ``coverage``: tap coverage of padded convolutions (:func:`lbyl.correction.padded_conv_coverage`).
    """
    coverage = coverage or {}
    behind = squeeze.behind_gate(solution, gates, kept, pruned) if gates is not None else solution
    reduce = group.excitation.reduce if group.excitation is not None else None
    for consumer in group.consumers:
        chosen = behind if consumer.gated else solution
        if consumer.module is reduce:  # it reads pooled channel means, not the channels' spread
            chosen = replace(chosen, covariance=None)
        _apply_to_consumer(consumer, kept, pruned, chosen, coverage)


def _apply_to_consumer(consumer: Consumer, kept, pruned, solution, coverage: dict) -> None:
    """:func:`apply_solution` for one consumer, part by part when it is a grouped conv."""
    device = solution.delivery.device
    module, bn = consumer.module, consumer.next_bn
    bias = module.bias
    bias_before = bias.detach().to(torch.float64, copy=True) if bias is not None else None
    rescale = solution.covariance is not None and bn is not None and bn.running_var is not None
    shared = rescale and solution.channel_variances is not None and consumer.positions.numel() < _input_width(module)
    offset = torch.zeros(module.weight.shape[0], dtype=torch.float64, device=device)
    ratio = torch.ones_like(offset)
    parts = [(rows, positions, *_part(solution, kept, pruned, channels))
             for rows, channels, positions in grouped.consumer_parts(module, consumer.positions.to(device))]  # fmt: skip
    for rows, positions, part_kept, part_pruned, part in parts:
        weight = module.weight[rows]
        if solution.mean_shift is not None:
            offset[rows] = consumer_offset(weight, positions, part_pruned, part.mean_shift, coverage.get(module))
        if rescale:
            sums = channel_sums(weight, positions)
            ratio[rows] = variance_ratio(sums, part_kept, part_pruned, part.delivery, part.covariance)
            if shared:  # it reads other layers too: only this producer's share of its variance changes
                share = explained_share(sums, part.covariance, part.channel_variances, bn.running_var[rows])
                ratio[rows] = 1 - share * (1 - ratio[rows])
    if solution.mean_shift is not None:
        add_output_offset(module, offset, bn)
    if rescale:
        scale_running_variance(bn, ratio)
    elif solution.covariance is not None and solution.channel_means is not None and bn is None and len(parts) == 1:
        rescale_without_batchnorm(consumer, kept, pruned, solution, bias_before)
    with torch.no_grad():  # after the corrections, which read the weights before the delivery
        for rows, positions, part_kept, part_pruned, part in parts:
            fold_into_consumer_(module.weight[rows], positions, part_kept, part_pruned, part.delivery)


def _input_width(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _part(solution, kept, pruned, channels):
    """The kept and pruned channels of one consumer part (local indices) and the solution's terms for them."""
    if channels is None:
        return kept, pruned, solution
    in_kept, kept_local = grouped.local(kept, channels)
    in_pruned, pruned_local = grouped.local(pruned, channels)
    covariance = solution.covariance
    part = replace(
        solution,
        delivery=solution.delivery[in_kept][:, in_pruned],
        mean_shift=solution.mean_shift[in_pruned] if solution.mean_shift is not None else None,
        covariance=covariance[channels][:, channels] if covariance is not None else None,
        channel_variances=solution.channel_variances[channels] if solution.channel_variances is not None else None,
    )
    return kept_local, pruned_local, part


def rescale_about_mean(module: nn.Linear, scale: torch.Tensor, mean: torch.Tensor) -> None:
    """``y -> mean + scale (y - mean)`` per output of a Linear layer, folded into its weight and bias."""
    with torch.no_grad():
        weight = module.weight
        weight.copy_((weight.to(torch.float64) * scale[:, None].to(weight.device)).to(weight.dtype))
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                                       requires_grad=weight.requires_grad)  # fmt: skip
        bias = module.bias
        shifted = bias.to(torch.float64) * scale.to(bias.device) + (mean * (1 - scale)).to(bias.device)
        bias.copy_(shifted.to(bias.dtype))


def rescale_without_batchnorm(consumer: Consumer, kept, pruned, solution, bias_before: torch.Tensor | None) -> None:
    """The variance correction of a Linear consumer that no BatchNorm reads.

    A BatchNorm after the consumer would divide by its running standard deviation; the
    correction of section 5d rescales that by the predicted variance ratio ``r``. Without one
    the same is folded into the consumer: each output is scaled by ``1 / sqrt(r)`` about its
    predicted mean ``sum_c V[o, c] E f(z_c) + bias`` (the mean the mean correction restores).
    Only for a Linear consumer that reads nothing but this producer (else its mean is unknown).
    """
    module = consumer.module
    if not isinstance(module, nn.Linear) or consumer.positions.numel() != module.weight.shape[1]:
        return
    sums = channel_sums(module.weight, consumer.positions.to(solution.delivery.device))
    ratio = variance_ratio(sums, kept, pruned, solution.delivery, solution.covariance)
    mean = sums @ solution.channel_means.to(sums.device)
    if bias_before is not None:
        mean = mean + bias_before.to(mean.device)
    scale = torch.where(ratio > 0, ratio.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.ones_like(ratio))
    rescale_about_mean(module, scale, mean)


def removal_indices(pairs) -> tuple[dict, dict]:
    """Output and input channels to remove, per module, for ``(group, pruned indices)`` pairs."""
    out_channels, in_channels = {}, {}
    for group, pruned in pairs:
        pruned = torch.as_tensor(pruned, dtype=torch.long)
        out_channels.setdefault(group.producer, set()).update(pruned.tolist())
        stage = group.stage
        owners = [group.bn, getattr(group.activation, "module", None)]  # an nn.PReLU has one slope per channel
        if stage is not None:
            owners += [stage.module, stage.bn, getattr(stage.activation, "module", None)]
        if group.excitation is not None:  # the gate's expand layer has one output per channel
            owners.append(group.excitation.expand)
        for owner in owners:
            if owner is not None:
                out_channels.setdefault(owner, set()).update(pruned.tolist())
        for consumer in group.consumers:
            in_channels.setdefault(consumer.module, set()).update(consumer.positions[pruned].flatten().tolist())
            if consumer.bn is not None:  # its slice of a BatchNorm after a concatenation
                out_channels.setdefault(consumer.bn, set()).update(consumer.bn_positions[pruned].tolist())
    return out_channels, in_channels
