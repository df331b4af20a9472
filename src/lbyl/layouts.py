"""Conv/Linear subclasses: restored when a probe shows that they use their weight as the base layer does.

A subclass may pad in its own ``forward`` (TensorFlow's "same" padding in EfficientNet ports)
or only rename its class (``nn.MultiheadAttention``'s ``NonDynamicallyQuantizableLinear``):
its weight is a plain layer's weight, and channels can be removed and delivered as usual.
Another may reparametrise the weight in ``forward`` (a standardised or normalised weight):
editing it would not do what restoration means. Without reading its code, a probe on one
random input decides, on a copy of the layer: the output must be affine in the weight, output
channel ``j`` must depend on row ``j`` of the weight alone, and input channel ``i`` must reach
the output through column ``i`` alone (within its group).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .counting import as_tuple, eval_mode, shape_only_forward

#: layer types whose output channels lbyl prunes and whose input channels it edits
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def pointwise(module, out: int | None = None, into: int | None = None) -> bool:
    """A Linear layer or an ungrouped convolution with a 1x1 kernel, of the given width."""
    if not isinstance(module, WEIGHTED) or getattr(module, "groups", 1) != 1 or module.weight[0, 0].numel() != 1:
        return False
    return (out is None or module.weight.shape[0] == out) and (into is None or module.weight.shape[1] == into)


def is_depthwise_stage(module, channels: int) -> bool:
    """A depthwise conv that maps each of the producer's channels to one channel of its own."""
    return isinstance(module, CONVS) and module.groups == module.in_channels == module.out_channels == channels


def subclass_refusals(model: nn.Module, example_inputs, shapes: dict | None = None) -> dict[nn.Module, str]:
    """``{layer: reason}`` for the Conv/Linear subclasses of ``model`` that fail the probe.

    ``shapes``: ``{layer: input shape}`` of a forward pass already made; without it (or where it
    lacks a subclass) one forward pass measures them, only when the model has such a subclass.
    """
    subclasses = [m for m in model.modules() if isinstance(m, WEIGHTED) and type(m) not in WEIGHTED]
    shapes = dict(shapes or {})
    if all(m in shapes for m in subclasses):
        return _refusals(subclasses, shapes)

    def record(module, args):  # returns None: the arguments pass unchanged
        shapes.setdefault(module, tuple(args[0].shape))

    hooks = [m.register_forward_pre_hook(record) for m in subclasses]
    try:
        with eval_mode(model):
            shape_only_forward(model, as_tuple(example_inputs))
    finally:
        for hook in hooks:
            hook.remove()
    return _refusals(subclasses, shapes)


def _refusals(subclasses, shapes: dict) -> dict[nn.Module, str]:
    found = {m: probe(m, shapes[m]) for m in subclasses if m in shapes}  # a layer not called is skipped later
    return {m: why for m, why in found.items() if why is not None}


def probe(module: nn.Module, input_shape: tuple) -> str | None:
    """None when ``module`` (a Conv/Linear subclass) uses its weight as its base class does, else why not."""
    base = next(b for b in WEIGHTED if isinstance(module, b)).__name__
    refused = f"{type(module).__name__} does not use its weight as a plain {base} does"
    if not isinstance(module._parameters.get("weight"), nn.Parameter):
        return f"{type(module).__name__} computes its weight in forward (a parametrisation): not a plain {base}"
    try:
        return None if _behaves_plainly(module, input_shape) else refused
    except Exception as error:  # a layer the probe cannot run is not understood: skipped, never a crash
        return f"{refused} (the probe failed: {type(error).__name__})"


def _behaves_plainly(module: nn.Module, input_shape: tuple) -> bool:
    layer = copy.deepcopy(module).to(torch.float64).eval()
    for part in layer.modules():  # the copy keeps the caller's hooks (a MAC counter, say): not for the probe
        part._forward_hooks.clear()
        part._forward_pre_hooks.clear()
    linear = isinstance(layer, nn.Linear)
    axis = -1 if linear else 1
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((1, *input_shape[1:]), generator=generator, dtype=torch.float64)
    weight = layer.weight.detach().clone()
    out_channels, width = weight.shape[0], weight.shape[1]
    groups = getattr(layer, "groups", 1)

    def run(w, inputs=x):
        with torch.no_grad():
            layer.weight.copy_(w)
            return layer(inputs)

    y, y2, y0 = run(weight), run(2 * weight), run(torch.zeros_like(weight))
    scale = float(y.abs().max()) + float(y2.abs().max()) + 1e-12

    def close(a, b):
        return a.shape == b.shape and float((a - b).abs().max()) <= 1e-9 * scale

    if not close(y2 - y, y - y0):  # affine in the weight
        return False
    rows = torch.arange(out_channels) % 2 == 0
    w = weight.clone()
    w[rows] = 0
    expected = torch.where(_along(rows, y.dim(), axis), y0, y)
    if not close(run(w), expected):  # output j reads row j only
        return False
    in_channels = width * groups
    columns = torch.arange(in_channels) % 3 == 1
    w = weight.clone()
    per_group = out_channels // groups
    for i in torch.nonzero(columns).flatten().tolist():
        g = i // width
        w[g * per_group:(g + 1) * per_group, i % width] = 0
    masked = x * ~_along(columns, x.dim(), axis)
    return close(run(weight, masked), run(w))  # input i reaches the output through column i only


def _along(mask: torch.Tensor, dims: int, axis: int) -> torch.Tensor:
    """``mask`` shaped to broadcast along ``axis`` of a ``dims``-dimensional tensor."""
    shape = [1] * dims
    shape[axis] = len(mask)
    return mask.reshape(shape)
