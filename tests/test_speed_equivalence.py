"""The batched LBYL solve (one factorisation per layer) equals one least-squares solve per neuron.

Also: the shared-products path of ``restore`` (each method's ``solve``) gives the
delivery matrix of the method's pure formula and the loss terms of ``restoration_loss``.
No timings here: speed is measured by ``python -m lbyl.bench.speed``.
"""
import pytest
import torch
import torch.nn as nn

import lbyl
from lbyl.bench.reference import lbyl_delivery_per_neuron
from lbyl.bench.speed import realistic_batchnorm
from lbyl.criteria import select_channels
from lbyl.delivery import (
    lbyl_delivery, lbyl_paper_delivery, nm_delivery, nm_paper_delivery, prune_delivery, restoration_loss,
)  # fmt: skip
from lbyl.methods import METHODS
from lbyl.planning import default_layers, producer_stats
from lbyl.graph import find_groups
from lbyl.models.registry import build_model, example_input

LAMBDAS = [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (1.0, 0.05)]


def relative_difference(a, b):
    """``max |A - B| / max |B|``: the matrices' agreement relative to their scale."""
    scale = b.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float((a - b).abs().max() / scale)


class NarrowInput(nn.Module):
    """A 1x1 convolution from 3 inputs to 16 channels: with lambdas 0 the normal equations are singular."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 4, 3)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


def method_and_formula(name, lambda1, lambda2):
    """The method object of ``name`` with these lambdas, and the pure delivery function it must equal."""
    if name == "lbyl":
        return lbyl.LBYL(lambda1, lambda2), lambda s, k, p: lbyl_delivery(s, k, p, lambda1, lambda2)
    if name == "lbyl-paper":
        return lbyl.paper.LBYL(lambda1, lambda2), lambda s, k, p: lbyl_paper_delivery(s, k, p, lambda1, lambda2)
    formulas = {"prune": lambda s, k, p: prune_delivery(k, p), "nm": nm_delivery, "nm-paper": nm_paper_delivery}
    return lbyl.as_method(name), formulas[name]


def layer_stats(model, inputs):
    groups, _ = find_groups(model.eval(), inputs)
    return [(g.name, producer_stats(g)) for g in default_layers(groups)]


@pytest.fixture(scope="module")
def resnet20_layers():
    model = build_model("resnet20")
    realistic_batchnorm(model, example_input("resnet20", batch=4), seed=1)
    return layer_stats(model, example_input("resnet20"))


@pytest.mark.parametrize("lambda1, lambda2", LAMBDAS)
@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_batched_equals_per_neuron_on_resnet20(resnet20_layers, ratio, lambda1, lambda2):
    for name, stats in resnet20_layers:
        kept, pruned = select_channels(stats.filters, ratio)
        batched = lbyl_delivery(stats, kept, pruned, lambda1, lambda2)
        per_neuron = lbyl_delivery_per_neuron(stats, kept, pruned, lambda1, lambda2)
        assert batched.shape == per_neuron.shape == (len(kept), len(pruned))
        assert relative_difference(batched, per_neuron) < 1e-8, name


@pytest.mark.parametrize("lambda1, lambda2", LAMBDAS)
def test_batched_equals_per_neuron_when_rank_deficient(lambda1, lambda2):
    torch.manual_seed(0)
    model = NarrowInput()
    realistic_batchnorm(model, torch.randn(4, 3, 8, 8), seed=2)
    [(name, stats)] = layer_stats(model, torch.randn(1, 3, 8, 8))
    kept, pruned = select_channels(stats.filters, 0.25)  # 12 kept filters of 3 entries each
    batched = lbyl_delivery(stats, kept, pruned, lambda1, lambda2)
    per_neuron = lbyl_delivery_per_neuron(stats, kept, pruned, lambda1, lambda2)
    assert relative_difference(batched, per_neuron) < 1e-8


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lambda1, lambda2", LAMBDAS)
def test_shared_products_give_the_same_delivery_and_loss(resnet20_layers, method, lambda1, lambda2):
    for name, stats in resnet20_layers:
        kept, pruned = select_channels(stats.filters, 0.5)
        solver, formula = method_and_formula(method, lambda1, lambda2)
        solution = solver.solve(stats, kept, pruned, "identity")
        delivery, loss = solution.delivery, solution.loss
        expected = formula(stats, kept, pruned)
        assert delivery.shape == expected.shape == (len(kept), len(pruned)), name
        expected_loss = restoration_loss(stats, kept, pruned, expected)
        assert relative_difference(delivery, expected) < 1e-8, name
        for term in ("re", "be", "ae"):
            torch.testing.assert_close(loss[term], expected_loss[term], rtol=1e-8, atol=0), (name, term)


def test_nearly_exact_restoration_keeps_its_tiny_residual():
    """Pruned filters that are combinations of kept ones: the residual is rounding-sized, not cancellation-sized."""
    gen = torch.Generator().manual_seed(3)
    kept_filters = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    combination = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    from lbyl.delivery import ProducerStats

    stats = ProducerStats(filters=torch.cat([kept_filters, combination.T @ kept_filters]))
    kept, pruned = torch.arange(6), torch.arange(6, 9)
    loss = lbyl.LBYL().solve(stats, kept, pruned, "identity").loss
    direct = restoration_loss(stats, kept, pruned, lbyl_delivery(stats, kept, pruned))
    assert loss["re"].max() < 1e-24
    torch.testing.assert_close(loss["re"], direct["re"], rtol=0, atol=1e-26)


def test_fold_in_row_blocks_equals_one_block(monkeypatch):
    """Surgery folds large consumers in blocks of output rows; the result does not depend on the block size."""
    from lbyl import surgery

    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(37, 6 * 4, generator=gen)  # a Linear reading 6 channels x 4 flatten slots
    positions = torch.arange(24).reshape(6, 4)
    kept, pruned = torch.tensor([0, 2, 3]), torch.tensor([1, 4, 5])
    delivery = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    monkeypatch.setattr(surgery, "_FOLD_BLOCK_BYTES", 10**9)
    whole = surgery.fold_into_consumer(weight, positions, kept, pruned, delivery)
    monkeypatch.setattr(surgery, "_FOLD_BLOCK_BYTES", 100)  # one row at a time
    blocked = surgery.fold_into_consumer(weight, positions, kept, pruned, delivery)
    assert torch.equal(whole, blocked)
    expected = weight.double().clone()
    expected[:, positions[kept]] += torch.einsum("ojs,kj->oks", weight.double()[:, positions[pruned]], delivery)
    torch.testing.assert_close(blocked, expected.float())
