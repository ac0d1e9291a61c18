"""Model weights: torchvision cache, local files, clear errors, and no code run while loading.

ImageNet downloads are checked against a real HTTP server on 127.0.0.1 (never another address)
that serves a resnet18 state dict under a torchvision-style name carrying its sha256 prefix.
"""

import hashlib
import pickle
import subprocess
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

from carbrand.checkpoint import load_training_checkpoint
from carbrand.errors import CarbrandError, ConfigError
from carbrand.model import build_model
from carbrand.weights import imagenet_weights_path
from tests.helpers.paths import HELPERS, REPO
from tests.helpers.subprocesses import assert_ok, subprocess_environment
from tests.helpers.training_runs import train_command


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


def test_an_unknown_architecture_names_the_key_and_where_names_come_from():
    with pytest.raises(ConfigError, match=r"config key 'model.arch': 'vit_b_16' is neither a torchvision ResNet .* nor a timm model"):
        build_model("vit_b_16", 5)  # torchvision's name; timm calls it vit_base_patch16_224


def test_dropout_and_stochastic_depth_reach_a_timm_model_and_act_in_training_only():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 64, 64)
    plain = build_model("tf_efficientnet_lite0", 5).train()
    dropping = build_model("tf_efficientnet_lite0", 5, drop_rate=0.3, drop_path_rate=0.2)
    dropping.load_state_dict(plain.state_dict())
    rates = [block.drop_path.drop_prob for stage in dropping.blocks for block in stage
             if hasattr(block.drop_path, "drop_prob")]
    assert dropping.drop_rate == 0.3 and rates and 0 < max(rates) <= 0.2
    with torch.no_grad():
        assert torch.equal(plain(images), plain(images)), "without the rates a training-mode pass is deterministic"
        assert not torch.allclose(dropping(images), dropping(images)), "dropout / drop path never dropped anything"
        dropping.eval()
        plain.eval()
        dropping.load_state_dict(plain.state_dict())  # the training passes moved each one's BatchNorm statistics
        assert torch.equal(dropping(images), dropping(images))
        torch.testing.assert_close(dropping(images), plain(images))  # evaluation: the same network


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


@dataclass
class WeightsServer:
    folder: Path  # what the server serves
    base_url: str  # http://127.0.0.1:PORT/
    requests: Counter  # GET requests per file name

    def publish(self, state: dict[str, torch.Tensor], named_hash: str | None = None) -> tuple[str, dict]:
        """Serve `state` as resnet18-<hash>.pth, the hash being its own sha256 prefix unless `named_hash` lies."""
        staging = self.folder / "staging.pth"
        torch.save(state, staging)
        name = f"resnet18-{named_hash or hashlib.sha256(staging.read_bytes()).hexdigest()[:8]}.pth"
        staging.rename(self.folder / name)
        return self.base_url + name, state


@pytest.fixture
def weights_server(tmp_path):
    folder, requests = tmp_path / "served", Counter()
    folder.mkdir()

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self):
            requests[self.path.lstrip("/")] += 1
            super().do_GET()

        def log_message(self, *args):  # quiet: the counts are what the tests read
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield WeightsServer(folder, f"http://127.0.0.1:{server.server_address[1]}/", requests)
    server.shutdown()
    server.server_close()


def random_resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).state_dict()


def local_only_environment(torch_home: Path) -> dict[str, str]:
    """An empty TORCH_HOME; no proxy, so 127.0.0.1 is reached directly."""
    env = subprocess_environment()
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(proxy, None)
    env.update(TORCH_HOME=str(torch_home), no_proxy="127.0.0.1", NO_PROXY="127.0.0.1")
    return env


@pytest.mark.slow
def test_two_processes_on_an_empty_cache_download_imagenet_weights_once(weights_server, prepared_cars5, tmp_path):
    """A fresh machine: TORCH_HOME does not exist yet; 2 ranks over gloo; the file is fetched once and used."""
    url, served = weights_server.publish(random_resnet18_state(seed=7))
    torch_home, run_dir = tmp_path / "torch_home", tmp_path / "run"
    env = local_only_environment(torch_home) | {"CARBRAND_TEST_WEIGHTS_URL": f"resnet18={url}"}
    # The backbone is frozen for the one step trained (learning rate 0): its parameters stay the served ones.
    command = train_command(prepared_cars5, run_dir, "data.loader=torchvision", "model.pretrained=imagenet",
                            "model.freeze_backbone_epochs=1", "train.max_steps=1", num_processes=2)
    command[command.index(str(REPO / "carbrand" / "train.py"))] = str(HELPERS / "mirrored_weights_train.py")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert_ok(result)
    name = url.rsplit("/", 1)[1]
    assert weights_server.requests == Counter({name: 1}), weights_server.requests
    cache = torch_home / "hub" / "checkpoints"
    assert [p.name for p in cache.iterdir()] == [name], "exactly the file, no temporary left"
    exported = load_file(str(run_dir / "best" / "model.safetensors"))
    parameters = {name for name, _ in torchvision.models.resnet18().named_parameters() if not name.startswith("fc.")}
    assert parameters and all(torch.equal(exported[key], served[key]) for key in parameters)


def test_a_download_with_the_wrong_hash_is_refused_and_nothing_is_kept(weights_server, tmp_path, monkeypatch):
    url, _ = weights_server.publish(random_resnet18_state(seed=8), named_hash="0123abcd")  # the name lies
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for proxy in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setattr(torchvision.models.get_model_weights("resnet18").DEFAULT.value, "url", url)
    with pytest.raises(CarbrandError) as error:
        build_model("resnet18", 5, pretrained="imagenet")
    message = str(error.value)
    actual = hashlib.sha256((weights_server.folder / url.rsplit("/", 1)[1]).read_bytes()).hexdigest()
    assert "\n" not in message and url in message and "0123abcd" in message and actual in message, message
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    assert list(cache.iterdir()) == [], "the refused download left a file in the cache"


def test_brand_logits_give_the_summed_car_model_probabilities_without_overflow():
    from carbrand.model import BrandsFromCarModels

    brand_of = [0, 2, 2, 1, 2, 0]
    to_brands = BrandsFromCarModels(brand_of, num_brands=3)
    logits = torch.randn(8, 6) * 5
    summed = torch.zeros(8, 3).index_add_(1, torch.tensor(brand_of), logits.softmax(dim=1))
    assert torch.allclose(to_brands(logits).softmax(dim=1), summed, atol=1e-6)
    huge = torch.tensor([[1e4, -1e4, 0.0, 3e4, 1.0, 2.0]]).half()  # fp16 under autocast: no inf - inf
    assert torch.isfinite(to_brands(huge)).all() and to_brands(huge).argmax().item() == 1
