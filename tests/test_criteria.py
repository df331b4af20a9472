import pytest
import torch

from lbyl.criteria import channel_scores, keep_count, select_channels


@pytest.mark.parametrize(
    "channels, ratio, expected",
    [(300, 0.8, 60), (100, 0.8, 20), (300, 0.5, 150), (10, 0.0, 10), (64, 0.3, 44), (3, 0.9, 1), (16, 0.25, 12)],
)
def test_keep_count_is_exact_floor(channels, ratio, expected):
    assert keep_count(channels, ratio) == expected


def test_keep_count_avoids_float_trap():
    # the naive rule loses a channel here
    assert int(300 * (1 - 0.8)) == 59
    assert keep_count(300, 0.8) == 60


def test_keep_count_keeps_at_least_one():
    assert keep_count(4, 0.99) == 1


def test_l2_keeps_largest_norms():
    filters = torch.diag(torch.tensor([1.0, 5.0, 2.0, 4.0]))
    kept, pruned = select_channels(filters, 0.5, "l2")
    assert kept.tolist() == [1, 3]
    assert pruned.tolist() == [0, 2]


def test_l1_differs_from_l2():
    filters = torch.tensor([[3.0, 0.0, 0.0], [1.5, 1.5, 1.5]])
    assert channel_scores(filters, "l2").argmax() == 0
    assert channel_scores(filters, "l1").argmax() == 1


def test_l2gm_prefers_outliers():
    filters = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0]])
    kept, _ = select_channels(filters, 0.75, "l2gm")
    assert kept.tolist() == [3]


def test_random_is_seeded():
    filters = torch.randn(50, 3)
    a = select_channels(filters, 0.5, "random", seed=1)[0]
    b = select_channels(filters, 0.5, "random", seed=1)[0]
    c = select_channels(filters, 0.5, "random", seed=2)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_unknown_criterion_names_choices():
    with pytest.raises(ValueError, match="l2gm"):
        channel_scores(torch.randn(3, 3), "l3")
