"""BatchNorms after a concatenation (DenseNet): each consumer reads its own slice."""
import importlib.util

import pytest
import torch
import torch.nn as nn

import lbyl
from lbyl import sliced
from lbyl.graph import find_groups
from lbyl.planning import producer_stats

X = torch.randn(3, 4, 7, 7, generator=torch.Generator().manual_seed(2))


class DenseBlock(nn.Module):
    """Two DenseNet layers and a transition: each new layer reads BN -> ReLU -> conv of the
    concatenation of everything before it; ``grow`` adds 6 channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(4, 5, 3, padding=1, bias=False)
        self.grow = nn.Conv2d(5, 6, 1, bias=False)
        self.norm1, self.conv1 = nn.BatchNorm2d(11), nn.Conv2d(11, 3, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(14), nn.Conv2d(14, 2, 1)

    def forward(self, x):
        stem = self.stem(x)
        grown = self.grow(stem)
        first = torch.cat([stem, grown], 1)
        new = self.conv1(torch.relu(self.norm1(first)))
        return self.conv2(torch.relu(self.norm2(torch.cat([first, new], 1))))


def dense_block(seed=0):
    torch.manual_seed(seed)
    model = DenseBlock().eval()
    for bn in (model.norm1, model.norm2):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.5, 0.5)
    return model


def test_each_consumer_reads_its_own_slice():
    model = dense_block()
    groups, skipped = find_groups(model, X)
    group = next(g for g in groups if g.name == "grow")
    assert group.bn is None and group.bn_name == "norm1[slice] and 1 more"
    slices = {c.name: (c.bn, c.bn_positions.tolist()) for c in group.consumers}
    assert slices == {"conv1": (model.norm1, list(range(5, 11))), "conv2": (model.norm2, list(range(5, 11)))}
    views = sliced.views(group, producer_stats(group))
    assert [len(v.consumers) for v, _ in views] == [1, 1]
    for view, stats in views:
        bn = view.consumers[0].bn
        assert torch.equal(stats.bn.gamma, bn.weight.detach().double()[5:11])
        assert torch.equal(stats.bn.var, bn.running_var.double()[5:11])


@pytest.mark.parametrize("method", ["lbyl", "nm"])
def test_a_scaled_copy_is_restored_exactly_through_every_slice(method):
    """Channel 5 of ``grow`` is twice channel 1; each BatchNorm slice gives them the same
    normalised value (its own gamma and beta), so delivering 1, not 2, is exact in both."""
    model = dense_block()
    with torch.no_grad():
        model.grow.weight[5] = 2 * model.grow.weight[1]
        for bn in (model.norm1, model.norm2):
            p, k = 5 + 5, 5 + 1  # the producer's channels start at 5 in both concatenations
            bn.running_mean[p], bn.running_var[p] = 2 * bn.running_mean[k], 4 * bn.running_var[k] + 3 * bn.eps
            bn.weight[p], bn.bias[p] = bn.weight[k], bn.bias[k]
    kept = {"grow": [0, 1, 2, 3, 4]}
    restored, report = lbyl.restore(model, X, kept=kept, method=method)
    with torch.no_grad():
        assert torch.allclose(restored(X), model(X), atol=1e-5)
        pruned, _ = lbyl.restore(model, X, kept=kept, method="prune")
        assert not torch.allclose(pruned(X), model(X), atol=1e-2)
    assert (restored.norm1.num_features, restored.norm2.num_features) == (10, 13)
    assert (restored.conv1.in_channels, restored.conv2.in_channels) == (10, 13)
    assert sorted(report.layers[0].consumers) == ["conv1", "conv2"]


def test_ratio_zero_is_identical_and_the_stem_stays_whole():
    model = dense_block()
    restored, report = lbyl.restore(model, X, 0.0, layers="all")
    with torch.no_grad():
        assert torch.equal(restored(X), model(X))
    restored, report = lbyl.restore(model, X, 0.5, layers="all")
    with torch.no_grad():
        assert torch.isfinite(restored(X)).all()
    assert {layer.name for layer in report.layers} == {"grow", "conv1"}
    stem = next(s for s in report.skipped if s.name == "stem")
    assert "BatchNorm on some paths" in stem.reason  # it reaches conv2 through norm2 and grow without one


def test_a_batchnorm_after_the_activation_is_still_refused():
    class Stem(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3)
            self.other, self.norm, self.head = nn.Conv2d(4, 2, 1), nn.BatchNorm2d(5), nn.Conv2d(5, 2, 1)

        def forward(self, x):
            y = torch.cat([torch.relu(self.bn(self.conv(x))), self.other(x)], 1)
            return self.head(torch.relu(self.norm(y)))

    _, skipped = find_groups(Stem().eval(), X)
    assert "comes after the activation" in next(s.reason for s in skipped if s.name == "conv")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="needs torchvision (the torch 2.14 CI run)")
def test_densenet_layers_are_restored_through_their_slices():
    import torchvision

    model = torchvision.models.densenet121().eval()
    x = torch.randn(1, 3, 32, 32)
    plan = lbyl.plan(model, x, 0.3)
    names = {layer.name for layer in plan.layers}
    assert "features.denseblock1.denselayer1.conv2" in names and "features.transition1.conv" in names
    assert not [s for s in plan.skipped if "concatenation" in s.reason]


def test_explained_share_is_the_producers_part_of_the_recorded_variance():
    from lbyl.correction import explained_share

    sums = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    covariance = torch.tensor([[4.0, 2.0], [2.0, 4.0]], dtype=torch.float64)  # correlation 0.5
    variances = torch.tensor([1.0, 1.0], dtype=torch.float64)  # after the activation
    share = explained_share(sums, covariance, variances, torch.tensor([8.0, 2.0], dtype=torch.float64))
    assert torch.allclose(share, torch.tensor([4.0 / 8.0, 1.0], dtype=torch.float64))  # 3 / 2 is clamped to 1


class TwoBranches(nn.Module):
    """Two layers concatenated, normalised together, read by ``head`` and its BatchNorm ``post``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 6, 1), nn.Conv2d(4, 5, 1)
        self.norm, self.head, self.post = nn.BatchNorm2d(11), nn.Conv2d(11, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.post(self.head(torch.relu(self.norm(torch.cat([self.a(x), self.b(x)], 1)))))


@pytest.mark.parametrize("quiet, changes", [(slice(0, 6), False), (slice(6, 11), True)])
def test_a_consumer_reading_other_layers_keeps_their_share_of_its_variance(quiet, changes):
    """With ``a``'s columns of ``head`` made tiny, ``a`` explains almost none of ``post``'s
    variance and removing half of its channels leaves ``post`` as it was; with ``b``'s made
    tiny, ``a`` explains almost all of it and the variance correction acts in full."""
    torch.manual_seed(0)
    model = TwoBranches().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5), model.norm.bias.uniform_(-0.5, 0.5)
        model.head.weight[:, quiet] *= 1e-3
        explained = torch.relu(model.norm(torch.cat([model.a(X), model.b(X)], 1)))
        model.post.running_var.copy_(model.head(explained).var(dim=(0, 2, 3)))
    restored, _ = lbyl.restore(model, X, kept={"a": [0, 2, 4]})
    ratio = restored.post.running_var / model.post.running_var
    if changes:
        assert (ratio < 0.99).any()
    else:
        assert torch.allclose(ratio, torch.ones(3), atol=1e-4)


def test_a_restored_dense_block_saves_and_loads(tmp_path):
    """Rebuilding from the plan removes the same BatchNorm entries as the restoration did."""
    from lbyl.io import load_restored, save_restored

    restored, report = lbyl.restore(dense_block(), X, 0.5, layers="all")
    folder = save_restored(restored, report, tmp_path / "restored", "dense-block")
    loaded, _ = load_restored(folder, DenseBlock())
    with torch.no_grad():
        assert torch.equal(loaded(X), restored(X))
    assert (loaded.norm1.num_features, loaded.norm2.num_features) == (restored.norm1.num_features, restored.norm2.num_features)
