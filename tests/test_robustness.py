"""Graphs lbyl does not understand cost the layers involved, never the run.

Small stand-ins for the torchvision architectures that used to crash (no torchvision
needed): ShuffleNetV2's channel shuffle, on which Torch-Pruning's index mapping
divides by zero; DenseNet's BatchNorm over a concatenation; plus a model that
cannot be traced at all, and failures injected into Torch-Pruning for one layer.
"""
import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.dependency import index_mapping

import lbyl
from lbyl.graph import find_groups


def conv_bn(c_in, c_out, kernel=1, groups=1, relu=True):
    layers = [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return layers + [nn.ReLU()] if relu else layers


def randomise_bn(model, seed=0):
    """Plausible running statistics, so that restoration has something to correct."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    return model.eval()


def channel_shuffle(x, groups):
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's stride-1 unit: split, one branch transformed, concatenate, shuffle."""

    def __init__(self, c):
        super().__init__()
        half = c // 2
        self.branch = nn.Sequential(*conv_bn(half, half), *conv_bn(half, half, 3, half, relu=False), *conv_bn(half, half))

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch(x2)), dim=1), 2)


class ShuffleNetLike(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, c, 3))
        self.units = nn.Sequential(ShuffleUnit(c), ShuffleUnit(c), ShuffleUnit(c))  # three in a row break the mapping
        self.head = nn.Sequential(*conv_bn(c, 2 * c))
        self.fc = nn.Linear(2 * c, 10)

    def forward(self, x):
        return self.fc(self.head(self.units(self.stem(x))).mean((2, 3)))


class DenseLayer(nn.Module):
    def __init__(self, c_in, growth):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, 2 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(2 * growth), nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        new = self.conv2(torch.relu(self.norm2(self.conv1(torch.relu(self.norm1(x))))))
        return torch.cat((x, new), dim=1)


class DenseNetLike(nn.Module):
    """DenseNet's pattern: every BatchNorm after the stem normalises a concatenation."""

    def __init__(self, c=8, growth=4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.layer1, self.layer2 = DenseLayer(c, growth), DenseLayer(c + growth, growth)
        self.norm, self.transition = nn.BatchNorm2d(c + 2 * growth), nn.Conv2d(c + 2 * growth, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(self.transition(torch.relu(self.norm(x))).mean((2, 3)))


def skipped_of(model, x):
    groups, skipped = find_groups(model, x)
    return [g.name for g in groups], {s.name: s.reason for s in skipped}


def restores_cleanly(model, x):
    """Restore at 0.3 and at 0: finite outputs, and ratio 0 changes nothing."""
    restored, report = lbyl.restore(model, x, 0.3)
    with torch.no_grad():
        assert torch.isfinite(restored(x)).all()
        untouched, _ = lbyl.restore(model, x, 0.0)
        assert torch.equal(untouched(x), model(x))
    return report


def test_channel_shuffle_skips_the_layers_it_scrambles():
    torch.manual_seed(0)
    model, x = randomise_bn(ShuffleNetLike()), torch.randn(1, 3, 8, 8)
    groups, skipped = skipped_of(model, x)
    # each unit's hidden channels (1x1 -> depthwise -> 1x1) stay inside the branch; the shuffle follows it
    assert groups == ["units.0.branch.0", "units.1.branch.0", "units.2.branch.0", "head.0"]
    for unit in range(3):
        assert skipped[f"units.{unit}.branch.5"] == "unsupported operation TransposeBackward0"
        assert skipped[f"units.{unit}.branch.3"] == (
            f"depthwise convolution: pruned and restored with units.{unit}.branch.0's channels"
        )
    report = restores_cleanly(model, x)
    assert [layer.name for layer in report.layers] == groups


def test_a_failed_index_mapping_is_recorded_per_operation():
    """Torch-Pruning 1.6.1 divides by zero on three shuffle units in a row; the graph is still usable."""
    model, x = ShuffleNetLike().eval(), torch.randn(1, 3, 8, 8)
    try:
        tp.DependencyGraph().build_dependency(model, example_inputs=x)
    except ZeroDivisionError:
        pass
    else:
        pytest.skip("this Torch-Pruning maps the channel shuffle: nothing to recover from")
    from lbyl.graph import _UNMAPPED, build_dependency_graph

    dg = build_dependency_graph(model, x)
    reasons = set(getattr(dg, _UNMAPPED).values())
    assert reasons == {"Torch-Pruning cannot follow its channels: ZeroDivisionError in reshape index mapping"}


def test_batchnorm_over_a_concatenation_is_read_slice_by_slice():
    torch.manual_seed(0)
    model, x = randomise_bn(DenseNetLike()), torch.randn(1, 3, 8, 8)
    groups, skipped = skipped_of(model, x)
    # it used to crash in bn_affine, then was skipped; every producer now reads its slices (lbyl.sliced)
    assert groups == ["stem", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "transition"]
    assert skipped == {"fc": "its channels are a model output"}
    restores_cleanly(model, x)


def test_batchnorm_wider_than_its_producer_after_a_flatten():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Flatten(), nn.BatchNorm1d(4 * 4 * 4), nn.ReLU(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 2)
    ).eval()
    groups, skipped = skipped_of(model, torch.randn(1, 3, 6, 6))
    assert skipped["0"] == "its BatchNorm 2 normalises 64 features, not its 4 channels"
    assert groups == ["4"]


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(3, 5, 1)
        self.head, self.other = nn.Conv2d(10, 2, 1), nn.Conv2d(5, 2, 1)

    def forward(self, x):
        joined = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return self.head(joined) + self.other(torch.relu(self.c(x)))


def test_an_index_mapping_that_raises_costs_only_the_layers_through_it(monkeypatch):
    def broken(graph, node):
        raise RuntimeError("cannot map")

    monkeypatch.setattr(index_mapping, "update_concat_index_mapping", broken)
    model, x = Concat().eval(), torch.randn(1, 3, 8, 8)
    groups, skipped = skipped_of(model, x)
    reason = "Torch-Pruning cannot follow its channels: RuntimeError in concat index mapping"
    assert skipped["a"] == skipped["b"] == reason
    assert groups == ["c"]
    restores_cleanly(model, x)


def test_any_exception_while_analysing_one_layer_skips_it(monkeypatch):
    model, x = Concat().eval(), torch.randn(1, 3, 8, 8)
    original = tp.DependencyGraph.get_pruning_group

    def fails_for_c(self, module, *args, **kwargs):
        if module is model.c:
            raise IndexError("list index out of range")
        return original(self, module, *args, **kwargs)

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", fails_for_c)
    groups, skipped = skipped_of(model, x)
    assert groups == ["a", "b"]
    assert "IndexError" in skipped["c"] and "list index out of range" in skipped["c"]


class EditsItsParameter(nn.Module):
    """Runs fine for inference, but autograd refuses its in-place update of a parameter."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 2, 1)
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, x):
        self.scale.mul_(1.0)
        return self.conv2(torch.relu(self.conv1(x))) * self.scale


def test_a_model_that_cannot_be_traced_raises_a_value_error():
    model, x = EditsItsParameter().eval(), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        model(x)  # the model itself works
    with pytest.raises(ValueError, match=r"^cannot trace the model to find its layers: RuntimeError") as caught:
        lbyl.restore(model, x, 0.5)
    message = str(caught.value)
    assert "in-place operation" in message and "torch.enable_grad()" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no internal traceback shown
    assert not model.scale.requires_grad  # the caller's flags are restored
    with pytest.raises(ValueError, match="cannot trace the model"):
        lbyl.plan(model, x, 0.5)
