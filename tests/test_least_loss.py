"""Criterion ``least-loss``: channels ranked by the loss the restoration leaves, and ``auto``."""
import pytest
import torch
import torch.nn as nn

import lbyl
from lbyl.criteria import channel_scores, least_loss_scores
from lbyl.graph import find_groups
from lbyl.planning import consumer_gram, layer_criterion

from test_transformer import Block


def _loss(sigma, gram, kept):
    """tr(V Sigma V^T) minus what least squares on the kept channels explains."""
    kept = list(kept)
    total = torch.trace(sigma @ gram)
    if not kept:
        return float(total)
    b = sigma[:, kept]
    return float(total - torch.trace(torch.linalg.inv(sigma[kept][:, kept]) @ b.T @ gram @ b))


def _problem(n, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, rank or 2 * n, generator=g, dtype=torch.float64)
    v = torch.randn(5, n, generator=g, dtype=torch.float64)
    return a @ a.T / a.shape[1], v.T @ v


@pytest.mark.parametrize("seed", range(4))
def test_scores_follow_the_greedy_elimination_of_the_loss(seed):
    sigma, gram = _problem(10, seed)
    order = torch.argsort(least_loss_scores(sigma, gram, ridge=0.0)).tolist()
    alive, expected = set(range(10)), []
    while len(alive) > 1:  # recompute the loss from scratch for every candidate
        j = min(sorted(alive), key=lambda c: _loss(sigma, gram, alive - {c}))
        expected.append(j)
        alive.remove(j)
    assert order[:-1] == expected


def test_greedy_beats_the_l2_choice_and_stops_where_asked():
    sigma, gram = _problem(12, 7)
    scores = least_loss_scores(sigma, gram)
    partial = least_loss_scores(sigma, gram, removed=5)
    first = torch.argsort(scores)[:5]
    assert torch.equal(torch.argsort(partial)[:5], first) and bool((partial[torch.argsort(partial)[5:]] == 12).all())
    kept_greedy = torch.argsort(scores)[5:].tolist()
    kept_by_variance = torch.argsort(sigma.diagonal())[5:].tolist()
    assert _loss(sigma, gram, kept_greedy) <= _loss(sigma, gram, kept_by_variance)


def test_blocks_of_eliminations_are_the_same_greedy_steps(monkeypatch):
    """Updates applied once per block of steps give the order of one update per step."""
    import lbyl.criteria as criteria

    sigma, gram = _problem(150, 2)
    monkeypatch.setattr(criteria, "BLOCK", 1)
    one_by_one = least_loss_scores(sigma, gram, removed=140)
    monkeypatch.setattr(criteria, "BLOCK", 16)
    assert torch.equal(least_loss_scores(sigma, gram, removed=140), one_by_one)


def test_copies_go_first_one_of_each_pair():
    sigma, gram = _problem(250, 1, rank=400)
    index = torch.cat([torch.arange(250), torch.arange(50)])  # channel 250 + i copies channel i
    order = torch.argsort(least_loss_scores(sigma[index][:, index], gram[index][:, index]))
    first = set(order[:50].tolist())
    assert all((c in first) != (c + 250 in first) for c in range(50))  # one of each pair, never both


def test_the_duplicate_of_a_large_neuron_goes_and_the_block_is_unchanged():
    """fc1 neuron 15 copies neuron 3 (the largest): L2 keeps both, least-loss drops one copy and
    LBYL hands it to the other, so the output is unchanged; the l2 choice loses a neuron."""
    torch.manual_seed(0)
    block = Block().double().eval()
    with torch.no_grad():
        block.fc1.weight[3] *= 3
        block.fc1.bias[3] *= 3
        block.fc1.weight[15], block.fc1.bias[15] = block.fc1.weight[3], block.fc1.bias[3]
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    ratio = 1 / 16
    restored, report = lbyl.restore(block, x[:1], ratio)  # auto: 15 kept neurons span the 8 features
    assert report.layers[0].criterion == "least-loss"
    assert set(range(16)) - set(report.layers[0].kept) in ({3}, {15})
    with torch.no_grad():
        assert torch.allclose(restored(x), block(x), atol=1e-9)
        by_l2, l2_report = lbyl.restore(block, x[:1], ratio, criterion="l2")
        assert {3, 15} <= set(l2_report.layers[0].kept)
        assert not torch.allclose(by_l2(x), block(x), atol=1e-4)


def test_auto_resolves_per_layer():
    x = torch.randn(1, 5, 8)
    block = Block().eval()
    (group,), _ = find_groups(block, x)
    assert layer_criterion(group, 0.5, "auto") == "least-loss"  # keeps 8 of 16: spans the 8 features
    assert layer_criterion(group, 0.6, "auto") == "l2"  # keeps 6: LBYL solves before the activation
    assert layer_criterion(group, 0.6, "l1") == "l1"
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    (conv,), _ = find_groups(cnn, torch.randn(1, 3, 8, 8))
    assert layer_criterion(conv, 0.1, "auto") == "l2"  # with BatchNorm: the paper's criterion


def test_auto_keeps_the_l2_channels_of_batchnorm_networks():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    by_default, report = lbyl.restore(cnn, x, 0.5)
    by_l2, _ = lbyl.restore(cnn, x, 0.5, criterion="l2")
    assert report.settings["criterion"] == "auto" and report.layers[0].criterion == "l2"
    for a, b in zip(by_default.state_dict().values(), by_l2.state_dict().values()):
        assert torch.equal(a, b)


def test_plan_records_the_criterion_of_each_layer_and_reuses_scores_for_a_budget():
    torch.manual_seed(0)
    block = Block(hidden=32).eval()
    x = torch.randn(1, 5, 8)
    plan = lbyl.plan(block, x, 0.5, criterion="least-loss")
    assert plan.criterion == "least-loss" and plan.layers[0].criterion == "least-loss"
    again = lbyl.Plan.from_json(plan.to_json())
    assert again.layers[0].criterion == "least-loss" and again.layers[0].kept == plan.layers[0].kept
    budget = lbyl.plan(block, x, target_params=0.8, criterion="least-loss")
    assert budget.params_after <= 0.8 * budget.params_before
    restored, report = lbyl.restore(block, x, plan)
    assert report.layers[0].kept == plan.layers[0].kept


def test_declared_input_statistics_reach_the_criterion():
    """A first Linear layer reads the network input: its declared mean changes the statistics."""
    torch.manual_seed(3)
    mlp = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 3)).eval()
    x = torch.randn(1, 4)
    plain = lbyl.plan(mlp, x, 0.25, criterion="least-loss").layers[0].kept
    shifted = lbyl.plan(mlp, x, 0.25, criterion="least-loss", input_stats=(3.0, 0.2)).layers[0].kept
    assert plain != shifted


def test_consumer_gram_reads_the_weights_through_which_channels_are_used():
    torch.manual_seed(0)
    block = Block().double().eval()
    (group,), _ = find_groups(block, torch.randn(1, 5, 8, dtype=torch.float64))
    w = block.fc2.weight.detach()
    assert torch.allclose(consumer_gram(group), w.T @ w)
    cnn = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, groups=2)).double().eval()
    (conv,), _ = find_groups(cnn, torch.randn(1, 3, 9, 9, dtype=torch.float64))
    v = cnn[3].weight.detach()  # (4, 3, 3, 3): rows 0-1 read channels 0-2, rows 2-3 channels 3-5
    expected = torch.zeros(6, 6, dtype=torch.float64)
    for g in range(2):
        part = v[2 * g:2 * g + 2].transpose(0, 1).reshape(3, -1)
        expected[3 * g:3 * g + 3, 3 * g:3 * g + 3] = part @ part.T
    assert torch.allclose(consumer_gram(conv), expected)


def test_the_statistical_criteria_need_the_model():
    with pytest.raises(ValueError, match="reads the layer's statistics"):
        channel_scores(torch.randn(4, 3), "least-loss")
    with pytest.raises(ValueError, match="reads the layer's statistics"):
        channel_scores(torch.randn(4, 3), "auto")
