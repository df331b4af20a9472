"""Group detection: the paper's protocol emerges from the generic rule."""
import pytest
import torch
import torch.nn as nn

from lbyl.planning import default_layers
from lbyl.graph import find_groups
from lbyl.models.registry import build_model


def groups_of(model, shape):
    groups, skipped = find_groups(model, torch.randn(*shape))
    return default_layers(groups), {s.name: s.reason for s in skipped}


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_resnet_basic_blocks_prune_conv1(shortcut):
    groups, skipped = groups_of(build_model("resnet20", shortcut=shortcut), (1, 3, 32, 32))
    expected = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    assert [g.name for g in groups] == expected
    for g in groups:
        assert [c.name for c in g.consumers] == [g.name.replace("conv1", "conv2")]
        assert g.bn_name == g.name.replace("conv1", "bn1") and g.activation == "relu"
    assert "residual add" in skipped["layer1.0.conv2"]
    assert "residual add" in skipped["conv1"]  # stem feeds identity shortcuts
    if shortcut == "B":
        assert "residual add" in skipped["layer2.0.shortcut.0"]


def test_resnet56_has_27_groups():
    groups, _ = groups_of(build_model("resnet56"), (1, 3, 32, 32))
    assert len(groups) == 27


def test_bottleneck_resnet_prunes_conv1_and_conv2():
    groups, skipped = groups_of(build_model("resnet50"), (1, 3, 64, 64))
    blocks = [f"layer{s}.{b}" for s, n in zip((1, 2, 3, 4), (3, 4, 6, 3)) for b in range(n)]
    assert [g.name for g in groups] == [f"{b}.conv{i}" for b in blocks for i in (1, 2)]
    assert "projection shortcut" in skipped["conv1"]  # the stem output is the residual stream
    assert "residual add" in skipped["layer1.0.conv3"]


def small_vgg():
    layers, c_in = [], 3
    for c in (8, 16, 16):
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        c_in = c
    return nn.Sequential(
        nn.Sequential(*layers), nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 10)
    )


def test_vgg_prunes_all_convs_last_into_first_linear():
    model = small_vgg()
    groups, _ = groups_of(model, (1, 3, 32, 32))
    assert [g.name for g in groups] == ["0.0", "0.4", "0.8"]
    last = groups[-1].consumers[0]
    assert last.name == "2"
    # channel c owns the 16 flattened columns c*16 .. c*16+15
    assert torch.equal(last.positions, torch.arange(16 * 16).reshape(16, 16))
    all_groups, _ = find_groups(model, torch.randn(1, 3, 32, 32))
    assert [g.name for g in all_groups][-1] == "2"  # the hidden head layer is restorable on request


def test_vgg16_bn_cifar_protocol():
    groups, _ = groups_of(build_model("vgg16-bn-cifar"), (1, 3, 32, 32))
    assert len(groups) == 13
    assert all(isinstance(g.producer, nn.Conv2d) for g in groups)
    assert isinstance(groups[-1].consumers[0].module, nn.Linear)


def test_mlp_prunes_hidden_layers():
    groups, skipped = groups_of(build_model("lenet-300-100"), (1, 1, 28, 28))
    assert [g.name for g in groups] == ["ip1", "ip2"]
    assert [g.consumers[0].name for g in groups] == ["ip2", "ip3"]
    assert "model output" in skipped["ip3"]


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
        self.head = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1))


def test_concat_positions_come_from_offsets():
    groups, _ = find_groups(Concat(), torch.randn(1, 3, 8, 8))
    positions = {g.name: g.consumers[0].positions.flatten().tolist() for g in groups}
    assert positions == {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7, 8, 9]}


@pytest.mark.parametrize(
    "middle, reason",
    [
        (nn.Sequential(nn.BatchNorm2d(6), nn.Softmax(dim=1)), "not an element-wise activation"),
        (nn.Sequential(nn.ReLU(), nn.BatchNorm2d(6)), "after the activation"),
        (nn.Sequential(nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 12, 3, groups=6), nn.Conv2d(12, 6, 1)), "depthwise"),
    ],
)
def test_unsupported_chains_are_skipped_with_reason(middle, reason):
    model = nn.Sequential(nn.Conv2d(3, 6, 3), middle, nn.Conv2d(6, 2, 1)).eval()
    groups, skipped = find_groups(model, torch.randn(1, 3, 12, 12))
    assert "0" not in [g.name for g in groups]
    assert reason in {s.name: s.reason for s in skipped}["0"]


def test_frozen_model_still_traces():
    model = build_model("resnet20").requires_grad_(False)
    groups, _ = find_groups(model, torch.randn(1, 3, 32, 32))
    assert len(groups) == 9
    assert not any(p.requires_grad for p in model.parameters())
