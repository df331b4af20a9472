"""Saving and reloading restored models (lbyl.io): exact round trip and clear errors."""
import hashlib
import json
import pickle

import pytest
import torch

import lbyl
from lbyl.io import PLAN_FILE, REPORT_FILE, WEIGHTS_FILE, RestoredFormatError, load_restored, read_report, save_restored
from lbyl.models.registry import build_model, example_input


def _trained_like(spec: str, seed: int = 0) -> torch.nn.Module:
    """A registry model with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = build_model(spec)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.2)
            module.running_mean.normal_(0, 0.3)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def restored_demo():
    model = _trained_like("demo-cnn")
    restored, report = lbyl.restore(model, example_input("demo-cnn"), 0.5, lbyl.LBYL(lambda1=0.1))
    return restored, report


def test_round_trip_is_bit_identical(tmp_path, restored_demo):
    restored, report = restored_demo
    save_restored(restored, report, tmp_path, "demo-cnn")
    loaded, plan = load_restored(tmp_path)

    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), restored(x))
    assert not loaded.training
    original = restored.state_dict()
    reloaded = loaded.state_dict()
    assert list(reloaded) == list(original)
    assert all(torch.equal(reloaded[k], original[k]) for k in original)
    # the pruned architecture really is smaller
    assert loaded.conv1.out_channels == 16 and loaded.fc1.in_features == 64 * 9

    assert plan["format_version"] == 2 and plan["model"]["class"] == "DemoCNN"
    assert plan["lbyl_version"] == lbyl.__version__
    assert plan["model"] == {"spec": "demo-cnn", "kwargs": {}, "class": "DemoCNN"}
    assert plan["input_shape"] == [1, 1, 28, 28]
    assert plan["method"] == "lbyl" and plan["settings"]["lambda1"] == 0.1
    assert plan["kept"] == {layer.name: layer.kept for layer in report.layers}
    assert plan["weights"]["sha256"] == hashlib.sha256((tmp_path / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert plan["source_weights"] is None
    assert read_report(tmp_path).to_dict() == json.loads(json.dumps(report.to_dict()))


def test_round_trip_of_a_partial_restoration(tmp_path):
    model = _trained_like("lenet-300-100")
    restored, report = lbyl.restore(model, example_input("lenet-300-100"), 0.7, method="nm", layers=["ip2"])
    save_restored(restored, report, tmp_path, "lenet-300-100")
    loaded, plan = load_restored(tmp_path)
    assert list(plan["kept"]) == ["ip2"]
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), restored(x))


class BiasFreeCNN(torch.nn.Module):
    """conv2 has no bias and no BatchNorm after it, so bias correction must create one."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.fc = torch.nn.Linear(6 * 8 * 8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def bias_free_cnn():
    torch.manual_seed(0)
    model = BiasFreeCNN()
    model.bn1.running_mean.normal_(0, 0.5)
    model.bn1.running_var.uniform_(0.5, 2.0)
    model.bn1.bias.data.normal_(0, 0.5)
    return model.eval()


def test_round_trip_keeps_a_bias_created_by_correction(tmp_path):
    spec = f"{__name__}:bias_free_cnn"
    model = build_model(spec)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    restored, report = lbyl.restore(model, x[:1], 0.5, lbyl.LBYL(mean_correction=True), layers=["conv1"])
    assert model.conv2.bias is None and restored.conv2.bias is not None
    save_restored(restored, report, tmp_path, spec, input_shape=(1, 3, 8, 8))
    loaded, _ = load_restored(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), restored(x))


def test_source_weights_are_hashed(tmp_path, restored_demo):
    restored, report = restored_demo
    source = tmp_path / "source.bin"
    source.write_bytes(b"original checkpoint bytes")
    save_restored(restored, report, tmp_path / "out", "demo-cnn", source_weights=source)
    plan = json.loads((tmp_path / "out" / PLAN_FILE).read_text())
    assert plan["source_weights"] == {"file": "source.bin", "sha256": hashlib.sha256(b"original checkpoint bytes").hexdigest()}


def test_import_path_spec_needs_and_stores_input_shape(tmp_path):
    spec = "lbyl.models.demo:demo_cnn"
    model = build_model(spec, num_classes=7).eval()
    x = torch.randn(1, 1, 28, 28)
    restored, report = lbyl.restore(model, x, 0.25)
    # the report records the shape restore traced with; a report without it (older lbyl) needs input_shape
    assert report.input_shapes == [[1, 1, 28, 28]]
    report.input_shapes = []
    with pytest.raises(ValueError, match="input_shape"):
        save_restored(restored, report, tmp_path / "a", spec, model_kwargs={"num_classes": 7})
    save_restored(restored, report, tmp_path / "b", spec, model_kwargs={"num_classes": 7}, input_shape=(1, 1, 28, 28))
    loaded, plan = load_restored(tmp_path / "b")
    assert plan["model"] == {"spec": spec, "kwargs": {"num_classes": 7}, "class": "DemoCNN"}
    with torch.no_grad():
        assert torch.equal(loaded(x), restored(x))
    assert loaded.fc2.out_features == 7


def test_model_kwargs_must_be_json(tmp_path, restored_demo):
    restored, report = restored_demo
    with pytest.raises(ValueError, match="JSON"):
        save_restored(restored, report, tmp_path, "demo-cnn", model_kwargs={"act": torch.nn.ReLU})


def test_changed_weights_fail_the_checksum(tmp_path, restored_demo):
    restored, report = restored_demo
    save_restored(restored, report, tmp_path, "demo-cnn")
    path = tmp_path / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last weight
    path.write_bytes(bytes(data))
    with pytest.raises(RestoredFormatError, match="checksum mismatch"):
        load_restored(tmp_path)


def test_changed_plan_checksum_is_detected(tmp_path, restored_demo):
    restored, report = restored_demo
    save_restored(restored, report, tmp_path, "demo-cnn")
    plan = json.loads((tmp_path / PLAN_FILE).read_text())
    plan["weights"]["sha256"] = "0" * 64
    (tmp_path / PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(RestoredFormatError, match="checksum mismatch"):
        load_restored(tmp_path)


def test_missing_and_corrupt_files_give_clear_errors(tmp_path, restored_demo):
    restored, report = restored_demo
    with pytest.raises(FileNotFoundError, match="not found"):
        load_restored(tmp_path / "nowhere")

    save_restored(restored, report, tmp_path, "demo-cnn")
    plan_text = (tmp_path / PLAN_FILE).read_text()
    (tmp_path / PLAN_FILE).write_text(plan_text[: len(plan_text) // 2])
    with pytest.raises(RestoredFormatError, match="not valid JSON"):
        load_restored(tmp_path)

    (tmp_path / PLAN_FILE).unlink()
    with pytest.raises(RestoredFormatError, match="no plan.json"):
        load_restored(tmp_path)

    (tmp_path / PLAN_FILE).write_text(plan_text)
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(RestoredFormatError, match="model.safetensors not found"):
        load_restored(tmp_path)

    (tmp_path / REPORT_FILE).write_text("{}")
    with pytest.raises(RestoredFormatError, match="not a valid lbyl report"):
        read_report(tmp_path)


def test_corrupt_safetensors_with_matching_checksum(tmp_path, restored_demo):
    restored, report = restored_demo
    save_restored(restored, report, tmp_path, "demo-cnn")
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    plan = json.loads((tmp_path / PLAN_FILE).read_text())
    plan["weights"]["sha256"] = hashlib.sha256(b"not a safetensors file").hexdigest()
    (tmp_path / PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(RestoredFormatError, match="not a readable safetensors file"):
        load_restored(tmp_path)


@pytest.mark.parametrize("version, hint", [(3, "upgrade lbyl"), (0, "re-create it"), ("1", "re-create it")])
def test_incompatible_format_version(tmp_path, restored_demo, version, hint):
    restored, report = restored_demo
    save_restored(restored, report, tmp_path, "demo-cnn")
    plan = json.loads((tmp_path / PLAN_FILE).read_text())
    plan["format_version"] = version
    (tmp_path / PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(RestoredFormatError, match=f"format version.*{hint}"):
        load_restored(tmp_path)


def test_plan_for_another_architecture(tmp_path, restored_demo):
    restored, report = restored_demo
    save_restored(restored, report, tmp_path, "demo-cnn")
    plan = json.loads((tmp_path / PLAN_FILE).read_text())
    plan["model"]["spec"] = "lenet-300-100"
    (tmp_path / PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(ValueError, match="another architecture"):
        load_restored(tmp_path)


def test_loading_never_unpickles(tmp_path, restored_demo, monkeypatch):
    restored, report = restored_demo
    save_restored(restored, report, tmp_path, "demo-cnn")

    def refuse(*args, **kwargs):
        raise AssertionError("pickle must not be used")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    loaded, _ = load_restored(tmp_path)
    assert loaded.conv2.out_channels == 32


def test_version_1_folders_still_load(tmp_path, restored_demo):
    """Folders written before the model class was recorded (format 1) load unchanged."""
    restored, report = restored_demo
    save_restored(restored, report, tmp_path, "demo-cnn")
    plan = json.loads((tmp_path / PLAN_FILE).read_text())
    plan["format_version"] = 1
    del plan["model"]["class"]
    (tmp_path / PLAN_FILE).write_text(json.dumps(plan))
    model, _ = load_restored(tmp_path)
    for (name, a), b in zip(restored.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


class UserNet(torch.nn.Module):
    """A class lbyl's registry does not know, as in a notebook."""

    def __init__(self, width=12):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.BatchNorm2d(width)
        self.conv2, self.head = torch.nn.Conv2d(width, 6, 3, padding=1), torch.nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.head(self.conv2(x).mean(dim=(2, 3)))


class OtherNet(UserNet):
    pass


def _user_restored(tmp_path):
    torch.manual_seed(0)
    net = UserNet().eval()
    small, report = lbyl.restore(net, torch.randn(1, 3, 8, 8), 0.5)
    folder = lbyl.save_restored(small, tmp_path / "user")  # no report, no spec: both known from restore
    return net, small, folder


def test_any_model_saved_and_rebuilt_from_a_fresh_instance(tmp_path):
    net, small, folder = _user_restored(tmp_path)
    fresh = UserNet()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    again, plan = lbyl.load_restored(folder, model=fresh)
    assert plan["model"]["spec"] is None and plan["input_shape"] == [1, 3, 8, 8]
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(again(x), small.eval()(x))
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # the instance is not modified


def test_any_model_errors(tmp_path):
    _, _, folder = _user_restored(tmp_path)
    with pytest.raises(ValueError, match=r"saved without a model spec.*model=UserNet\(\.\.\.\)"):
        lbyl.load_restored(folder)
    with pytest.raises(ValueError, match="is an instance of OtherNet, but the folder holds a restored UserNet"):
        lbyl.load_restored(folder, model=OtherNet())
    with pytest.raises(ValueError, match="model= does not match the saved plan"):
        lbyl.load_restored(folder, model=UserNet(width=4))
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        lbyl.load_restored(folder, model="UserNet")
    with pytest.raises(ValueError, match="no report is known for this model"):
        lbyl.save_restored(UserNet(), tmp_path / "x")
