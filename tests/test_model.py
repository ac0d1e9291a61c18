"""Model weights: torchvision cache, local files, clear errors, and no code run while loading."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from carbrand.checkpoint import load_training_checkpoint
from carbrand.errors import CarbrandError
from carbrand.model import build_model, imagenet_weights_path


class Payload:
    """Unpickling this runs os.system: a safe loader must refuse it, not run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (__import__("os").system, (f"touch {self.marker}",))


def test_imagenet_weights_come_from_the_torchvision_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, _ = imagenet_weights_path("resnet18")
    assert path.parent == tmp_path / "hub" / "checkpoints"
    path.parent.mkdir(parents=True)
    torch.manual_seed(1)
    reference = build_model("resnet18", 1000)
    torch.save(reference.state_dict(), path)  # what torchvision's download leaves there
    model = build_model("resnet18", 5, pretrained="imagenet")
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 5


def test_imagenet_weights_offline_give_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")  # a closed local port: fails at once, offline or not
    path, url = imagenet_weights_path("resnet50")
    with pytest.raises(CarbrandError) as error:
        build_model("resnet50", 5, pretrained="imagenet")
    message = str(error.value)
    assert str(path) in message and url in message and "\n" not in message


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_weight_file_loads_the_backbone(tmp_path, suffix):
    torch.manual_seed(2)
    source = build_model("resnet18", 10)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # a DDP-wrapped save
    path = tmp_path / f"weights{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    model = build_model("resnet18", 5, pretrained=str(path))
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "r50.pt"
    torch.save(build_model("resnet50", 5).state_dict(), path)
    with pytest.raises(CarbrandError, match="does not fit"):
        build_model("resnet18", 5, pretrained=str(path))


def test_missing_weight_file(tmp_path):
    with pytest.raises(CarbrandError, match="not found"):
        build_model("resnet18", 5, pretrained=str(tmp_path / "nope.pt"))


def test_pickle_payload_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "executed"
    weights = tmp_path / "evil.pt"
    weights.write_bytes(pickle.dumps({"fc.weight": Payload(marker)}))
    with pytest.raises(CarbrandError):
        build_model("resnet18", 5, pretrained=str(weights))
    checkpoint = tmp_path / "step_1"
    checkpoint.mkdir()
    save_file({"x": torch.zeros(1)}, str(checkpoint / "model.safetensors"))
    (checkpoint / "training_state.pt").write_bytes(pickle.dumps({"progress": Payload(marker)}))
    with pytest.raises(CarbrandError, match="cannot be loaded safely"):
        load_training_checkpoint(checkpoint)
    assert not marker.exists()
