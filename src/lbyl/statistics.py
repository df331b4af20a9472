"""Data-free statistics of a layer without BatchNorm: the mean and covariance of its inputs.

A producer followed by a BatchNorm has recorded statistics; one without has none,
so they are derived from the model alone, from an *anchor* the model fixes:

* ``"input"``: the network input (through reshapes only) is taken as standardised,
  mean 0 and covariance ``I`` per feature, the usual preprocessing, unless the user
  declares its mean and standard deviation (``input_stats``; features uncorrelated);
* ``"layernorm"``: a LayerNorm before the producer normalises every token to mean 0
  and variance 1 over its ``d`` features before its affine, so its output has mean
  ``beta`` and covariance ``diag(gamma) C diag(gamma)``, ``C = d/(d-1) (I - 11^T/d)``
  (the covariance of a normalised token with exchangeable features);
* ``"activation"``: the input is ``f(z)`` of an upstream Linear layer (optionally
  with a BatchNorm), whose pre-activation ``z`` has its own statistics; ``z`` is
  modelled as Gaussian and the moments of ``f(z)`` come from
  :mod:`lbyl.activations` (means by quadrature or closed form, the covariance by
  Mehler's series).

A Linear layer maps input moments ``(m, C)`` to ``(W m + b, W C W^T)``. The source of
a producer's input is found on the traced graph (:func:`input_source`); a producer
whose input comes from anything else (a residual add, attention, a convolution)
has no statistics (None) and is treated as before.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import activations
from .activation_nodes import UnsupportedActivation, is_activation, read_activation
from .activations import Activation
from .delivery import PreactivationMoments

LINEAR = (nn.Linear,)
_PASS = ("ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward", "CloneBackward", "AliasBackward")
_MATMUL = ("AddmmBackward", "MmBackward")
#: the longest chain of Linear -> activation layers followed back to an anchor
MAX_DEPTH = 64


@dataclass(eq=False)
class InputSource:
    """Where a producer's input comes from (see the module docstring).

    ``kind``: ``"input"``, ``"layernorm"`` (``module``: the LayerNorm) or ``"activation"``
    (``module``: the upstream Linear layer, ``bn``: its BatchNorm or None, ``activation``,
    ``upstream``: the source of that layer's input). ``features``: the input width.
    The computed moments are cached (:func:`input_moments`).
    """

    kind: str
    features: int
    module: nn.Module | None = None
    bn: nn.Module | None = None
    activation: Activation | None = None
    upstream: "InputSource | None" = None
    cache: tuple | None = field(default=None, repr=False)

    def describe(self) -> str:
        if self.kind == "activation":
            return f"{self.activation} of a Linear layer <- {self.upstream.describe()}"
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
    """The :class:`InputSource` of a Linear producer's input on a Torch-Pruning graph, or None.

    ``memo`` (module -> source) shares the sources of upstream layers between producers.
    """
    memo = {} if memo is None else memo
    module = node.module
    if module in memo:
        return memo[module]
    features = module.weight.shape[1]
    below = _below_producer(node)
    source = None
    if below == "input":
        source = InputSource("input", features)
    elif below is not None and isinstance(below.module, nn.LayerNorm):
        shape = tuple(below.module.normalized_shape)
        if len(shape) == 1 and shape[0] == features:
            source = InputSource("layernorm", features, below.module)
    elif below is not None and is_activation(below) and depth < MAX_DEPTH:
        source = _activation_source(dg, below, features, memo, depth)
    memo[module] = source
    return source


def _activation_source(dg, node, features: int, memo: dict, depth: int) -> InputSource | None:
    inputs = _data_inputs(node)
    if len(inputs) != 1:
        return None
    upstream, bn = inputs[0], None
    if isinstance(upstream.module, nn.BatchNorm1d):
        bn = upstream.module
        inputs = _data_inputs(upstream)
        if len(inputs) != 1 or bn.running_var is None:
            return None
        upstream = inputs[0]
    if type(upstream.module) not in LINEAR or upstream.module.weight.shape[0] != features:
        return None
    try:
        activation = read_activation(node, features)
    except UnsupportedActivation:
        return None
    if activation.module is not None:  # per-channel PReLU slopes: pruned in place, not modelled here
        return None
    below = input_source(dg, upstream, memo, depth + 1)
    if below is None:
        return None
    return InputSource("activation", features, upstream.module, bn, activation, below)


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
    if source.kind == "input":
        n = source.features
        return torch.zeros(n, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
    if source.kind == "layernorm":
        return layernorm_moments(source.module)
    mean, covariance = linear_moments(source.module.weight, source.module.bias, *input_moments(source.upstream))
    if source.bn is not None:
        mean, covariance = batchnorm_moments(source.bn, covariance)
    return activation_moments(source.activation, mean, covariance)


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
    source = getattr(group, "input_source", None)
    if group.bn is not None or source is None:
        return None
    try:
        mean, covariance = input_moments(source)
    except Exception:  # statistics improve a restoration; a model they do not fit is restored without them
        return None
    mean, covariance = mean.to(weight.device), covariance.to(weight.device)
    if len(dropped_inputs):
        keep = torch.ones(mean.shape[0], dtype=torch.bool, device=weight.device)
        keep[list(dropped_inputs)] = False
        mean, covariance = mean[keep], covariance[keep][:, keep]
    weight = weight.reshape(weight.shape[0], -1)
    if weight.shape[1] != mean.shape[0]:
        return None
    out_mean, out_covariance = linear_moments(weight, bias, mean, covariance)
    return PreactivationMoments(out_mean, out_covariance, source.describe())


def anchor(source: InputSource | None) -> InputSource | None:
    """The source a chain of activations of upstream Linear layers goes back to."""
    while source is not None and source.kind == "activation":
        source = source.upstream
    return source


def reads_layernorm(source: InputSource | None) -> bool:
    """Whether a source goes back to a LayerNorm (a transformer MLP's hidden layer)."""
    source = anchor(source)
    return source is not None and source.kind == "layernorm"
