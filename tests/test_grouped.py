"""Grouped convolutions (ResNeXt, RegNet): blocks pruned alike, delivery within a block."""
import copy

import pytest
import torch
import torch.nn as nn

import lbyl
from lbyl import grouped
from lbyl.planning import layer_stats

X = torch.randn(3, 6, 9, 9, generator=torch.Generator().manual_seed(1))


class Bottleneck(nn.Module):
    """1x1 -> BN -> ReLU -> grouped 3x3 -> BN -> ReLU -> 1x1 (no padding: no border effects)."""

    def __init__(self, width=8, groups=2, padding=0):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(6, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=padding, groups=groups, bias=False)
        self.bn2, self.conv3 = nn.BatchNorm2d(width), nn.Conv2d(width, 5, 1)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return self.conv3(torch.relu(self.bn2(self.conv2(y))))


def bottleneck(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = Bottleneck(**kwargs).eval()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.5, 0.5)
    return model


def copy_channels(conv, bn, pairs):
    """Make output channel ``a`` of ``conv`` (and its BatchNorm entries) a copy of ``b``."""
    with torch.no_grad():
        for a, b in pairs:
            conv.weight[a] = conv.weight[b]
            for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias):
                t[a] = t[b]


@pytest.mark.parametrize("method", ["lbyl", "nm"])
def test_copies_within_a_consumer_group_are_restored_exactly(method):
    model = bottleneck()
    copy_channels(model.conv1, model.bn1, [(2, 1), (3, 0), (6, 5), (7, 4)])  # groups of conv2: 0-3, 4-7
    restored, report = lbyl.restore(model, X, method=method, kept={"conv1": [0, 1, 4, 5]})
    assert torch.allclose(restored(X), model(X), atol=1e-5)
    conv2 = restored.conv2
    assert (conv2.in_channels, conv2.groups, tuple(conv2.weight.shape)) == (4, 2, (8, 2, 3, 3))


@pytest.mark.parametrize("method", ["lbyl", "nm"])
def test_copies_within_a_producer_group_are_restored_exactly(method):
    model = bottleneck()
    copy_channels(model.conv2, model.bn2, [(1, 0), (3, 2), (5, 4), (7, 6)])
    restored, _ = lbyl.restore(model, X, method=method, kept={"conv2": [0, 2, 4, 6]})
    assert torch.allclose(restored(X), model(X), atol=1e-5)
    assert (restored.conv2.out_channels, restored.conv2.groups, restored.conv3.in_channels) == (4, 2, 4)


def test_a_copy_in_another_group_is_not_delivered_across():
    model = bottleneck()
    copy_channels(model.conv1, model.bn1, [(4, 0)])  # 4 copies 0, but conv2 reads them in different groups
    stats = layer_stats(lbyl.find_groups(model, X)[0][0])
    blocks = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    kept, pruned = torch.tensor([0, 1, 2, 5, 6, 7]), torch.tensor([3, 4])
    solution = grouped.solve(lbyl.LBYL(), stats, kept, pruned, "relu", blocks)
    in_block = blocks[kept][:, None] == blocks[pruned][None, :]
    assert torch.all(solution.delivery[~in_block] == 0) and torch.any(solution.delivery[in_block] != 0)
    whole = lbyl.LBYL().solve(stats, kept, pruned, "relu")
    assert whole.delivery[0, 1].abs() > 0.5  # unconstrained, channel 4 would go to its copy 0


def test_each_block_is_solved_on_its_own_statistics():
    model = bottleneck()
    stats = layer_stats(lbyl.find_groups(model, X)[0][0])
    blocks, kept, pruned = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), torch.tensor([0, 2, 4, 5]), torch.tensor([1, 3, 6, 7])
    solution = grouped.solve(lbyl.LBYL(), stats, kept, pruned, "relu", blocks)
    first = lbyl.LBYL().solve(grouped.subset(stats, torch.arange(4)), torch.tensor([0, 2]), torch.tensor([1, 3]), "relu")
    assert torch.allclose(solution.delivery[:2, :2], first.delivery)
    assert torch.allclose(solution.mean_shift[:2], first.mean_shift)
    assert torch.allclose(solution.covariance[:4, :4], first.covariance)
    assert torch.all(solution.covariance[:4, 4:] == 0)


def dense_twin(model):
    """The same function with conv2 as a dense conv (zeros outside the groups)."""
    twin = copy.deepcopy(model)
    old, groups = model.conv2, model.conv2.groups
    dense = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, padding=old.padding, bias=False)
    rows, width = old.out_channels // groups, old.in_channels // groups
    with torch.no_grad():
        dense.weight.zero_()
        for g in range(groups):
            dense.weight[g * rows:(g + 1) * rows, g * width:(g + 1) * width] = old.weight[g * rows:(g + 1) * rows]
    twin.conv2 = dense
    return twin


@pytest.mark.parametrize("padding", [0, 1])
def test_corrections_of_a_grouped_consumer_equal_those_of_its_dense_twin(padding):
    """Mean offsets (border coverage included) and variance ratios are computed group by group;
    a dense conv with the same weights reads the same channels, so both must agree."""
    model = bottleneck(padding=padding)
    twin = dense_twin(model)
    assert torch.allclose(twin(X), model(X), atol=1e-5)
    method = lbyl.Prune(mean_correction=True, variance_correction=True)
    kept = {"conv1": [0, 3, 5, 6]}
    restored, _ = lbyl.restore(model, X, method=method, kept=kept)
    restored_twin, _ = lbyl.restore(twin, X, method=method, kept=kept)
    assert torch.allclose(restored(X), restored_twin(X), atol=1e-5)
    assert not torch.allclose(restored(X), lbyl.restore(model, X, method="prune", kept=kept)[0](X), atol=1e-3)


def test_a_ratio_keeps_as_many_channels_in_every_block():
    model = bottleneck(width=12, groups=3)
    plan = lbyl.plan(model, X, 0.5)
    for name in ("conv1", "conv2"):
        kept = torch.tensor(plan.kept[name])
        assert torch.bincount(kept // 4, minlength=3).tolist() == [2, 2, 2]
    restored, report = lbyl.restore(model, X, 0.5)
    assert restored(X).shape == model(X).shape and torch.isfinite(restored(X)).all()
    assert (restored.conv2.in_channels, restored.conv2.out_channels, restored.conv2.groups) == (6, 6, 3)


def test_unequal_blocks_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"as many channels in each of its 2 blocks of 4.*same number in every block"):
        lbyl.restore(bottleneck(), X, kept={"conv1": [0, 1, 2, 4]})


def test_ratio_zero_is_identical_and_sequential_order_runs():
    model = bottleneck(padding=1)
    assert torch.equal(lbyl.restore(model, X, 0.0)[0](X), model(X))
    restored, report = lbyl.restore(model, X, 0.5, order="sequential")
    assert torch.isfinite(restored(X)).all() and [r.name for r in report.layers] == ["conv1", "conv2"]


def test_a_restored_grouped_model_is_rebuilt_from_its_plan():
    model = bottleneck()
    restored, report = lbyl.restore(model, X, 0.5)
    rebuilt = lbyl.shrink(bottleneck(seed=3), X, {r.name: r.kept for r in report.layers})
    rebuilt.load_state_dict(restored.state_dict())
    assert torch.equal(rebuilt(X), restored(X))


def test_a_grouped_consumer_shared_with_another_producer_is_skipped():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(6, 4, 1), nn.Conv2d(6, 4, 1)
            self.mix, self.out = nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
            return self.out(torch.relu(self.mix(y)))

    groups, skipped = lbyl.find_groups(Two().eval(), X)
    reasons = {s.name: s.reason for s in skipped}
    assert reasons["a"] == "feeds the grouped convolution mix together with other layers"
    assert "mix" in [g.name for g in groups]
