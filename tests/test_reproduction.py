"""The published LeNet-300-100 / FashionMNIST table is reproduced (method note, section 5) by
benchmarks/reproduce_lenet.py, every cell through ``lbyl.restore`` with a method object.

Needs the authors' checkpoint under the shared assets root ($LBYL_ASSETS, default
../shared/assets) and the FashionMNIST test set (Debian package
dataset-fashion-mnist, or $LBYL_FASHION_MNIST). Without them the tests skip,
except under CI=true, where a missing asset is a failure.
"""
from __future__ import annotations

import os

import pytest
import torch

import lbyl
from benchmarks import reproduce_lenet as reproduce
from lbyl.data import evaluate
from lbyl.delivery import ProducerStats, gcv_lambda2, lbyl_paper_delivery, nm_delivery, nm_paper_delivery

TOLERANCE = 0.15  # points of top-1 accuracy


def _missing(message: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: the reproduction assets must be present)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def setup():
    checkpoint, dataset_dir = reproduce.lenet_paths()
    if not checkpoint.is_file():
        _missing(f"LeNet-300-100 checkpoint not found at {checkpoint}; set LBYL_ASSETS to the shared assets folder")
    stems = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    if not all((dataset_dir / f"{stem}.gz").is_file() or (dataset_dir / stem).is_file() for stem in stems):
        _missing(
            f"FashionMNIST test files not found in {dataset_dir}; install dataset-fashion-mnist "
            "or set LBYL_FASHION_MNIST"
        )
    return reproduce.load_lenet_setup()


@pytest.fixture(scope="module")
def one_thread():
    # a tiny MLP: extra threads only add contention on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_unpruned_accuracy(setup, one_thread):
    accuracy = evaluate(setup.model, setup.images, setup.labels, batch_size=2000)
    assert accuracy == pytest.approx(reproduce.LENET_UNPRUNED, abs=0.005)


@pytest.mark.parametrize("ratio", reproduce.LENET_RATIOS)
@pytest.mark.parametrize("method, column", [("lbyl-paper", "lbyl"), ("prune", "prune")])
def test_published_cell(setup, one_thread, method, column, ratio):
    published = reproduce.LENET_PUBLISHED[ratio][column]
    ours, _ = reproduce.restored_accuracy(setup, ratio, reproduce.table_method(method, ratio))
    assert abs(ours - published) <= TOLERANCE, f"{method} at {ratio:.0%}: {ours:.2f}, published {published:.2f}"


@pytest.mark.parametrize("ratio", [0.6, 0.7, 0.8])
def test_published_nm_cell_with_the_released_threshold(setup, one_thread, ratio):
    method = reproduce.table_method("nm-paper", ratio)
    assert method == lbyl.paper.NeuronMerging(threshold=reproduce.NM_PAPER_THRESHOLD)
    ours, _ = reproduce.restored_accuracy(setup, ratio, method)
    published = reproduce.LENET_PUBLISHED[ratio]["nm"]
    assert abs(ours - published) <= TOLERANCE, f"nm-paper at {ratio:.0%}: {ours:.2f}, published {published:.2f}"


def test_80_percent_row_keeps_60_and_20(setup):
    _, report = reproduce.restored_accuracy(setup, 0.8, "prune")
    assert [(layer.name, layer.channels_after) for layer in report.layers] == [("ip1", 60), ("ip2", 20)]
    kept = reproduce.float_keep(setup.model, 0.8)  # the float product truncated: the variant's 59/19
    assert (len(kept["ip1"]), len(kept["ip2"])) == (59, 19)
    assert set(kept["ip1"]) < set(report.layers[0].kept)  # the same ranking, one neuron fewer


def test_merge_counter_counts_the_merged_neurons(setup):
    counter = reproduce.MergeCounter(reproduce.NM_PAPER_THRESHOLD)
    reproduce.restored_accuracy(setup, 0.5, counter)
    assert 0 < counter.merged < 150 + 50  # the threshold leaves some of the 200 pruned neurons unmerged


# --- asset-free checks of the pieces the reproduction relies on ---


def _no_bn_stats(seed: int = 0) -> ProducerStats:
    gen = torch.Generator().manual_seed(seed)
    return ProducerStats(torch.randn(12, 30, generator=gen, dtype=torch.float64),
                         torch.randn(12, generator=gen, dtype=torch.float64))  # fmt: skip


def test_released_ridge_reference_is_the_library_formula():
    stats, kept, pruned = _no_bn_stats(), torch.arange(8), torch.arange(8, 12)
    ours = reproduce.ReleasedRidge(0.3).delivery(stats, kept, pruned, "relu")
    assert torch.allclose(ours, lbyl_paper_delivery(stats, kept, pruned, 0.0, 0.3), atol=1e-10)
    assert not torch.allclose(reproduce.ReleasedRidge(0.3, intercept=False).delivery(stats, kept, pruned, "relu"), ours)
    assert reproduce.ReleasedRidge(0.3).settings()["method"] == "ridge-variant"


def test_weights_only_criterion_drops_the_bias_column():
    filters = torch.tensor([[3.0, 0.0, 0.0], [1.0, 0.0, 9.0]], dtype=torch.float64)
    assert reproduce.weights_only_l2(filters).tolist() == [3.0, 1.0]


def test_nm_paper_without_bn_matches_on_filter_and_bias_and_respects_threshold():
    filters = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.6, 0.8]], dtype=torch.float64)
    bias = torch.tensor([0.0, 5.0, 0.0, 0.0], dtype=torch.float64)
    stats = ProducerStats(filters, bias)
    kept, pruned = torch.tensor([0, 1]), torch.tensor([2, 3])
    paper = nm_paper_delivery(stats, kept, pruned)
    # [0.6, 0.8 | 0] is closer to [1, 0 | 0] (cosine 0.6) than to [0, 1 | 5] (0.16) once the bias is
    # appended; on the weights alone [0, 1] is closer (0.8 against 0.6)
    assert paper[:, 1].nonzero().flatten().tolist() == [0]
    assert nm_delivery(stats, kept, pruned)[:, 1].nonzero().flatten().tolist() == [1]
    expected = torch.tensor([0.9, 0.1, 0.0]).norm() / 1.0
    assert paper[0, 0].item() == pytest.approx(float(expected))
    # channel 2 (cosine 0.99) is merged, channel 3 (cosine 0.6) only dropped under a threshold of 0.7
    thresholded = nm_paper_delivery(stats, kept, pruned, threshold=0.7)
    assert torch.equal(thresholded[:, 0], paper[:, 0])
    assert not thresholded[:, 1].any()
    assert torch.equal(lbyl.paper.NeuronMerging(threshold=0.7).delivery(stats, kept, pruned, "relu"), thresholded)
    # without a bias it is the exact NM
    plain = ProducerStats(filters)
    assert torch.allclose(nm_paper_delivery(plain, kept, pruned), nm_delivery(plain, kept, pruned))


def test_gcv_penalises_noise_and_not_exact_combinations():
    gen = torch.Generator().manual_seed(0)
    kept_filters = torch.randn(8, 200, generator=gen, dtype=torch.float64)
    exact = torch.randn(3, 8, generator=gen, dtype=torch.float64) @ kept_filters
    noise = torch.randn(3, 200, generator=gen, dtype=torch.float64)
    kept, pruned = torch.arange(8), torch.arange(8, 11)
    grid = [10.0**t for t in range(-6, 5)]
    lam_exact = gcv_lambda2(ProducerStats(torch.cat([kept_filters, exact])), kept, pruned, grid=grid)
    lam_noise = gcv_lambda2(ProducerStats(torch.cat([kept_filters, noise])), kept, pruned, grid=grid)
    assert lam_exact == grid[0]
    assert lam_noise > 100
