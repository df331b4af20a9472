"""python -m lbyl.train: recipes per model, repeatable runs."""
import importlib.util
import os

import pytest
import torch

from lbyl import train


def test_every_recipe_is_a_registry_model_and_others_are_refused():
    assert set(train.RECIPES) == {"demo-cnn", "vit-fashion"}
    assert train.recipe_of("VIT_FASHION") is train.RECIPES["vit-fashion"]
    with pytest.raises(ValueError, match="no recipe for 'resnet20'.*demo-cnn, vit-fashion"):
        train.recipe_of("resnet20")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="vit-fashion is torchvision's VisionTransformer; the torch 2.14 CI run has torchvision")  # fmt: skip
def test_vit_training_is_repeatable(tmp_path):
    try:
        train.load_fashion_mnist("train")
    except FileNotFoundError as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"FashionMNIST training set missing on CI: {error}")
        pytest.skip(f"FashionMNIST training set not available: {error}")
    torch.set_num_threads(1)
    runs = [train.train(epochs=1, limit=256, batch_size=64, progress=False, model_name="vit-fashion") for _ in range(2)]
    first, second = (m.state_dict() for m in runs)
    assert all(torch.equal(first[k], second[k]) for k in first)
    fresh = train.build_model("vit-fashion")
    assert not torch.equal(first["encoder.layers.encoder_layer_0.mlp.0.weight"], fresh.state_dict()["encoder.layers.encoder_layer_0.mlp.0.weight"])
    path = train.save_state_dict(runs[0], tmp_path / "vit.safetensors", "vit-fashion")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata()["model"] == "vit-fashion"
