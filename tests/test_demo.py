"""The built-in demo and its bundled checkpoint."""
import os
import pickle

import pytest
import torch

from lbyl.cli import main
from lbyl.data import load_fashion_mnist
from lbyl.demo import DEMO_WEIGHTS, FAST_LIMIT, FAST_RATIOS, demo_weights, load_demo_model
from lbyl.sweep import UNPRUNED, read_csv


def fashion_mnist_test():
    """The FashionMNIST test set; skips without it, but fails in CI where it must be installed."""
    try:
        return load_fashion_mnist("test")
    except FileNotFoundError as error:
        message = f"FashionMNIST test set not available: {error}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def test_checkpoint_is_package_data_and_loads_without_pickle(monkeypatch):
    with demo_weights() as path:
        assert path.name == DEMO_WEIGHTS
        assert path.stat().st_size < 5_000_000

    def refuse(*args, **kwargs):
        raise AssertionError("the demo checkpoint must load without pickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    model = load_demo_model()
    assert not model.training
    # trained BatchNorm statistics, not the defaults of a fresh layer
    assert not torch.allclose(model.bn2.running_var, torch.ones_like(model.bn2.running_var))
    assert int(model.bn2.num_batches_tracked) > 0


def test_bundled_checkpoints_are_named_by_model():
    from lbyl.demo import BUNDLED_WEIGHTS, bundled_weights

    assert BUNDLED_WEIGHTS == {"demo-cnn": DEMO_WEIGHTS, "vit-fashion": "vit-fashion-mnist.safetensors"}
    for name, filename in BUNDLED_WEIGHTS.items():
        with bundled_weights(name) as path:
            assert path.name == filename and 0 < path.stat().st_size < 5_000_000
    with pytest.raises(ValueError, match="no checkpoint of 'resnet20' ships with lbyl"):
        with bundled_weights("resnet20"):
            pass


def test_demo_fast_writes_its_files(capsys, tmp_path):
    fashion_mnist_test()
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"results.csv", "results.md", "accuracy.png"}

    rows = read_csv(out / "results.csv")
    assert len(rows) == 1 + 3 * len(FAST_RATIOS)
    baseline = rows[0]
    assert baseline["method"] == UNPRUNED
    # the bundled model is trained: a random one would score about 10%
    assert 85.0 < baseline["accuracy"] < 97.0
    by_key = {(r["ratio"], r["method"]): r for r in rows[1:]}
    assert set(by_key) == {(ratio, method) for ratio in FAST_RATIOS for method in ("prune", "nm", "lbyl")}
    for ratio in FAST_RATIOS:
        params = {by_key[ratio, m]["params"] for m in ("prune", "nm", "lbyl")}
        assert len(params) == 1 and params.pop() < baseline["params"]
        # restoration must not fall behind plain pruning by more than noise
        assert by_key[ratio, "lbyl"]["accuracy"] >= by_key[ratio, "prune"]["accuracy"] - 1.0

    assert f"{FAST_LIMIT:,} FashionMNIST test images" in stdout
    assert "restore s" in stdout and "results.csv" in stdout
    markdown = (out / "results.md").read_text()
    assert markdown.count("\n| 0.") == len(FAST_RATIOS)
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
