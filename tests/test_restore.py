"""End-to-end behaviour of lbyl.restore on models with known answers."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import lbyl
from helpers import conv_bn_relu_conv, duplicated_filters_model

X = torch.randn(8, 3, 10, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def relative_error(model, restored, x=X):
    with torch.no_grad():
        ref, out = model(x), restored(x)
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("method", ["nm", "lbyl"])
def test_rescaled_duplicates_are_restored_exactly(method):
    model = duplicated_filters_model()
    restored, report = lbyl.restore(model, X[:1], 0.5, method=method)
    assert report.layers[0].kept == [0, 1, 2]
    assert relative_error(model, restored) < 1e-6


def test_plain_pruning_is_not_exact_on_duplicates():
    model = duplicated_filters_model()
    restored, _ = lbyl.restore(model, X[:1], 0.5, method="prune")
    assert relative_error(model, restored) > 1e-2


def test_nm_paper_factor_is_worse_than_pruning_on_duplicates():
    # copies with a tenth of the gamma: the released factor c (gamma_k/gamma_j)(var_j/var_k)
    # overshoots the exact one (gamma_j/gamma_k) by c^3 (gamma_k/gamma_j)^2 > 9
    model = duplicated_filters_model(gamma=[2.0, 2.0, 2.0, 0.2, 0.2, 0.2])
    errors = {m: relative_error(model, lbyl.restore(model, X[:1], 0.5, method=m)[0]) for m in ("nm-paper", "prune")}
    assert errors["nm-paper"] > errors["prune"]


def _combination_model(activation):
    """Pruned BN outputs are exact linear combinations (several coefficients) of kept ones."""
    model = conv_bn_relu_conv(6, activation=activation, seed=3)
    conv, bn = model[0], model[1]
    gen = torch.Generator().manual_seed(3)
    coefficients = torch.rand(3, 3, generator=gen, dtype=torch.float64) + 0.2  # kept x pruned
    g = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.running_var.uniform_(0.5, 1.5)
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.bias.uniform_(-0.3, 0.3)
        g = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        kept_scaled = g[:3, None] * conv.weight[:3].reshape(3, -1) * 3  # large norms: kept by L2
        conv.weight[:3] = (kept_scaled / g[:3, None]).reshape(3, 3, 3, 3)
        pruned_scaled = coefficients.T @ kept_scaled / 4
        conv.weight[3:] = (pruned_scaled / g[3:, None]).reshape(3, 3, 3, 3)
        b_kept = bn.bias[:3] - g[:3] * bn.running_mean[:3]
        b_pruned = coefficients.T @ b_kept / 4
        bn.bias[3:] = b_pruned + g[3:] * bn.running_mean[3:]
    return model


def test_several_coefficients_leave_only_activation_error():
    # the BN statistics here are not those of real data, so the mean model is off: no correction
    linear = _combination_model(nn.Identity())
    restored, report = lbyl.restore(linear, X[:1], 0.5, lbyl.LBYL(mean_correction=False))
    assert report.layers[0].activation == "identity"
    assert report.layers[0].re < 1e-20 and report.layers[0].be < 1e-20
    assert relative_error(linear, restored) < 1e-6  # linear case: exact

    relu = _combination_model(nn.ReLU())
    restored, report = lbyl.restore(relu, X[:1], 0.5, lbyl.LBYL(mean_correction=False))
    assert report.layers[0].re < 1e-20 and report.layers[0].be < 1e-20
    # ReLU(sum s_k z_k) != sum s_k ReLU(z_k): the activation error remains
    assert relative_error(relu, restored) > 1e-3
    assert relative_error(relu, restored) < relative_error(relu, lbyl.restore(relu, X[:1], 0.5, lbyl.Prune(mean_correction=False))[0])


@pytest.mark.parametrize("method", lbyl.METHODS)
def test_ratio_zero_is_identity(method):
    model = conv_bn_relu_conv(6, seed=5)
    restored, report = lbyl.restore(model, X[:1], 0.0, method=method)
    with torch.no_grad():
        assert torch.equal(model(X), restored(X))
    assert report.params_after == report.params_before


def test_parameter_and_mac_counts_drop_as_predicted():
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    restored, report = lbyl.restore(model, torch.randn(1, 10), 0.5)
    assert [(r.name, r.channels_before, r.channels_after) for r in report.layers] == [("0", 8, 4), ("2", 6, 3)]
    assert report.params_before == 10 * 8 + 8 + 8 * 6 + 6 + 6 * 4 + 4
    assert report.params_after == 10 * 4 + 4 + 4 * 3 + 3 + 3 * 4 + 4
    # Torch-Pruning's counter: in*out + out (bias) per Linear, plus one op per ReLU output
    assert report.macs_before == (10 * 8 + 8 + 8) + (8 * 6 + 6 + 6) + (6 * 4 + 4)
    assert report.macs_after == (10 * 4 + 4 + 4) + (4 * 3 + 3 + 3) + (3 * 4 + 4)
    assert sum(p.numel() for p in restored.parameters()) == report.params_after
    assert restored(torch.randn(2, 10)).shape == (2, 4)


def test_flatten_into_linear_edits_every_slot():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 4 * 4, 3)
    ).double().eval()
    with torch.no_grad():
        model[0].weight[3:] = 0.5 * model[0].weight[:3]
        model[0].bias[3:] = 0.5 * model[0].bias[:3]
        model[1].running_var.fill_(1.0), model[1].running_mean.zero_(), model[1].bias.zero_(), model[1].weight.fill_(1.0)
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    restored, report = lbyl.restore(model, x[:1], 0.5, lbyl.NeuronMerging(mean_correction=False))
    assert report.layers[0].consumers == ["5"]
    assert restored[5].in_features == 3 * 16
    assert relative_error(model, restored, x) < 1e-6


def test_callers_model_untouched():
    model = conv_bn_relu_conv(6, seed=7).train()
    for p in model[0].parameters():
        p.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    restored, _ = lbyl.restore(model, X[:1], 0.5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and restored.training
    assert not model[0].weight.requires_grad and model[3].weight.requires_grad
    assert restored[0].weight.shape[0] == 3 and model[0].weight.shape[0] == 6


def test_inplace_modifies_model():
    model = conv_bn_relu_conv(6, seed=7)
    restored, _ = lbyl.restore(model, X[:1], 0.5, inplace=True)
    assert restored is model and model[0].weight.shape[0] == 3


def test_restore_is_deterministic():
    model = conv_bn_relu_conv(8, seed=2)
    a, _ = lbyl.restore(model, X[:1], 0.4, criterion="random", seed=3)
    b, _ = lbyl.restore(model, X[:1], 0.4, criterion="random", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_report_prints_and_serialises():
    model = conv_bn_relu_conv(6, seed=7)
    _, report = lbyl.restore(model, X[:1], 0.5, lbyl.LBYL(lambda2=0.1))
    text = str(report)
    assert "0" in text and "6 -> 3" in text and "parameters" in text and "cond" in text
    assert f"{report.layers[0].condition:.3g}" in text
    data = lbyl.Report.from_dict(__import__("json").loads(report.to_json()))
    assert data.layers[0].channels_after == 3 and data.settings["lambda2"] == 0.1
    assert data.layers[0].condition == report.layers[0].condition
    assert data.settings == report.settings
    assert [s.name for s in report.skipped] == ["3"]


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "half"])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\)"):
        lbyl.restore(conv_bn_relu_conv(), X[:1], ratio)


def test_unknown_method_and_criterion():
    with pytest.raises(ValueError, match="unknown method 'merge'.*choose one of prune, nm"):
        lbyl.restore(conv_bn_relu_conv(), X[:1], 0.5, method="merge")
    with pytest.raises(ValueError, match="unknown criterion 'norm'.*l2, l1, l2gm, random"):
        lbyl.restore(conv_bn_relu_conv(), X[:1], 0.5, criterion="norm")


def test_no_restorable_layer():
    with pytest.raises(ValueError, match="no restorable layer.*0: its channels are a model output"):
        lbyl.restore(nn.Sequential(nn.Linear(4, 3)), torch.randn(1, 4), 0.5)


def test_nan_weights():
    model = conv_bn_relu_conv()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="0.weight contains NaN or Inf"):
        lbyl.restore(model, X[:1], 0.5)


def test_example_inputs_of_wrong_shape():
    with pytest.raises(ValueError, match=r"cannot run on example_inputs of shape \(1, 5, 10, 10\)"):
        lbyl.restore(conv_bn_relu_conv(), torch.randn(1, 5, 10, 10, dtype=torch.float64), 0.5)


def test_unknown_layer_name_lists_restorable_layers():
    with pytest.raises(ValueError, match="layer 'conv9' is not a restorable layer.*restorable layers: 0"):
        lbyl.restore(conv_bn_relu_conv(), X[:1], 0.5, layers=["conv9"])
