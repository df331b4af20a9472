"""Conv/Linear subclasses: a probe decides whether they use their weight as the base layer does."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lbyl
from lbyl.layouts import probe


class SamePadding(nn.Conv2d):
    """TensorFlow's "same" padding in forward: one more pixel at the right and bottom."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Standardised(nn.Conv2d):
    """Weight standardisation (BiT's StdConv2d): editing the weight does not do what it does in a conv."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class Flipped(nn.Conv2d):
    """Reads its input channels in reverse: column i is not input channel i."""

    def forward(self, x):
        return super().forward(x.flip(1))


class Renamed(nn.Linear):
    pass


@pytest.mark.parametrize("layer, shape", [
    (SamePadding(4, 6, 3, stride=2), (1, 4, 9, 9)),
    (SamePadding(6, 6, 3, groups=6), (1, 6, 9, 9)),
    (SamePadding(6, 4, 3, groups=2), (1, 6, 9, 9)),
    (Renamed(5, 3), (2, 7, 5)),
])  # fmt: skip
def test_plain_uses_pass(layer, shape):
    assert probe(layer, shape) is None


@pytest.mark.parametrize("layer, why", [
    (Standardised(4, 6, 3), "Standardised does not use its weight as a plain Conv2d does"),
    (Flipped(4, 6, 1), "Flipped does not use its weight as a plain Conv2d does"),
    (nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 6, 3)),
     "ParametrizedConv2d computes its weight in forward (a parametrisation): not a plain Conv2d"),
])  # fmt: skip
def test_other_uses_are_refused(layer, why):
    assert probe(layer, (1, 4, 9, 9)) == why


def net(conv):
    torch.manual_seed(0)
    model = nn.Sequential(conv(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), conv(8, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()  # fmt: skip
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    return model


def test_a_subclass_that_pads_in_forward_is_restored_like_the_plain_layers():
    x = torch.randn(2, 3, 12, 12)
    same, plain = net(SamePadding), net(nn.Conv2d)  # the same weights
    plain[0] = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), plain[0])
    plain[3] = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), plain[3])
    with torch.no_grad():
        assert torch.equal(same(x), plain(x))
    restored, report = lbyl.restore(same, x[:1], 0.5)
    expected, expected_report = lbyl.restore(plain, x[:1], 0.5)
    with torch.no_grad():
        assert torch.allclose(restored(x), expected(x), atol=1e-6)
    assert [layer.name for layer in report.layers] == ["0", "3"]  # the plain model: "0.1", "3.1"
    assert (report.macs_before, report.macs_after) == (expected_report.macs_before, expected_report.macs_after)
    assert report.macs_after < report.macs_before


def test_a_reparametrised_subclass_is_skipped_with_the_reason():
    with pytest.raises(ValueError, match=r"Skipped: 0: Standardised does not use its weight as a plain Conv2d does"):
        lbyl.restore(net(Standardised), torch.randn(1, 3, 12, 12), 0.5, layers=["0"])


def test_a_restored_model_with_subclasses_saves_and_loads(tmp_path):
    from lbyl.io import load_restored, save_restored

    x = torch.randn(2, 3, 12, 12)
    restored, report = lbyl.restore(net(SamePadding), x[:1], 0.5)
    loaded, _ = load_restored(save_restored(restored, report, tmp_path / "restored", "same"), net(SamePadding))
    with torch.no_grad():
        assert torch.equal(loaded(x), restored(x))
