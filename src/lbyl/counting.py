"""Parameter and MAC counts without copying the model.

The numbers are those of ``torch_pruning.utils.count_ops_and_params`` (the
flops-counter conventions: a convolution costs ``prod(kernel) * in/groups * out``
per output position plus one per output element for its bias, a Linear layer
``prod(input shape) * out`` plus ``out`` for its bias, BatchNorm two per input
element when affine, activations one per output element, pooling one per input
element; MACs are per sample of the batch). Torch-Pruning deep-copies the model
and runs a forward pass on every call; here the counting hooks ride along a
forward pass that runs anyway (the dependency trace of :func:`lbyl.restore`)
and record enough to recount the model once channels are removed
(:meth:`MacTally.macs_after`, no forward pass); :func:`count_macs` counts any
model with one no-grad forward pass and no copy.

Module types that the reference counter knows but this module does not (RNNs,
attention) make :func:`count_ops_and_params` fall back to Torch-Pruning.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.utils import op_counter as _tp_counter

__all__ = [
    "MacTally", "count_macs", "count_ops_and_params", "count_params", "counting", "eval_mode", "recount",
    "shape_only_forward", "supported",
]


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape)


def _conv(module, inputs, output) -> int:
    return _conv_macs(module, int(inputs[0].shape[0]), output.shape[2:])


def _conv_macs(module, batch: int, out_size) -> int:
    positions = batch * _numel(out_size)
    per_position = _numel(module.kernel_size) * module.in_channels * (module.out_channels // module.groups)
    bias = module.out_channels * positions if module.bias is not None else 0
    return per_position * positions + bias


def _linear(module, inputs, output) -> int:
    out = int(output.shape[-1])
    return _numel(inputs[0].shape) * out + (out if module.bias is not None else 0)


def _norm(module, inputs, output) -> int:
    return _numel(inputs[0].shape) * (2 if module.affine else 1)


def _layer_norm(module, inputs, output) -> int:
    return _numel(inputs[0].shape) * (2 if module.elementwise_affine else 1)


def _per_output(module, inputs, output) -> int:
    return _numel(output.shape)


def _per_input(module, inputs, output) -> int:
    return _numel(inputs[0].shape)


def _upsample(module, inputs, output) -> int:
    return _numel(output[0].shape)  # the reference counts one sample's output elements


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_ACTIVATIONS = (nn.ReLU, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6, nn.GELU)
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
_NORMS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm,
)
_PRODUCERS = (*_CONVS, nn.Linear)  # calls whose output channels are a layer's own
_RESHAPED = (*_PRODUCERS, *_NORMS)  # calls recounted from their layer's current shape

#: MACs of one call, by module type; a subclass counts as its nearest listed base (a conv that
#: pads in its own forward has a conv's MACs), where the reference skips it
FORMULAS: dict[type, Callable] = {
    **{t: _conv for t in _CONVS},
    **{t: _per_output for t in _ACTIVATIONS},
    **{t: _per_input for t in _POOLS},
    **{t: _norm for t in _NORMS},
    nn.LayerNorm: _layer_norm,
    nn.Linear: _linear,
    nn.Upsample: _upsample,
}


def supported(model: nn.Module) -> bool:
    """True when every module type the reference counter knows has a formula here."""
    known = set(_tp_counter.MODULES_MAPPING) | set(_tp_counter.CUSTOM_MODULES_MAPPING)
    return all(type(m) in FORMULAS or type(m) not in known for m in model.modules())


def formula(module: nn.Module) -> Callable | None:
    """The MAC formula of ``module``'s type or of its nearest base type that has one."""
    return next((FORMULAS[t] for t in type(module).__mro__ if t in FORMULAS), None)


def _counted_modules(module: nn.Module, multiplicity: dict[nn.Module, int]) -> None:
    """Modules whose calls add to the total: counted types, not inside another counted module.

    A module registered under several parents counts once per registration, as in the reference.
    """
    if formula(module) is not None:
        multiplicity[module] = multiplicity.get(module, 0) + 1
        return
    for child in module.children():
        _counted_modules(child, multiplicity)


class _Unresolved(Exception):
    pass


#: autograd nodes whose output has the channels of their (first) input, scaled alike
_PASSTHROUGH = (
    "Relu", "Threshold", "Hardtanh", "LeakyRelu", "Elu", "Gelu", "Silu", "Sigmoid", "Tanh", "Hardswish",
    "Hardsigmoid", "Mish", "Softplus", "MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool",
    "NativeBatchNorm", "CudnnBatchNorm", "BatchNorm", "Add", "Sub", "Mul", "Div", "Neg", "Clone", "Alias",
    "View", "UnsafeView", "Reshape", "Upsample", "ConstantPadNd", "ReflectionPad", "ReplicationPad",
    "Squeeze", "Unsqueeze", "Contiguous", "ToCopy",
)


class _Call:
    """One counted module call: its MACs and how to recount them once channels are removed."""

    __slots__ = ("module", "macs", "in_shape", "out_size", "sources", "input_node")

    def __init__(self, module, macs, in_shape, out_size, input_node):
        self.module, self.macs, self.in_shape, self.out_size = module, macs, in_shape, out_size
        self.input_node, self.sources = input_node, frozenset()


class MacTally:
    """MACs accumulated by the forward passes seen while :func:`counting` was active."""

    def __init__(self) -> None:
        self.total = 0
        self.batch = 0
        self.passes = 0  # forward calls of the model itself, finished or not
        self.complete = False  # set when the model had only supported types
        self.calls: list[_Call] | None = None  # kept by counting(record=True)
        self._producers: dict = {}  # autograd node of a Conv/Linear output -> (module, channels)
        self._multiplicity: dict = {}

    @property
    def macs(self) -> float:
        """MACs per sample (the reference divides by the batch size)."""
        if not self.batch:
            raise RuntimeError("no forward pass was counted")
        return self.total / self.batch

    def resolve(self) -> bool:
        """Find, for every recorded call, the Conv/Linear whose channels its input carries.

        Run while the autograd graph of the recorded pass is alive; drops every
        reference to it. Returns False (and :meth:`macs_after` is unavailable)
        when some input comes through an operation that mixes or regroups
        channels in a way this module does not follow (concatenation, transpose, ...).
        """
        calls, producers, self._producers = self.calls, self._producers, {}
        if calls is None:
            return False
        memo: dict = {}
        try:
            for call in calls:
                node, call.input_node = call.input_node, None
                if not isinstance(call.module, _RESHAPED):
                    call.sources = _sources(node, producers, memo)
        except _Unresolved:
            self.calls = None
            for call in calls:
                call.input_node = None
            return False
        return True

    def macs_after(self) -> float:
        """MACs per sample of the same model after channels were removed, without running it.

        Convolutions and Linear layers are recounted from their current shapes,
        normalisation layers from their current channel count, and every other
        counted call (activations, pooling) scaled by the fraction of channels its
        source Conv/Linear layer kept. Needs :meth:`resolve`.
        """
        if self.calls is None:
            raise RuntimeError("no resolved recording; count with count_ops_and_params instead")
        total = 0
        for call in self.calls:
            total += _recount(call) * self._multiplicity[call.module]
        return total / self.batch


def _sources(node, producers, memo) -> frozenset:
    """The Conv/Linear outputs ``(module, channels when recorded)`` whose channels ``node``'s tensor carries.

    Empty for the model input or a parameter. Follows element-wise operations,
    pooling, normalisation and reshapes (a residual add carries both branches);
    raises ``_Unresolved`` on anything else (concatenation, transpose, ...).
    """
    if node is None:
        return frozenset()
    if node in producers:
        return frozenset([producers[node]])
    if node in memo:
        return memo[node]
    name = node.name()
    if name.endswith("AccumulateGrad"):  # a parameter
        return frozenset()
    if not name.startswith(_PASSTHROUGH):
        raise _Unresolved(name)
    found = frozenset().union(*(_sources(n, producers, memo) for n, _ in node.next_functions))
    memo[node] = found
    return found


def _out_channels(module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _norm_channels(module) -> int:
    return module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features


def _recount(call: _Call) -> int:
    module, shape = call.module, call.in_shape
    if isinstance(module, _CONVS):  # the batch and output size stay; the layer's shape is read now
        return _conv_macs(module, shape[0], call.out_size)
    if isinstance(module, nn.Linear):
        rows = _numel(shape) // shape[-1]
        return rows * module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)
    if isinstance(module, _NORMS):
        return _numel(shape) // shape[1] * _norm_channels(module) * (2 if module.affine else 1)
    if not call.sources:
        return call.macs
    kept = {_reduced(_out_channels(m), channels) for m, channels in call.sources}
    if len(kept) != 1:
        raise RuntimeError(f"the input of a {type(module).__name__} joins layers pruned to different fractions")
    numerator, denominator = kept.pop()
    scaled, remainder = divmod(call.macs * numerator, denominator)
    if remainder:
        raise RuntimeError(f"channel scaling of a {type(module).__name__} is not exact")
    return scaled


def _reduced(numerator: int, denominator: int) -> tuple[int, int]:
    """The fraction ``numerator / denominator`` in lowest terms (integers; ``Fraction`` is slow here)."""
    divisor = math.gcd(numerator, denominator)
    return numerator // divisor, denominator // divisor


@contextlib.contextmanager
def counting(model: nn.Module, record: bool = False) -> Iterator[MacTally]:
    """Count the MACs of every forward pass of ``model`` inside the ``with`` block.

    Hooks only read shapes, so they cost nothing measurable; ``tally.complete`` is
    False when the model has a module type without a formula here (then use
    :func:`count_ops_and_params`, which falls back to the reference). With
    ``record=True`` (and autograd recording the pass) the calls are kept, so that
    after :meth:`MacTally.resolve` the model can be recounted once channels are
    removed (:meth:`MacTally.macs_after`) without another forward pass.
    """
    tally = MacTally()
    tally.complete = supported(model)
    multiplicity: dict[nn.Module, int] = {}
    _counted_modules(model, multiplicity)
    tally._multiplicity = multiplicity
    if record:
        tally.calls = []
    pending: dict[nn.Module, list] = {}

    def before(module, inputs):
        first = inputs[0] if inputs else None
        node = first.grad_fn if isinstance(first, torch.Tensor) else None
        shape = tuple(first.shape) if isinstance(first, torch.Tensor) else None
        pending.setdefault(module, []).append((node, shape))

    def count(module, inputs, output):
        macs = formula(module)(module, inputs, output)
        tally.total += macs * multiplicity[module]
        if tally.calls is not None:
            node, shape = pending[module].pop()
            if shape is None or not isinstance(output, torch.Tensor):
                tally.calls = None  # cannot follow this call: recount by running the model
                return
            tally.calls.append(_Call(module, macs, shape, tuple(output.shape[2:]), node))
            if isinstance(module, _PRODUCERS) and output.grad_fn is not None:
                channels = output.shape[-1] if isinstance(module, nn.Linear) else output.shape[1]
                tally._producers[output.grad_fn] = (module, int(channels))

    def batch(module, inputs, output):
        tally.batch += len(inputs[0]) if inputs else 1

    def started(module, inputs):
        tally.passes += 1

    handles = [model.register_forward_pre_hook(started), model.register_forward_hook(batch)]
    if record:
        handles += [m.register_forward_pre_hook(before) for m in multiplicity]
    handles += [m.register_forward_hook(count) for m in multiplicity]
    try:
        yield tally
    finally:
        for handle in handles:
            handle.remove()


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters once)."""
    return sum(p.numel() for p in model.parameters())


def as_tuple(example_inputs) -> tuple:
    """Example inputs as the tuple that ``model(*inputs)`` takes (one tensor becomes a 1-tuple)."""
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def shape_only_forward(model: nn.Module, inputs: tuple) -> None:
    """One forward pass that only its hooks care about: the first sample of each input, no autograd.

    Hooks see the shapes of the full inputs except the batch size. (The meta
    device would skip the arithmetic, but its first use imports some 800 modules,
    seconds and ~70 MB, more than a one-sample pass costs on a CPU.)
    """
    sample = tuple(x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in inputs)
    with torch.no_grad():
        model(*sample)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside the ``with`` block; the model's own train/eval flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def count_macs(model: nn.Module, example_inputs) -> float:
    """MACs per sample of ``model`` on ``example_inputs``: one forward pass (eval mode, no autograd)."""
    inputs = as_tuple(example_inputs)
    with eval_mode(model), torch.no_grad(), counting(model) as tally:
        model(*inputs)
    return tally.macs


def count_ops_and_params(model: nn.Module, example_inputs) -> tuple[float, int]:
    """``(MACs, parameters)`` equal to ``torch_pruning.utils.count_ops_and_params``, without its deep copy."""
    if not supported(model):
        return tp.utils.count_ops_and_params(model, example_inputs)
    return count_macs(model, example_inputs), count_params(model)


def recount(tally: MacTally, model: nn.Module, example_inputs) -> tuple[float, int]:
    """``(MACs, parameters)`` of ``model`` after channels were removed.

    From the tally of its traced pass when every counted call could be followed
    (:meth:`MacTally.macs_after`: no forward pass); otherwise by
    :func:`count_ops_and_params`.
    """
    if tally.complete and tally.calls is not None:
        try:
            return tally.macs_after(), count_params(model)
        except RuntimeError:
            pass
    return count_ops_and_params(model, example_inputs)
