"""Data-free statistics of a layer without BatchNorm: the mean and covariance of its inputs.

A producer followed by a BatchNorm has recorded statistics; one without has none,
so they are derived from the model alone, from an *anchor* the model fixes:

* ``"white"``: the input of a convolution with a BatchNorm whose kernel is larger than
  1x1 (its patches) is taken as white, the paper's model; the BatchNorm fixes the scale;
* ``"input"``: the network input (through reshapes only) is taken as standardised,
  mean 0 and covariance ``I`` per feature, the usual preprocessing, unless the user
  declares its mean and standard deviation (``input_stats``; features uncorrelated);
* ``"layernorm"``: a LayerNorm before the producer normalises every token to mean 0
  and variance 1 over its ``d`` features before its affine, so its output has mean
  ``beta`` and covariance ``diag(gamma) C diag(gamma)``, ``C = d/(d-1) (I - 11^T/d)``
  (the covariance of a normalised token with exchangeable features);
* ``"activation"``: the input is ``f(z)`` of an upstream pointwise layer (Linear or
  1x1 convolution, optionally with a BatchNorm), whose pre-activation ``z`` has its own
  statistics; ``z`` is modelled as Gaussian and the moments of ``f(z)`` come from
  :mod:`lbyl.activations` (means by quadrature or closed form, the covariance by
  Mehler's series);
* ``"pointwise"``: the BatchNorm output of an upstream pointwise layer (no activation:
  an inverted residual's project conv);
* ``"stage"``: ``f2(BN2(depthwise(f1(BN1(pointwise(...))))))``, the hidden channels of an
  inverted residual after its depthwise convolution (:func:`lbyl.depthwise.depthwise_covariance`);
* ``"add"``: a residual sum, its parts taken as uncorrelated.

With a BatchNorm the marginals are the BatchNorm's (mean ``beta``, variance ``gamma^2``)
and only the correlations are propagated.

A Linear layer maps input moments ``(m, C)`` to ``(W m + b, W C W^T)``. The source of
a producer's input is found on the traced graph (:func:`input_source`); a producer
whose input comes from anything else (a residual add, attention, a convolution)
has no statistics (None) and is treated as before.

A producer *with* a BatchNorm has its output marginals recorded but not the correlations
of its input; for a pointwise producer the propagated input covariance supplies them
(``input_model="propagated"`` of :class:`lbyl.LBYL`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import activations
from .activation_nodes import UnsupportedActivation, is_activation, read_activation
from .activations import Activation
from .delivery import PreactivationMoments
from .depthwise import depthwise_covariance
from .layouts import CONVS, is_depthwise_stage, pointwise

_PASS = ("ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward", "CloneBackward", "AliasBackward")
_PAD = ("ConstantPadNdBackward",)  # spatial zero padding before a depthwise conv ("same" padding)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_MATMUL = ("AddmmBackward", "MmBackward")
#: the longest chain of layers, activations and adds followed back to an anchor
MAX_DEPTH = 64


@dataclass(eq=False)
class InputSource:
    """Where a producer's input comes from (see the module docstring).

    ``kind``: ``"input"``, ``"layernorm"`` (``module``: the LayerNorm), ``"activation"``
    (``module``: the upstream pointwise layer, ``bn``: its BatchNorm or None, ``activation``,
    ``upstream``: the source of that layer's input), ``"pointwise"`` (the same without an
    activation), ``"stage"`` (as ``"activation"``, then ``depthwise``: the depthwise conv, its
    BatchNorm and activation) or ``"add"`` (``parts``). ``features``: the input width.
    The computed moments are cached (:func:`input_moments`).
    """

    kind: str
    features: int
    module: nn.Module | None = None
    bn: nn.Module | None = None
    activation: Activation | None = None
    upstream: "InputSource | None" = None
    depthwise: tuple | None = None  # (conv, BatchNorm, Activation) of a "stage"
    parts: tuple = ()
    cache: tuple | None = field(default=None, repr=False)

    def describe(self) -> str:
        if self.kind == "activation":
            layer = "a Linear layer" if isinstance(self.module, nn.Linear) else "a 1x1 convolution"
            return f"{self.activation} of {layer} <- {self.upstream.describe()}"
        if self.kind in ("pointwise", "stage"):
            return f"{self.kind} <- {self.upstream.describe()}"
        if self.kind == "add":  # the parts share their history: not expanded
            return f"add of {len(self.parts)}"
        return self.kind


def _name(node) -> str:
    grad_fn = node.grad_fn
    return grad_fn.name() if grad_fn is not None and hasattr(grad_fn, "name") else type(node.module).__name__


def _data_inputs(node) -> list:
    """The node's inputs without the branches that only read parameters (a weight's transpose)."""
    return [i for i in node.inputs if i.inputs or isinstance(i.module, nn.Module) and not _is_op(i)]


def _is_op(node) -> bool:
    return type(node.module).__module__.startswith("torch_pruning")


def _below_producer(node):
    """The node that feeds a Linear producer's input, past its own matmul decomposition and reshapes.

    Returns the node, ``"input"`` when only the network input (no node) feeds it, or None.
    """
    inputs = _data_inputs(node)
    first = True
    while True:
        if not inputs:
            return "input"
        if len(inputs) != 1:
            return None
        current = inputs[0]
        name = _name(current)
        if _is_op(current) and (name.startswith(_PASS) or (first and name.startswith(_MATMUL))):
            inputs, first = _data_inputs(current), False
            continue
        return current


def input_source(dg, node, memo: dict | None = None, depth: int = 0) -> InputSource | None:
    """The :class:`InputSource` of a pointwise producer's input on a Torch-Pruning graph, or None.

    ``memo`` (module or node -> source) shares the sources of upstream layers between producers.
    """
    memo = {} if memo is None else memo
    module = node.module
    if module in memo:
        return memo[module]
    memo[module] = None  # a cycle (never in a traced graph) ends here
    below = _below_producer(node)
    memo[module] = None if below is None else _source(dg, below, module.weight.shape[1], memo, depth)
    return memo[module]


def _source(dg, below, features: int, memo: dict, depth: int) -> InputSource | None:
    """The source of ``features`` channels produced by node ``below`` (or ``"input"``)."""
    if below == "input":
        return InputSource("input", features)
    if depth >= MAX_DEPTH:
        return None
    if below in memo:
        return memo[below]
    memo[below] = None
    source = None
    if isinstance(below.module, nn.LayerNorm):
        shape = tuple(below.module.normalized_shape)
        if len(shape) == 1 and shape[0] == features:
            source = InputSource("layernorm", features, below.module)
    elif is_activation(below):
        source = _activation_source(dg, below, features, memo, depth)
    elif isinstance(below.module, _BATCHNORM):
        source = _pointwise_source(dg, below, features, memo, depth)
    elif _name(below).startswith("AddBackward") and _is_op(below):
        parts = [_source(dg, _skip_passes(i), features, memo, depth + 1) for i in _data_inputs(below)]
        if len(parts) >= 2 and all(p is not None for p in parts):
            source = InputSource("add", features, parts=tuple(parts))
    memo[below] = source
    return source


def _skip_passes(node, names=_PASS):
    while node is not None and _is_op(node) and _name(node).startswith(names):
        inputs = _data_inputs(node)
        node = inputs[0] if len(inputs) == 1 else None
    return node


def _layer_below(dg, node, features: int, memo: dict, depth: int):
    """``(layer, bn, source of the layer's input)`` for a node that is a pointwise layer or its
    BatchNorm, or None."""
    bn = None
    if isinstance(node.module, _BATCHNORM):
        bn = node.module
        inputs = _data_inputs(node)
        if len(inputs) != 1 or bn.running_var is None or bn.num_features != features:
            return None
        node = _skip_passes(inputs[0])
    if node is None:
        return None
    if bn is not None and _filtering(node.module, features):  # white input: the paper's model, as an anchor
        return node.module, bn, InputSource("white", node.module.weight[0].numel())
    if not pointwise(node.module, out=features):
        return None
    below = input_source(dg, node, memo, depth + 1)
    return None if below is None else (node.module, bn, below)


def _filtering(module, features: int) -> bool:
    """An ungrouped convolution with a kernel larger than 1x1 and ``features`` outputs."""
    return (isinstance(module, CONVS) and module.groups == 1
            and module.weight[0, 0].numel() > 1 and module.weight.shape[0] == features)  # fmt: skip


def _pointwise_source(dg, node, features: int, memo: dict, depth: int) -> InputSource | None:
    found = _layer_below(dg, node, features, memo, depth)
    return None if found is None else InputSource("pointwise", features, found[0], found[1], upstream=found[2])


def _activation_source(dg, node, features: int, memo: dict, depth: int) -> InputSource | None:
    inputs = _data_inputs(node)
    if len(inputs) != 1:
        return None
    try:
        activation = read_activation(node, features)
    except UnsupportedActivation:
        return None
    if activation.module is not None:  # per-channel PReLU slopes: pruned in place, not modelled here
        return None
    below = _skip_passes(inputs[0])
    found = _layer_below(dg, below, features, memo, depth) if below is not None else None
    if found is not None:
        return InputSource("activation", features, found[0], found[1], activation, found[2])
    return _stage_source(dg, below, features, activation, memo, depth)


def _stage_source(dg, node, features: int, activation: Activation, memo: dict, depth: int) -> InputSource | None:
    """``f2(BN2(depthwise(f1(...))))``: ``node`` is BN2, below it a depthwise conv of ``features`` channels."""
    if node is None or not isinstance(node.module, _BATCHNORM) or node.module.running_var is None:
        return None
    inputs = _data_inputs(node)
    conv = _skip_passes(inputs[0]) if len(inputs) == 1 else None
    module = None if conv is None else conv.module
    if not is_depthwise_stage(module, features):
        return None
    inputs = _data_inputs(conv)
    inner = _skip_passes(inputs[0], _PASS + _PAD) if len(inputs) == 1 else None
    if inner is None or not is_activation(inner):
        return None
    hidden = _activation_source(dg, inner, features, memo, depth + 1)
    if hidden is None or hidden.kind != "activation" or hidden.bn is None:
        return None
    return InputSource("stage", features, hidden.module, hidden.bn, hidden.activation, hidden.upstream,
                       depthwise=(module, node.module, activation))  # fmt: skip


# ---------------------------------------------------------------- moments


def layernorm_moments(layernorm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``beta`` and covariance ``diag(gamma) d/(d-1) (I - 11^T/d) diag(gamma)`` of a LayerNorm's output."""
    d = layernorm.normalized_shape[0]
    gamma = layernorm.weight.detach().to(torch.float64) if layernorm.weight is not None else torch.ones(d, dtype=torch.float64)
    beta = layernorm.bias.detach().to(torch.float64) if layernorm.bias is not None else torch.zeros_like(gamma)
    centred = torch.eye(d, dtype=torch.float64, device=gamma.device) - 1.0 / d
    return beta.clone(), gamma[:, None] * centred * (d / max(d - 1, 1)) * gamma[None, :]


def linear_moments(weight, bias, mean, covariance) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W m + b, W C W^T)``: the moments of a Linear layer's output."""
    weight = weight.detach().to(torch.float64)
    out = weight @ mean.to(weight.device)
    if bias is not None:
        out = out + bias.detach().to(torch.float64)
    return out, weight @ covariance.to(weight.device) @ weight.T


def batchnorm_moments(bn: nn.Module, covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A BatchNorm's output: mean ``beta``, variance ``gamma^2``, the correlations of its input ``covariance``."""
    n = covariance.shape[0]
    gamma = bn.weight.detach().to(torch.float64) if bn.weight is not None else torch.ones(n, dtype=torch.float64)
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros(n, dtype=torch.float64)
    std = covariance.diagonal().clamp_min(0).sqrt()
    scale = torch.where(std > 0, gamma.abs() / torch.where(std > 0, std, 1.0), 0.0)
    return beta.clone(), scale[:, None] * covariance * scale[None, :]


def activation_moments(activation, mean, covariance) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of ``f(z)``, ``z ~ N(mean, covariance)`` (:mod:`lbyl.activations`)."""
    std = covariance.diagonal().clamp_min(0).sqrt()
    return activations.mean(activation, mean, std), activations.hermite_channel_covariance(activation, mean, covariance)


def input_moments(source: InputSource) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (M) and covariance (M x M) of a producer's input under its source; cached on ``source``."""
    if source.cache is None:
        source.cache = _input_moments(source)
    return source.cache


def _input_moments(source: InputSource) -> tuple[torch.Tensor, torch.Tensor]:
    if source.kind in ("input", "white"):
        n = source.features
        return torch.zeros(n, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
    if source.kind == "layernorm":
        return layernorm_moments(source.module)
    if source.kind == "add":
        moments = [input_moments(part) for part in source.parts]
        return sum(m for m, _ in moments), sum(c for _, c in moments)
    weight = source.module.weight.reshape(source.module.weight.shape[0], -1)
    mean, covariance = linear_moments(weight, source.module.bias, *input_moments(source.upstream))
    if source.bn is not None:
        mean, covariance = batchnorm_moments(source.bn, covariance)
    if source.kind == "pointwise":
        return mean, covariance
    mean, covariance = activation_moments(source.activation, mean, covariance)
    if source.kind == "stage":
        conv, bn, activation = source.depthwise
        kernels = conv.weight.detach().to(torch.float64).reshape(conv.weight.shape[0], -1)
        covariance = depthwise_covariance(covariance, kernels, bn.running_var.detach().to(torch.float64))
        mean, covariance = activation_moments(activation, *batchnorm_moments(bn, covariance))
    return mean, covariance


def prepare(sources, input_stats=None, input_shape=None) -> None:
    """Compute (and cache) the input moments of every source now, from the weights as they are.

    ``input_stats``: ``(mean, std)`` tensors of the network input as the user declares them (None:
    standardised), broadcast to ``input_shape`` (one input without its batch dimension).
    """
    sources = [s for s in sources if s is not None]
    if input_stats is not None:
        for source in map(anchor, sources):
            if source.kind == "input" and source.cache is None:
                source.cache = declared_moments(*input_stats, input_shape, source.features)
    for source in sources:
        input_moments(source)


def declared_moments(mean: torch.Tensor, std: torch.Tensor, shape, features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and (diagonal) covariance of the network input from its declared mean and std.

    They broadcast to one input (``shape``); flattened, that is the features of a Linear layer
    reading it; a Linear layer reading the last axis (tokens) gets their average over the others.
    """
    try:
        mean, var = mean.expand(shape).reshape(-1), (std**2).expand(shape).reshape(-1)
    except RuntimeError:
        raise ValueError(
            f"input_stats of shapes {tuple(mean.shape)} and {tuple(std.shape)} do not broadcast to one input "
            f"of shape {tuple(shape)}; pass numbers, or one value per channel shaped like (C, 1, 1)"
        ) from None
    if mean.numel() != features:
        if shape[-1] != features:
            raise ValueError(f"cannot map input_stats onto the {features} input features of the first Linear layer")
        mean, var = mean.reshape(-1, features).mean(dim=0), var.reshape(-1, features).mean(dim=0)
    return mean.clone(), torch.diag(var)


def producer_moments(group, weight: torch.Tensor, bias, dropped_inputs=()) -> PreactivationMoments | None:
    """The data-free moments of a group's pre-activations, or None (a BatchNorm follows, or no source).

    ``weight`` (N x M, float64) may lack the ``dropped_inputs`` columns (sequential order).
    """
    if group.bn is not None:
        return None
    moments = _group_input_moments(group, dropped_inputs, weight.device)
    if moments is None:
        return None
    mean, covariance = moments
    source = group.input_source
    weight = weight.reshape(weight.shape[0], -1)
    if weight.shape[1] != mean.shape[0]:
        return None
    out_mean, out_covariance = linear_moments(weight, bias, mean, covariance)
    return PreactivationMoments(out_mean, out_covariance, source.describe())


def propagated_input_covariance(group, dropped_inputs=()) -> torch.Tensor | None:
    """The input covariance (M x M) of a pointwise producer with a BatchNorm, propagated from the
    model, or None (no source, or a source these statistics do not fit)."""
    if group.bn is None:
        return None
    moments = _group_input_moments(group, dropped_inputs, group.producer.weight.device)
    if moments is None:
        return None
    covariance = moments[1]
    width = group.producer.weight[0].numel() - len(dropped_inputs)
    if covariance.shape[0] != width or not bool(torch.isfinite(covariance).all()):
        return None
    return covariance


def _group_input_moments(group, dropped_inputs, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The moments of a group's input source on ``device``, without the ``dropped_inputs``; None
    without a source or where computing them fails."""
    source = getattr(group, "input_source", None)
    if source is None:
        return None
    try:
        mean, covariance = input_moments(source)
    except Exception:  # statistics improve a restoration; a model they do not fit is restored without them
        return None
    mean, covariance = mean.to(device), covariance.to(device)
    if len(dropped_inputs):
        keep = torch.ones(mean.shape[0], dtype=torch.bool, device=device)
        keep[list(dropped_inputs)] = False
        mean, covariance = mean[keep], covariance[keep][:, keep]
    return mean, covariance


def anchor(source: InputSource | None) -> InputSource | None:
    """The source a chain of activations of upstream Linear layers goes back to."""
    while source is not None and source.kind == "activation":
        source = source.upstream
    return source


def reads_layernorm(source: InputSource | None) -> bool:
    """Whether a source goes back to a LayerNorm (a transformer MLP's hidden layer)."""
    source = anchor(source)
    return source is not None and source.kind == "layernorm"
