"""lbyl.counting gives Torch-Pruning's parameter and MAC counts without its deep copy."""
import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

import lbyl
from lbyl import counting
from lbyl.graph import build_dependency_graph
from lbyl.models.registry import build_model, example_input


def reference(model, inputs):
    macs, params = tp.utils.count_ops_and_params(model, inputs)
    return macs, params


class SharedActivation(nn.Module):
    """One ReLU module used three times, one registered twice, an Upsample and several norms."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.relu = nn.ReLU()
        self.again = self.relu  # registered under two names: the reference counts it twice
        self.up = nn.Upsample(scale_factor=2)
        self.deconv = nn.ConvTranspose2d(8, 4, 2, stride=2, bias=False)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.relu(self.gn(self.conv1(x)))
        x = self.relu(self.up(x))
        x = self.relu(self.inorm(self.deconv(x)))
        return self.fc(self.ln(self.pool(x).flatten(1)))


class DataDependent(nn.Module):
    """A forward that needs real values (cannot run on the meta device)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        if float(y.abs().sum()) >= 0:  # always true, but only real tensors can tell
            y = torch.relu(y)
        return self.fc(y.mean(dim=(2, 3)))


class WithAttention(nn.Module):
    """A type the reference counts but lbyl.counting has no formula for."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        x = self.fc(x)
        return self.attention(x, x, x)[0]


REGISTRY = ["lenet-300-100", "demo-cnn", "resnet20", "vgg16-bn-cifar", "resnet18", "resnet50"]


def small_input(name, batch=1):
    """The registry's input, at 64 x 64 for the ImageNet models (they accept any size) to keep tests quick."""
    x = example_input(name, batch=batch)
    return x[..., :64, :64] if x.shape[-1] == 224 else x


@pytest.mark.parametrize(
    "batch, name",
    [pytest.param(b, n, marks=pytest.mark.slow) if (b, n) == (1, "resnet50") else (b, n)
     for b in (1, 3) for n in REGISTRY],  # fmt: skip
)
def test_registry_models_match_reference(name, batch):
    model = build_model(name).eval()
    inputs = small_input(name, batch=batch)
    assert counting.count_ops_and_params(model, inputs) == reference(model, inputs)


@pytest.mark.parametrize("factory", [SharedActivation, DataDependent])
def test_unusual_modules_match_reference(factory):
    torch.manual_seed(0)
    model = factory().eval()
    inputs = torch.randn(2, 3, 8, 8)
    assert counting.count_ops_and_params(model, inputs) == reference(model, inputs)


def test_unknown_type_falls_back_to_reference():
    model = WithAttention().eval()
    inputs = torch.randn(2, 5, 8)
    assert not counting.supported(model)
    assert counting.count_ops_and_params(model, inputs) == reference(model, inputs)


@pytest.mark.parametrize(
    "name", ["resnet20", pytest.param("resnet50", marks=pytest.mark.slow), "vgg16-bn-cifar", "lenet-300-100"]
)
def test_pruned_models_match_reference(name):
    model = build_model(name).eval()
    inputs = small_input(name)
    restored, report = lbyl.restore(model, inputs, 0.4, method="prune")
    assert counting.count_ops_and_params(restored, inputs) == reference(restored, inputs)
    assert (report.macs_before, report.params_before) == tuple(map(int, reference(model, inputs)))
    assert (report.macs_after, report.params_after) == tuple(map(int, reference(restored, inputs)))


def test_tally_rides_along_the_dependency_trace():
    model = build_model("resnet20").eval()
    inputs = example_input("resnet20", batch=2)
    with counting.counting(model) as tally:
        build_dependency_graph(model, inputs)
    assert tally.complete
    assert tally.macs == reference(model, inputs)[0]


def test_counting_leaves_model_unchanged():
    model = build_model("demo-cnn").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    counting.count_ops_and_params(model, example_input("demo-cnn"))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


class TakesATuple(nn.Module):
    """forward(pair) with a tuple argument: model(*inputs) fails, model(inputs) would not."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 2, 3)

    def forward(self, pair):
        return self.conv2(torch.relu(self.bn(self.conv1(pair[0] + pair[1]))))


def test_restore_still_rejects_inputs_the_model_cannot_take_as_arguments():
    inputs = (torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="cannot run on example_inputs"):
        lbyl.restore(TakesATuple().eval(), inputs, 0.5)


class Concatenated(nn.Module):
    """Two pruned branches joined by a concatenation, then a counted activation and pooling."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(14, 4, 3)

    def forward(self, x):
        joined = torch.cat([self.bn_a(self.a(x)), self.bn_b(self.b(x))], dim=1)
        return self.head(self.pool(self.relu(joined)))


@pytest.mark.parametrize("name", ["resnet50", "vgg16-bn-cifar", "lenet-300-100"])
def test_recount_without_a_forward_pass(name):
    model = build_model(name).eval()
    inputs = small_input(name, batch=2)
    with counting.counting(model, record=True) as tally:
        build_dependency_graph(model, inputs)
    assert tally.resolve()
    restored, _ = lbyl.restore(model, inputs, 0.3, method="prune", inplace=True)
    assert tally.macs_after() == reference(restored, inputs)[0]


def test_concatenation_is_recounted_by_running_the_model():
    torch.manual_seed(0)
    model = Concatenated().eval()
    inputs = torch.randn(2, 3, 8, 8)
    with counting.counting(model, record=True) as tally:
        build_dependency_graph(model, inputs)
    assert not tally.resolve()  # the activation reads a concatenation
    restored, report = lbyl.restore(model, inputs, 0.5)
    assert report.layers and (report.macs_after, report.params_after) == tuple(map(int, reference(restored, inputs)))
    assert report.macs_before == int(reference(model, inputs)[0])
