"""Transformer MLP blocks: Linear -> GELU -> [Dropout] -> Linear on token tensors."""
import pytest
import torch
import torch.nn as nn

import lbyl
from lbyl.graph import find_groups
from lbyl.planning import default_layers


class Block(nn.Module):
    """A pre-norm transformer MLP block on (batch, tokens, features): x + fc2(gelu(fc1(ln(x))))."""

    def __init__(self, features=8, hidden=16, approximate="none", functional=False):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(features), nn.Linear(features, hidden), nn.Linear(hidden, features)
        self.act, self.drop, self.functional, self.approximate = nn.GELU(approximate), nn.Dropout(0.1), functional, approximate

    def forward(self, x):
        h = self.fc1(self.ln(x))
        h = nn.functional.gelu(h, approximate=self.approximate) if self.functional else self.act(h)
        return x + self.fc2(self.drop(h))


@pytest.mark.parametrize("approximate, functional", [("none", False), ("tanh", False), ("none", True)])
def test_block_groups_and_reasons(approximate, functional):
    block = Block(approximate=approximate, functional=functional).double().eval()
    groups, skipped = find_groups(block, torch.randn(2, 5, 8, dtype=torch.float64))
    (group,) = groups
    assert group.name == "fc1" and [c.name for c in group.consumers] == ["fc2"]
    assert group.activation.name == "gelu" and group.activation.approximate == approximate
    assert group.input_source.kind == "layernorm"
    assert "fc2" in {s.name for s in skipped}  # its output joins the residual stream


def test_duplicated_neuron_is_restored_exactly():
    """Neurons 8..15 of fc1 copy neurons 0..7 (weights and bias, smaller L2 norm would prune the
    copies: they are scaled down by nothing, so they are pruned explicitly): the delivery hands
    each copy to its original and the block's output is unchanged."""
    torch.manual_seed(0)
    block = Block().double().eval()
    with torch.no_grad():
        block.fc1.weight[8:] = block.fc1.weight[:8]
        block.fc1.bias[8:] = block.fc1.bias[:8]
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    restored, report = lbyl.restore(block, x[:1], kept={"fc1": list(range(8))})
    assert restored.fc1.out_features == 8 and restored.fc2.in_features == 8
    with torch.no_grad():
        assert torch.allclose(restored(x), block(x), atol=1e-9)
        pruned, _ = lbyl.restore(block, x[:1], method="prune", kept={"fc1": list(range(8))})
        assert not torch.allclose(pruned(x), block(x), atol=1e-3)
    assert report.layers[0].activation == "gelu"


def _output_errors(block, x, error):
    """``error(restored(x) - block(x))`` after restoring half of fc1 with prune and lbyl; lbyl's report."""
    errors = {}
    for method in ("prune", "lbyl"):
        restored, report = lbyl.restore(block, x[:1], 0.5, method)
        with torch.no_grad():
            errors[method] = float(error(restored(x) - block(x)))
    return errors, report


def test_mean_correction_goes_into_fc2_bias():
    torch.manual_seed(1)
    block = Block(16, 64).double().eval()
    x = torch.randn(20000, 3, 16, dtype=torch.float64)
    errors, _ = _output_errors(block, x, lambda d: d.mean(dim=(0, 1)).abs().max())
    assert errors["lbyl"] < 0.5 * errors["prune"]


def test_transformer_encoder_layer():
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(16, 2, 64, batch_first=True, activation="gelu").eval()
    x = torch.randn(8, 5, 16)
    restored, report = lbyl.restore(layer, x[:1], 0.5)
    assert [r.name for r in report.layers] == ["linear1"] and restored.linear1.out_features == 32
    reasons = {s.name: s.reason for s in report.skipped}
    assert "attention" in reasons["self_attn.out_proj"] and "residual" in reasons["linear2"]
    with torch.no_grad():
        out = restored(x)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


class ConvNeXtLike(nn.Module):
    """Depthwise conv -> channels-last LayerNorm -> Linear -> GELU -> Linear -> layer scale, residual."""

    def __init__(self, dim=8):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.scale = nn.Parameter(torch.full((dim, 1, 1), 0.1))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.fc2(nn.functional.gelu(self.fc1(self.ln(self.dw(x).permute(0, 2, 3, 1)))))
        x = x + self.scale * h.permute(0, 3, 1, 2)
        return self.head(x.mean(dim=(2, 3)))


def test_default_layers_give_a_convnet_its_mlps():
    model = ConvNeXtLike().eval()
    groups, skipped = find_groups(model, torch.randn(1, 8, 10, 10))
    assert [g.name for g in default_layers(groups)] == ["fc1"]
    restored, report = lbyl.restore(model, torch.randn(1, 8, 10, 10), 0.5)
    assert restored.fc1.out_features == 16 and report.macs_after < report.macs_before


def test_small_vision_transformer():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(3)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    restored, report = lbyl.restore(model, x[:1], 0.5)
    names = [r.name for r in report.layers]
    assert names == [f"encoder.layers.encoder_layer_{i}.mlp.0" for i in range(2)]
    reasons = {s.name: s.reason for s in report.skipped}
    assert "attention" in reasons["encoder.layers.encoder_layer_0.self_attention.out_proj"]
    with torch.no_grad():
        assert bool(torch.isfinite(restored(x)).all())
    assert restored.encoder.layers[0].mlp[0].out_features == 32
    assert report.macs_after < report.macs_before


class FunctionalBetween(nn.Module):
    """fc1 -> GELU -> a functional matrix product with another weight -> fc2: not fc2's own product."""

    def __init__(self):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(16, 4)
        self.mix = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        return self.fc2(nn.functional.linear(nn.functional.gelu(self.fc1(self.ln(x))), self.mix))


def test_a_functional_product_is_not_mistaken_for_the_consumer():
    groups, skipped = find_groups(FunctionalBetween().eval(), torch.randn(3, 8))
    assert groups == [] and "fc1" in {s.name for s in skipped}


def test_spanning_kept_neurons_are_solved_after_the_activation():
    """When the kept fc1 rows span the LayerNorm's output space (16 kept rows, 8 features) every
    removed row is rebuilt exactly before the GELU, with large coefficients; the statistics of
    the block then measure the error after the GELU (docs/method.md 5g)."""
    torch.manual_seed(4)
    block = Block(8, 32).double().eval()
    x = torch.randn(4000, 3, 8, dtype=torch.float64)
    errors, report = _output_errors(block, x, lambda d: (d**2).mean())
    assert report.layers[0].solve == "after-activation"
    assert errors["lbyl"] < 0.5 * errors["prune"]
