"""Graph layer: find producer -> BN -> activation -> consumer groups in any model.

Torch-Pruning's dependency graph traces the model; this module reads it to
decide, per Conv/Linear producer, whether its output channels can be pruned
and restored in isolation (a *restorable group*) or not (a *skipped layer*,
with the reason). No architecture is special-cased: the paper's protocol
(ResNet basic block conv1, bottleneck conv1/conv2, every VGG conv, MLP hidden
layers) follows from the rule alone.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops

#: layer types whose output channels lbyl prunes and whose input channels it edits
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# autograd node names (prefixes) of operations a group may pass through
_RELU = ("ReluBackward", "ThresholdBackward")
_CHANNELWISE = ("MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool", "CloneBackward", "AliasBackward")
_ARITHMETIC = ("AddBackward", "SubBackward", "MulBackward", "DivBackward")
_ACTIVATIONS = (
    "Sigmoid", "Tanh", "Hardtanh", "LeakyRelu", "Elu", "Gelu", "Silu", "Hardswish",
    "Hardsigmoid", "Softplus", "Mish", "Prelu", "Softmax", "LogSoftmax", "Celu", "Selu", "Rrelu",
)


@dataclass
class Consumer:
    """A layer reading the producer's channels.

    ``positions[c]`` lists the input indices (dim 1 of the weight) that carry
    channel ``c``: one per channel for a conv, ``H*W`` after a flatten into a
    Linear, shifted by an offset after a concat.
    """

    name: str
    module: nn.Module
    positions: torch.Tensor  # (channels, slots) long
    next_bn: nn.Module | None = None  # a BatchNorm that alone reads this consumer's output


@dataclass
class RestorableGroup:
    """A producer whose pruned channels can be delivered to its kept ones."""

    name: str
    producer: nn.Module
    bn_name: str | None
    bn: nn.Module | None
    activation: str  # "relu" or "identity"
    consumers: list[Consumer]
    path: list[str] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return self.producer.weight.shape[0]


@dataclass
class SkippedLayer:
    name: str
    reason: str


class _Unsupported(Exception):
    pass


def _discard(_):
    return None


@contextlib.contextmanager
def _traceable(model: nn.Module):
    """Eval mode and gradients on while tracing (a frozen model traces to an empty graph).

    The trace only reads the autograd graph's structure and never runs backward, so the
    activations autograd would save for it are dropped at once (the graph keeps no copy
    of them, and tracing needs the memory of an inference pass, not of a training one).
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(True)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_discard, _discard):
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def build_dependency_graph(model: nn.Module, example_inputs) -> tp.DependencyGraph:
    """Trace ``model`` on ``example_inputs`` (eval mode; the caller's mode and flags are restored)."""
    with _traceable(model):
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)


def release_trace(dg: tp.DependencyGraph) -> None:
    """Drop the autograd graph a trace recorded; ``dg`` can no longer be walked afterwards.

    The graph references every traced parameter, so while it lives a weight that
    surgery replaces stays in memory, and the graph's node cycles are freed only
    by a later garbage collection.
    """
    for node in dg.module2node.values():
        node.grad_fn = None


def _op_name(node) -> str:
    grad_fn = node.grad_fn
    return grad_fn.name() if grad_fn is not None and hasattr(grad_fn, "name") else type(node.module).__name__


def _classify(node) -> str:
    """Kind of one node on the way from producer to consumers."""
    module = node.module
    if isinstance(module, WEIGHTED):
        return "consumer"
    if isinstance(module, BATCHNORMS):
        return "bn"
    if node.type == ops.OPTYPE.RESHAPE:
        return "reshape"
    if node.type == ops.OPTYPE.CONCAT:
        dim = getattr(node.grad_fn, "_saved_dim", 1)
        if dim != 1:
            raise _Unsupported(f"concatenation along dim {dim}, not channels")
        return "concat"
    if node.type == ops.OPTYPE.OUTPUT:
        raise _Unsupported("its channels reach the model output")
    if node.type in (ops.OPTYPE.SPLIT, ops.OPTYPE.SLICE, ops.OPTYPE.UNBIND, ops.OPTYPE.EXPAND):
        raise _Unsupported(f"channels are split or sliced ({_op_name(node)})")
    if node.type != ops.OPTYPE.ELEMENTWISE:
        raise _Unsupported(f"feeds {type(module).__name__} {node.name.split(' ')[0]}")
    name = _op_name(node)
    if name.startswith(_RELU):
        return "relu"
    if name.startswith(_CHANNELWISE):
        return "channelwise"
    if name.startswith("MeanBackward"):
        dims = getattr(node.grad_fn, "_saved_dim", ())
        if 1 in tuple(dims) or -3 in tuple(dims):
            raise _Unsupported("a mean over the channel axis")
        return "channelwise"
    if name.startswith(_ARITHMETIC):
        raise _Unsupported(f"joins a residual add or element-wise arithmetic ({name})")
    if any(name.startswith(a) for a in _ACTIVATIONS):
        raise _Unsupported(f"activation {name.replace('Backward0', '').replace('Backward1', '')} is not ReLU")
    raise _Unsupported(f"unsupported operation {name}")


def _walk(dg, start, names):
    """Follow every path from the producer to its consumers; validate the op order.

    Returns (consumer modules, bn module or None, activation, path description).
    """
    consumers, bns, activations, path = {}, set(), set(), []

    def visit(node, bn_seen, relu_seen, reshaped):
        if not node.outputs:
            raise _Unsupported("its channels are a model output")
        for nxt in node.outputs:
            kind = _classify(nxt)
            label = names.get(nxt.module, _op_name(nxt))
            if kind == "consumer":
                if isinstance(nxt.module, nn.Conv2d | nn.Conv1d | nn.Conv3d):
                    if nxt.module.groups != 1:
                        raise _Unsupported(f"feeds the grouped or depthwise convolution {label}")
                    if reshaped:
                        raise _Unsupported(f"reshaped before the convolution {label}")
                consumers[nxt.module] = label
                activations.add("relu" if relu_seen else "identity")
                bns.add(bn_seen)
                continue
            if kind == "bn":
                if relu_seen:
                    raise _Unsupported(f"BatchNorm {label} comes after the activation")
                if bn_seen is not None:
                    raise _Unsupported("two BatchNorms in a row")
                if nxt.module.running_mean is None or nxt.module.running_var is None:
                    raise _Unsupported(
                        f"BatchNorm {label} keeps no running statistics (track_running_stats=False), "
                        "so it normalises with the statistics of each batch"
                    )
                path.append(label)
                visit(nxt, nxt.module, relu_seen, reshaped)
            else:
                if label not in path:
                    path.append(label)
                visit(nxt, bn_seen, relu_seen or kind == "relu", reshaped or kind == "reshape")

    visit(start, None, False, False)
    if not consumers:
        raise _Unsupported("no Conv/Linear layer reads its channels")
    if len(consumers) > 1:
        for node in (dg.module2node[m] for m in consumers):
            if _feeds_add(node):
                raise _Unsupported(
                    f"it is the input of a residual block: {consumers[node.module]} is the block's "
                    "projection shortcut (the residual stream stays whole)"
                )
    if len(bns) > 1:
        raise _Unsupported("BatchNorm on some paths to the consumers but not on others")
    if len(activations) > 1:
        raise _Unsupported("ReLU on some paths to the consumers but not on others")
    return consumers, bns.pop(), activations.pop(), path


def _next_bn(node):
    outputs = node.outputs
    if len(outputs) == 1 and isinstance(outputs[0].module, BATCHNORMS):
        return outputs[0].module
    return None


def _feeds_add(node) -> bool:
    """True when a layer's output goes (through at most a BatchNorm) straight into an add."""
    for nxt in node.outputs:
        if isinstance(nxt.module, BATCHNORMS):
            if _feeds_add(nxt):
                return True
        elif nxt.type == ops.OPTYPE.ELEMENTWISE and _op_name(nxt).startswith(("AddBackward", "SubBackward")):
            return True
    return False


def _consumer_positions(group, consumer_modules, channels):
    """Input positions of each producer channel in each consumer, from Torch-Pruning's index mapping."""
    by_module = {m: [] for m in consumer_modules}
    for item in group:
        module = item.dep.target.module
        if module in by_module and item.dep.handler.__name__ == "prune_in_channels":
            by_module[module].extend(zip(item.root_idxs, item.idxs))
    positions = {}
    for module, pairs in by_module.items():
        slots = [[] for _ in range(channels)]
        for root, idx in pairs:
            slots[root].append(idx)
        counts = {len(s) for s in slots}
        if len(counts) != 1 or 0 in counts:
            raise _Unsupported("cannot map its channels onto a consumer's inputs")
        positions[module] = torch.tensor([sorted(set(s)) for s in slots], dtype=torch.long)
    return positions


def _coupled_producers(group, producer):
    return [
        item.dep.target.module
        for item in group
        if isinstance(item.dep.target.module, WEIGHTED)
        and item.dep.target.module is not producer
        and item.dep.handler.__name__ == "prune_out_channels"
    ]


def _depthwise(module) -> bool:
    return isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) and module.groups != 1


def find_groups(
    model: nn.Module, example_inputs, dg: tp.DependencyGraph | None = None
) -> tuple[list[RestorableGroup], list[SkippedLayer]]:
    """All restorable groups of ``model`` and every other Conv/Linear layer with the reason it is skipped.

    Groups come in the model's module order. ``dg`` may be passed to reuse a trace.
    """
    if dg is None:
        dg = build_dependency_graph(model, example_inputs)
    names = {m: n for n, m in model.named_modules()}
    groups, skipped = [], []
    for name, module in model.named_modules():
        if not isinstance(module, WEIGHTED):
            continue
        if type(module) not in WEIGHTED:  # subclasses may change the weight layout
            skipped.append(SkippedLayer(name, f"{type(module).__name__} is not a plain Conv/Linear layer"))
            continue
        if module not in dg.module2node:
            skipped.append(SkippedLayer(name, "not reached by the example inputs"))
            continue
        if _depthwise(module):
            skipped.append(SkippedLayer(name, "grouped or depthwise convolution"))
            continue
        try:
            consumers, bn, activation, path = _walk(dg, dg.module2node[module], names)
            pruner = dg.get_pruner_of_module(module)
            channels = module.weight.shape[0]
            group = dg.get_pruning_group(module, pruner.prune_out_channels, idxs=list(range(channels)))
            coupled = _coupled_producers(group, module)
            if coupled:
                others = ", ".join(names.get(m, "?") for m in coupled[:3])
                raise _Unsupported(f"output channels are coupled with {others} (residual add or shared channels)")
            positions = _consumer_positions(group, consumers, channels)
        except _Unsupported as why:
            skipped.append(SkippedLayer(name, str(why)))
            continue
        groups.append(
            RestorableGroup(
                name=name,
                producer=module,
                bn_name=names.get(bn) if bn is not None else None,
                bn=bn,
                activation=activation,
                consumers=[Consumer(consumers[m], m, positions[m], _next_bn(dg.module2node[m])) for m in consumers],
                path=path,
            )
        )
    return groups, skipped
