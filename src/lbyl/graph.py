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
import traceback
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops

from .activation_nodes import NOT_ELEMENTWISE, UnsupportedActivation, is_activation, read_activation
from .activations import Activation
from .layouts import WEIGHTED, is_depthwise_stage, pointwise, subclass_refusals

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# autograd node names (prefixes) of operations a group may pass through
_CHANNELWISE = ("MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool", "CloneBackward", "AliasBackward")
_ARITHMETIC = ("AddBackward", "SubBackward", "MulBackward", "DivBackward")
# element-wise activations lbyl recognises but does not model
_UNMODELLED = ("SoftshrinkBackward", "HardshrinkBackward")
#: the activation of a group with none between producer and consumers
IDENTITY = Activation("identity")


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
    gated: bool = False  # reads the channels after the group's squeeze-and-excitation gate
    bn: nn.Module | None = None  # its own slice of a BatchNorm after a concatenation (lbyl.sliced)
    bn_positions: torch.Tensor | None = None  # (channels,) index of each producer channel in ``bn``


@dataclass
class DepthwiseStage:
    """A depthwise convolution between a producer and its consumers (an inverted residual's
    3x3): producer channel ``j`` is its channel ``j``, filtered alone, with its own
    BatchNorm and activation; removing the channel removes it at every stage."""

    name: str
    module: nn.Module
    bn_name: str | None
    bn: nn.Module | None
    activation: Activation  # after the stage's BatchNorm: what the consumers read


@dataclass
class SqueezeExcitation:
    """A gate that scales every channel by a function of all channel means (squeeze-and-excitation,
    MobileNet-V3, EfficientNet, RegNet-Y): pool -> ``reduce`` -> ``inner`` -> ``expand`` -> ``gate``,
    multiplied into the channels. ``reduce`` reads the channels (a consumer of the group);
    ``expand`` has one output per channel, pruned with it."""

    reduce_name: str
    reduce: nn.Module
    inner: Activation
    expand_name: str
    expand: nn.Module
    gate: Activation


@dataclass
class RestorableGroup:
    """A producer whose pruned channels can be delivered to its kept ones.

    ``bn`` and ``activation`` follow the producer; with a depthwise ``stage`` the
    consumers read the stage's output instead (:attr:`consumer_activation`).
    """

    name: str
    producer: nn.Module
    bn_name: str | None
    bn: nn.Module | None
    activation: Activation  # equals its name as a string when it has default parameters: == "relu"
    consumers: list[Consumer]
    path: list[str] = field(default_factory=list)
    stage: DepthwiseStage | None = None
    input_source: object = None  # lbyl.statistics.InputSource of a producer without BatchNorm, or None
    blocks: torch.Tensor | None = None  # block of each channel where a grouped conv ties them (lbyl.grouped), or None
    excitation: SqueezeExcitation | None = None  # the gate some consumers read the channels through

    @property
    def channels(self) -> int:
        return self.producer.weight.shape[0]

    @property
    def consumer_activation(self) -> Activation:
        """The activation of the channels the consumers read."""
        return self.stage.activation if self.stage is not None else self.activation


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
    """Trace ``model`` on ``example_inputs`` (eval mode; the caller's mode and flags are restored).

    When Torch-Pruning traces the model but cannot map the channel indices through some
    operation (a channel shuffle's reshape, say), the graph is still returned: the index
    mapping is redone one operation at a time and the ones that fail are recorded, so that
    :func:`find_groups` skips only the layers whose channels pass through them. A model that
    cannot be traced at all raises a ValueError that names the cause.
    """
    dg = tp.DependencyGraph()
    with _traceable(model):
        try:
            return dg.build_dependency(model, example_inputs=example_inputs, verbose=False)
        except Exception as error:
            if not _raised_in(error, "update_index_mapping") or not hasattr(dg, "module2node"):
                raise ValueError(_untraceable(error)) from None  # the message names the cause
        setattr(dg, _UNMAPPED, _map_indices_one_by_one(dg))
    return dg


#: attribute of a dependency graph: {node: reason} for the operations whose index mapping failed
_UNMAPPED = "_lbyl_unmapped"


class _OneOperation:
    """A view of a dependency graph that holds a single node, for Torch-Pruning's index-mapping pass."""

    def __init__(self, dg, module, node):
        self._dg, self.module2node = dg, {module: node}

    def __getattr__(self, name):
        return getattr(self._dg, name)


class _UnknownMapping:
    """Stands in the index mappings of an edge to or from an operation whose mapping failed:
    a pruning group that would follow channels across it is refused with the reason."""

    def __init__(self, reason: str):
        self.reason = reason

    def __call__(self, idxs):
        raise _Unsupported(self.reason)


def _map_indices_one_by_one(dg) -> dict:
    """Torch-Pruning's index mapping, node by node; returns ``{node: reason}`` for those that raise.

    Every edge that touches a failed node gets an :class:`_UnknownMapping` after its own mappings.
    """
    from torch_pruning.dependency import index_mapping

    failed = {}
    for module, node in dg.module2node.items():
        try:
            index_mapping.update_index_mapping(_OneOperation(dg, module, node))
        except Exception as error:
            operation = getattr(node.type, "name", str(node.type)).lower()
            failed[node] = f"Torch-Pruning cannot follow its channels: {type(error).__name__} in {operation} index mapping"
    for node in dg.module2node.values():
        for dep in node.dependencies:
            for end in (dep.source, dep.target):
                if end in failed:
                    dep.index_mapping.append(_UnknownMapping(failed[end]))
                    break
    return failed


def _tp_frames(error: BaseException) -> list:
    return [f for f in traceback.extract_tb(error.__traceback__) if "torch_pruning" in f.filename]


def _raised_in(error: BaseException, function: str) -> bool:
    return any(f.name == function for f in traceback.extract_tb(error.__traceback__))


def _torch_pruning_reason(error: BaseException) -> str:
    """A skip reason for an exception raised while Torch-Pruning follows one layer's channels."""
    frames = _tp_frames(error)
    if not frames:
        return f"lbyl cannot analyse its channels: {type(error).__name__}: {error}"
    return f"Torch-Pruning cannot follow its channels: {type(error).__name__} in its {frames[-1].name}"


def _untraceable(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    inside = frames and "torch_pruning" in frames[-1].filename
    where = f"Torch-Pruning's {frames[-1].name}" if inside else "the model's forward pass under autograd"
    return (
        f"cannot trace the model to find its layers: {type(error).__name__} in {where}: {str(error).strip().rstrip('.')}. "
        "lbyl reads the model's structure with Torch-Pruning, which runs model(*example_inputs) once in eval mode "
        "with autograd recording; make that forward pass work under torch.enable_grad() (e.g. no in-place change "
        "of a parameter inside forward), or restore a submodule that traces (e.g. lbyl.restore(model.features, x, ratio))."
    )


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


def _classify(node, spatial_dims: int = 2) -> str:
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
    if is_activation(node):  # before the type check: an nn.PReLU is its own node type
        return "activation"
    if node.type != ops.OPTYPE.ELEMENTWISE:
        raise _Unsupported(f"feeds {type(module).__name__} {node.name.split(' ')[0]}")
    name = _op_name(node)
    if name.startswith(_CHANNELWISE) or _own_matmul(node):
        return "channelwise"
    if name.startswith("ConstantPadNd"):  # TensorFlow-style "same" padding before a strided conv
        pad = tuple(getattr(node.grad_fn, "_saved_pad", ()))
        if not pad or len(pad) > 2 * spatial_dims:
            raise _Unsupported("padding along the channel axis")
        return "channelwise"
    if name.startswith("MeanBackward"):
        dims = getattr(node.grad_fn, "_saved_dim", ())
        if 1 in tuple(dims) or -3 in tuple(dims):
            raise _Unsupported("a mean over the channel axis")
        return "channelwise"
    if name.startswith(_ARITHMETIC):
        raise _Unsupported(f"joins a residual add or element-wise arithmetic ({name})")
    short = name.replace("Backward0", "").replace("Backward1", "")
    if name.startswith(NOT_ELEMENTWISE):
        raise _Unsupported(f"{short} mixes the channels: it is not an element-wise activation")
    if name.startswith(_UNMODELLED):
        raise _Unsupported(f"activation {short} is not modelled")
    raise _Unsupported(f"unsupported operation {name}")


def _own_matmul(node) -> bool:
    """The matrix product of a Linear layer applied to a token tensor: torch flattens the
    tokens, multiplies and restores the shape, so the product is recorded apart from the
    layer's own node, which it feeds alone. It maps features to the layer's inputs one to one."""
    if not (_op_name(node).startswith(("AddmmBackward", "MmBackward")) and len(node.outputs) == 1):
        return False
    layer = node.outputs[0].module
    return isinstance(layer, nn.Linear) and any(p is layer.weight for p in _weights_of(node.grad_fn))


def _weights_of(grad_fn) -> list:
    """The parameters a matrix product reads directly or through a transpose (its weight)."""
    found = []
    for function, _ in getattr(grad_fn, "next_functions", ()):
        if function is not None and function.name().startswith("TBackward"):
            function = function.next_functions[0][0]
        if function is not None and hasattr(function, "variable"):
            found.append(function.variable)
    return found


def _activation(node, channels: int, before: Activation | None) -> Activation:
    """The activation of an activation node, after ``before`` (None: the first on this path)."""
    try:
        activation = read_activation(node, channels)
    except UnsupportedActivation as why:
        raise _Unsupported(str(why)) from None
    if before is not None and not (before == activation and activation.name in ("relu", "hardtanh")):
        raise _Unsupported(f"two activations in a row ({before}, then {activation})")  # idempotent ones excepted
    return activation


def _walk(dg, start, names):
    """Follow every path from the producer to its consumers; validate the op order.

    Returns (consumer modules, bn module or None, activation, path description, stage):
    with a depthwise stage on the way, the BatchNorm and activation are the producer's
    (before the stage) and the stage holds its own.
    """
    consumers, bns, activations, path, stages, gates, slices, after_concat = {}, set(), set(), [], set(), {}, {}, set()
    channels = start.module.weight.shape[0]

    def visit(node, bn_seen, activation, reshaped, stage, gate=None, concatenated=False):
        if not node.outputs:
            raise _Unsupported("its channels are a model output")
        for nxt in node.outputs:
            if _op_name(nxt).startswith("MulBackward") and gate is None and not reshaped:
                found = _excitation(nxt, node, channels, names)
                if found is not None:
                    gates[nxt] = found
                    path.append(f"gate({found.expand_name})")
                    visit(nxt, bn_seen, activation, reshaped, stage, found)
                    continue
            kind = _classify(nxt, start.module.weight.dim() - 2)
            label = names.get(nxt.module, _op_name(nxt))
            if kind == "consumer":
                if gate is not None:
                    gated.add(nxt.module)
                if isinstance(nxt.module, nn.Conv2d | nn.Conv1d | nn.Conv3d):
                    if reshaped:
                        raise _Unsupported(f"reshaped before the convolution {label}")
                    if nxt.module.groups != 1 and is_depthwise_stage(nxt.module, channels):
                        if stage is not None or gate is not None:
                            raise _Unsupported(f"feeds the depthwise convolution {label} after another one")
                        path.append(label)
                        visit(nxt, None, None, False, (nxt.module, label, bn_seen, activation or IDENTITY))
                        continue
                    if nxt.module.groups != 1 and stage is not None:
                        raise _Unsupported(f"feeds the grouped convolution {label} after a depthwise one")
                consumers[nxt.module] = label
                if stage is None:
                    if bn_seen is not None and slices.setdefault(nxt.module, bn_seen) is not bn_seen:
                        raise _Unsupported(f"reaches {label} through two different BatchNorms")
                    activations.add(activation or IDENTITY)
                    bns.add(bn_seen)
                    stages.add(None)
                else:
                    module, stage_label, bn_before, activation_before = stage
                    activations.add(activation_before)
                    bns.add(bn_before)
                    stages.add((module, stage_label, bn_seen, activation or IDENTITY))
                continue
            if kind == "bn":
                if activation is not None:
                    raise _Unsupported(f"BatchNorm {label} comes after the activation")
                if bn_seen is not None:
                    raise _Unsupported("two BatchNorms in a row")
                if nxt.module.running_mean is None or nxt.module.running_var is None:
                    raise _Unsupported(
                        f"BatchNorm {label} keeps no running statistics (track_running_stats=False), "
                        "so it normalises with the statistics of each batch"
                    )
                if concatenated:  # it normalises the concatenation: the producer's channels are a slice of it
                    if stage is not None or gate is not None:
                        raise _Unsupported(f"its BatchNorm {label} normalises a concatenation behind a depthwise stage or gate")
                    after_concat.add(nxt.module)
                path.append(label)
                visit(nxt, nxt.module, activation, reshaped, stage, gate, concatenated)
                continue
            after = activation
            if kind == "activation":
                after = _activation(nxt, channels, activation)
                if after.per_channel and (reshaped or concatenated):
                    raise _Unsupported(f"reshaped or concatenated before the per-channel activation {label}")
            if label not in path:
                path.append(label)
            visit(nxt, bn_seen, after, reshaped or kind == "reshape", stage, gate, concatenated or kind == "concat")

    gated = set()
    visit(start, None, None, False, None)
    if not consumers:
        raise _Unsupported("no Conv/Linear layer reads its channels")
    if len(gates) > 1:
        raise _Unsupported("its channels pass through more than one squeeze-and-excitation gate")
    excitation = next(iter(gates.values()), None)
    if excitation is not None and excitation.reduce not in consumers:
        raise _Unsupported(f"the squeeze-and-excitation {excitation.reduce_name} does not read its channels")
    main = [m for m in consumers if excitation is None or m is not excitation.reduce]
    if len(main) > 1:
        for node in (dg.module2node[m] for m in main):
            if _feeds_add(node):
                raise _Unsupported(
                    f"it is the input of a residual block: {consumers[node.module]} is the block's "
                    "projection shortcut (the residual stream stays whole)"
                )
    if None not in bns and stages == {None} and (len(bns) > 1 or bns & after_concat):  # one BatchNorm per consumer
        if any(a.per_channel for a in activations):
            raise _Unsupported("a per-channel activation after BatchNorms of several consumers")
        bns = {None}
    else:
        slices = {}
    if len(bns) > 1:
        raise _Unsupported("BatchNorm on some paths to the consumers but not on others")
    if len(activations) > 1:
        shown = ", ".join(sorted(str(a) for a in activations))
        raise _Unsupported(f"different activations on the paths to the consumers ({shown})")
    if len(stages) > 1:
        raise _Unsupported("some consumers read it through a depthwise convolution, others not (or through another)")
    return consumers, bns.pop(), activations.pop(), path, _stage(stages.pop(), channels, names), excitation, gated, slices


def _excitation(mul, source, channels: int, names) -> SqueezeExcitation | None:
    """The squeeze-and-excitation gate of a product ``mul`` of the channels (``source``) with a
    per-channel scale computed from them, or None when ``mul`` is some other product.

    Read backwards from the scale: gate activation <- expand (one output per channel, 1x1 or
    Linear) <- [inner activation] <- reduce (reads the channels, 1x1 or Linear) <- pooling <- source.
    """
    others = [n for n in mul.inputs if n is not source]
    if len(others) != 1:
        return None
    node, gate = others[0], None
    while is_activation(node) and len(node.inputs) == 1:
        if gate is not None:
            return None
        gate, node = _activation(node, channels, None), node.inputs[0]
    if gate is None or not pointwise(node.module, out=channels):
        return None
    expand = node.module
    node, inner = _skip_reshapes(node.inputs), IDENTITY
    if node is not None and is_activation(node):
        inner, node = _activation(node, expand.weight.shape[1], None), _skip_reshapes(node.inputs)
    if node is None or not pointwise(node.module, into=channels):
        return None
    reduce = node.module
    node = _skip_reshapes(node.inputs)
    for _ in range(4):  # the pooling: AdaptiveAvgPool, a mean over the spatial axes, a flatten
        if node is None or node is source:
            break
        if not _op_name(node).startswith(("AdaptiveAvgPool", "AvgPool", "MeanBackward", "ViewBackward", "ReshapeAlias")):
            return None
        node = node.inputs[0] if len(node.inputs) == 1 else None
    if node is not source:
        return None
    return SqueezeExcitation(names.get(reduce, "?"), reduce, inner, names.get(expand, "?"), expand, gate)


def _skip_reshapes(inputs):
    node = inputs[0] if len(inputs) == 1 else None
    while node is not None and node.type == ops.OPTYPE.RESHAPE:
        node = node.inputs[0] if len(node.inputs) == 1 else None
    return node


def _stage(found, channels: int, names) -> DepthwiseStage | None:
    if found is None:
        return None
    module, label, bn, activation = found
    if bn is not None and bn.num_features != channels:
        raise _Unsupported(f"BatchNorm {names.get(bn, '?')} after the depthwise convolution {label} has the wrong width")
    return DepthwiseStage(label, module, names.get(bn) if bn is not None else None, bn, activation)


def channel_blocks(producer: nn.Module, consumers: dict, channels: int) -> torch.Tensor | None:
    """The block of each producer channel where grouped convolutions tie them, or None.

    A grouped producer's output channels and a grouped consumer's input channels fall into
    its groups; a channel's block is its group in each of them. Pruning must remove as many
    channels from every block, and a pruned channel can only be delivered within its block
    (:mod:`lbyl.grouped`). ``consumers``: ``{module: (name, positions)}``.
    """
    keys = [[] for _ in range(channels)]
    if isinstance(producer, nn.Conv1d | nn.Conv2d | nn.Conv3d) and producer.groups > 1:
        for c in range(channels):
            keys[c].append(c // (channels // producer.groups))
    for module, (label, positions) in consumers.items():
        if not isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) or module.groups == 1:
            continue
        if positions.numel() != module.in_channels:
            raise _Unsupported(f"feeds the grouped convolution {label} together with other layers")
        width = module.in_channels // module.groups
        if width == 1:
            raise _Unsupported(f"feeds the depthwise convolution {label}, which widens each channel alone")
        for c in range(channels):
            keys[c].append(int(positions[c, 0]) // width)
    if not keys[0]:
        return None
    labels = {key: i for i, key in enumerate(dict.fromkeys(tuple(k) for k in keys))}
    blocks = torch.tensor([labels[tuple(k)] for k in keys], dtype=torch.long)
    sizes = torch.bincount(blocks)
    if sizes.min() != sizes.max():
        raise _Unsupported("its grouped convolutions split its channels into blocks of unequal size")
    if sizes.min() < 2:
        raise _Unsupported("its grouped convolutions give each of its channels a group of its own")
    return blocks


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


def _consumer_positions(group, consumer_modules, channels, handler: str = "prune_in_channels"):
    """Input positions of each producer channel in each consumer, from Torch-Pruning's index mapping
    (``handler="prune_out_channels"``: its channels in a BatchNorm after a concatenation)."""
    by_module = {m: [] for m in consumer_modules}
    for item in group:
        module = item.dep.target.module
        if module in by_module and item.dep.handler.__name__ == handler:
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


def _coupled_producers(group, producer, stage: DepthwiseStage | None = None, excitation=None):
    own = {producer, stage.module if stage is not None else None, excitation.expand if excitation is not None else None}
    return [
        item.dep.target.module
        for item in group
        if isinstance(item.dep.target.module, WEIGHTED)
        and item.dep.target.module not in own
        and item.dep.handler.__name__ == "prune_out_channels"
    ]


def _depthwise(module) -> bool:
    """A convolution that filters each input channel alone (any channel multiplier): its outputs
    are tied to its inputs. Other grouped convolutions prune their outputs in blocks."""
    return isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) and module.groups == module.in_channels > 1


def _pruning_group(dg, module, channels):
    """Torch-Pruning's group for removing every output channel of ``module``.

    On a graph with operations whose index mapping failed, the mapping was done once,
    operation by operation, when the graph was built (:func:`build_dependency_graph`), so
    the query does not redo it (Torch-Pruning's own pass would meet the same failure), and
    a group that reaches such an operation is refused (:class:`_UnknownMapping`).
    """
    pruner = dg.get_pruner_of_module(module)
    idxs = list(range(channels))
    if not getattr(dg, _UNMAPPED, None):
        return dg.get_pruning_group(module, pruner.prune_out_channels, idxs=idxs)
    every_node = dg.module2node
    dg.module2node = {module: every_node[module]}  # the query re-maps the indices of these nodes only
    try:
        return dg.get_pruning_group(module, pruner.prune_out_channels, idxs=idxs)
    finally:
        dg.module2node = every_node


def find_groups(
    model: nn.Module, example_inputs, dg: tp.DependencyGraph | None = None, input_shapes: dict | None = None
) -> tuple[list[RestorableGroup], list[SkippedLayer]]:
    """All restorable groups of ``model`` and every other Conv/Linear layer with the reason it is skipped.

    Groups come in the model's module order. ``dg`` may be passed to reuse a trace, and
    ``input_shapes`` (``{layer: input shape}``) the layer inputs that trace saw.
    """
    if dg is None:
        dg = build_dependency_graph(model, example_inputs)
    names = {m: n for n, m in model.named_modules()}
    groups, skipped, sources = [], [], {}
    refused = subclass_refusals(model, example_inputs, input_shapes)
    for name, module in model.named_modules():
        if not isinstance(module, WEIGHTED):
            continue
        if module in refused:  # a subclass that reparametrises its weight, say (lbyl.layouts)
            skipped.append(SkippedLayer(name, refused[module]))
            continue
        if module not in dg.module2node:
            skipped.append(SkippedLayer(name, _attention_part(name, model) or "not reached by the example inputs"))
            continue
        if _depthwise(module):
            skipped.append(SkippedLayer(name, "depthwise convolution"))
            continue
        try:
            channels = module.weight.shape[0]
            consumers, bn, activation, path, stage, excitation, gated, slices = _walk(dg, dg.module2node[module], names)
            if bn is not None and bn.num_features != channels:  # e.g. a BatchNorm1d after a flatten
                raise _Unsupported(
                    f"its BatchNorm {names.get(bn, '?')} normalises {bn.num_features} features, not its {channels} channels"
                )
            group = _pruning_group(dg, module, channels)
            coupled = _coupled_producers(group, module, stage, excitation)
            if coupled:
                others = ", ".join(names.get(m, "?") for m in coupled[:3])
                raise _Unsupported(f"output channels are coupled with {others} (residual add or shared channels)")
            positions = _consumer_positions(group, consumers, channels)
            bn_positions = _consumer_positions(group, set(slices.values()), channels, "prune_out_channels")
            blocks = channel_blocks(module, {m: (consumers[m], positions[m]) for m in consumers}, channels)
        except _Unsupported as why:
            skipped.append(SkippedLayer(name, str(why)))
            continue
        except Exception as error:  # a graph the tracer or lbyl does not understand costs this layer, not the run
            skipped.append(SkippedLayer(name, _torch_pruning_reason(error)))
            continue
        groups.append(
            RestorableGroup(
                name=name,
                producer=module,
                bn_name=names.get(bn) if bn is not None else _slices_name(slices, names),
                bn=bn,
                activation=activation,
                consumers=[
                    Consumer(consumers[m], m, positions[m], _next_bn(dg.module2node[m]), m in gated, slices.get(m),
                             bn_positions[slices[m]][:, 0] if m in slices else None)  # fmt: skip
                    for m in consumers
                ],
                path=path,
                stage=stage,
                input_source=None if slices else _input_source(dg, module, bn, sources),
                blocks=blocks,
                excitation=excitation,
            )
        )
    return groups, _name_stages(groups, skipped)


def _slices_name(slices: dict, names) -> str | None:
    """The report's BatchNorm column for a producer read through slices of several BatchNorms."""
    found = sorted({names.get(bn, "?") for bn in slices.values()})
    if not found:
        return None
    return f"{found[0]}[slice]" if len(found) == 1 else f"{found[0]}[slice] and {len(found) - 1} more"


def _name_stages(groups: list[RestorableGroup], skipped: list[SkippedLayer]) -> list[SkippedLayer]:
    """A depthwise conv restored as a group's stage, or a gate's expand layer pruned with a group's
    channels, is skipped as a producer: say where it went."""
    stages = {g.stage.name: g.name for g in groups if g.stage is not None}
    gates = {g.excitation.expand_name: g.name for g in groups if g.excitation is not None}
    named = []
    for s in skipped:
        if s.name in stages:
            s = SkippedLayer(s.name, f"depthwise convolution: pruned and restored with {stages[s.name]}'s channels")
        elif s.name in gates:
            s = SkippedLayer(s.name, f"squeeze-and-excitation gate: pruned with {gates[s.name]}'s channels")
        named.append(s)
    return named


def _attention_part(name: str, model: nn.Module) -> str | None:
    """The skip reason of a projection that an attention module applies itself (not as a module call)."""
    parent = name.rpartition(".")[0]
    owner = model.get_submodule(parent) if parent else model
    if isinstance(owner, nn.MultiheadAttention) or "Attention" in type(owner).__name__:  # Swin's calls F.linear
        return f"attention projection of {parent or 'the model'}: attention and the residual stream stay whole"
    return None


def _input_source(dg, module, bn, memo: dict):
    """Where a Linear producer without BatchNorm, or a pointwise producer with one, gets its input
    (:func:`lbyl.statistics.input_source`)."""
    if not (isinstance(module, nn.Linear) if bn is None else pointwise(module)):
        return None
    from .statistics import input_source

    try:
        return input_source(dg, dg.module2node[module], memo)
    except Exception:  # statistics are an improvement, never a reason to fail
        return None
