"""Read an element-wise activation and its parameters from a traced autograd node.

A module and its functional form record the same autograd node (``nn.ReLU6``
and ``F.relu6`` both give ``HardtanhBackward0``), and that node keeps the
activation's scalar parameters as saved attributes (``_saved_min_val``,
``_saved_negative_slope``, ``_saved_approximate``...), readable even though
the trace drops the saved tensors. A PReLU's weight is a tensor: it is read
from the ``nn.PReLU`` module Torch-Pruning attaches to the node, or, for
``F.prelu``, from the parameter behind the node's weight input.
"""
from __future__ import annotations

import math

import torch.nn as nn

from .activations import Activation

#: autograd nodes of operations that mix channels although they are often called activations
NOT_ELEMENTWISE = ("SoftmaxBackward", "LogSoftmaxBackward")


class UnsupportedActivation(Exception):
    """An element-wise activation lbyl recognises but cannot model (the reason is the message)."""


def _saved(grad_fn, name: str, default=None):
    try:
        value = getattr(grad_fn, f"_saved_{name}")
    except (AttributeError, RuntimeError, TypeError):  # a dropped saved tensor cannot be unpacked
        return default
    return default if value is None else value


def _threshold(grad_fn, channels) -> Activation:
    threshold = float(_saved(grad_fn, "threshold", 0.0))
    if threshold != 0:  # the replacement value is not recorded on the node
        raise UnsupportedActivation(f"threshold at {threshold:g}: its replacement value is not recorded")
    return Activation("relu")


def _clamp_bound(grad_fn, name: str):
    try:
        value = getattr(grad_fn, f"_saved_{name}")
    except AttributeError:  # clamp_min has no max, clamp_max no min
        return None
    except (RuntimeError, TypeError):  # a tensor bound: dropped by the trace, unknown
        raise UnsupportedActivation("a clamp with tensor bounds") from None
    if value is not None and not isinstance(value, int | float):
        raise UnsupportedActivation("a clamp with tensor bounds")
    return value


def _clamp(grad_fn, channels) -> Activation:
    lower, upper = _clamp_bound(grad_fn, "min"), _clamp_bound(grad_fn, "max")
    return Activation("hardtanh", -math.inf if lower is None else lower, math.inf if upper is None else upper)


def _rrelu(grad_fn, channels) -> Activation:
    if _saved(grad_fn, "training", True):
        raise UnsupportedActivation("RReLU in training mode draws a random slope per element")
    return Activation("leaky_relu", slope=((_saved(grad_fn, "lower") + _saved(grad_fn, "upper")) / 2,))


def _elu(grad_fn, channels) -> Activation:
    return Activation("elu", alpha=_saved(grad_fn, "alpha", 1.0), scale=_saved(grad_fn, "scale", 1.0),
                      input_scale=_saved(grad_fn, "input_scale", 1.0))  # fmt: skip


def _celu(grad_fn, channels) -> Activation:
    alpha = float(_saved(grad_fn, "alpha", 1.0))
    return Activation("elu", alpha=alpha, input_scale=1 / alpha)


def _functional_prelu_weight(grad_fn):
    """The parameter behind ``F.prelu``'s weight input (through views), or None."""
    stack = [f for f, _ in grad_fn.next_functions[1:] if f is not None]
    while stack:
        function = stack.pop()
        if hasattr(function, "variable"):
            return function.variable
        stack.extend(f for f, _ in function.next_functions if f is not None)
    return None


def _prelu_from(module, grad_fn, channels) -> Activation:
    owner = module if isinstance(module, nn.PReLU) else None
    weight = owner.weight if owner is not None else _functional_prelu_weight(grad_fn)
    if weight is None:
        raise UnsupportedActivation("cannot read the weight of a functional prelu")
    slope = tuple(weight.detach().double().cpu().flatten().tolist())
    if len(slope) > 1 and owner is None:
        raise UnsupportedActivation(
            "F.prelu with one slope per channel: lbyl prunes a per-channel weight only in nn.PReLU"
        )
    if len(slope) not in (1, channels):
        raise UnsupportedActivation(f"PReLU with {len(slope)} slopes for {channels} channels")
    return Activation("prelu", slope=slope, module=owner if len(slope) > 1 else None)


_READERS = {
    "ReluBackward": lambda g, c: Activation("relu"),
    "ThresholdBackward": _threshold,
    "HardtanhBackward": lambda g, c: Activation("hardtanh", _saved(g, "min_val"), _saved(g, "max_val")),
    "ClampBackward": _clamp,
    "ClampMinBackward": _clamp,
    "ClampMaxBackward": _clamp,
    "LeakyReluBackward": lambda g, c: Activation("leaky_relu", slope=(_saved(g, "negative_slope", 0.01),)),
    "RreluWithNoiseBackward": _rrelu,
    "SiluBackward": lambda g, c: Activation("silu"),
    "HardswishBackward": lambda g, c: Activation("hardswish"),
    "HardsigmoidBackward": lambda g, c: Activation("hardsigmoid"),
    "GeluBackward": lambda g, c: Activation("gelu", approximate=_saved(g, "approximate", "none")),
    "SigmoidBackward": lambda g, c: Activation("sigmoid"),
    "TanhBackward": lambda g, c: Activation("tanh"),
    "EluBackward": _elu,
    "CeluBackward": _celu,
    "SoftplusBackward": lambda g, c: Activation("softplus", beta=_saved(g, "beta", 1.0),
                                                threshold=_saved(g, "threshold", 20.0)),  # fmt: skip
    "MishBackward": lambda g, c: Activation("mish"),
    "LogSigmoidBackward": lambda g, c: Activation("logsigmoid"),
}
#: autograd node names (prefixes) of the element-wise activations lbyl models
ACTIVATION_NODES = (*_READERS, "PreluKernelBackward", "PreluBackward")


def _node_name(node) -> str:
    grad_fn = node.grad_fn
    return grad_fn.name() if grad_fn is not None and hasattr(grad_fn, "name") else type(node.module).__name__


def is_activation(node) -> bool:
    """True for the node of an element-wise activation, module or functional call."""
    return isinstance(node.module, nn.PReLU) or _node_name(node).startswith(ACTIVATION_NODES)


def read_activation(node, channels: int) -> Activation:
    """The :class:`Activation` of an activation node; ``channels``: the producer's output channels.

    Raises :class:`UnsupportedActivation` where the node cannot be modelled.
    """
    name = _node_name(node)
    if isinstance(node.module, nn.PReLU) or name.startswith(("PreluKernelBackward", "PreluBackward")):
        return _prelu_from(node.module, node.grad_fn, channels)
    reader = next(r for prefix, r in _READERS.items() if name.startswith(prefix))
    try:
        return reader(node.grad_fn, channels)
    except (TypeError, ValueError) as error:  # a parameter the node does not record as expected
        raise UnsupportedActivation(f"cannot read the parameters of {name}: {error}") from None
