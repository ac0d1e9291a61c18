"""The classifier: a backbone with its ImageNet head replaced by one for the brands.

`model.arch` names a torchvision ResNet (resnet18 .. resnet152) or any timm model
(`efficientnet_lite0`, `convnext_tiny`, ...; `timm/resnet50` for timm's own ResNet-50).
Weights (`model.pretrained`) come from carbrand/weights.py: torchvision's ImageNet weights,
timm's (fetched by timm into its cache), a local file, or none.

Whatever the architecture, the rest of the product needs two things from it, given here: which
parameters are the head (`head_prefix`: the new head learns at its own rate and is what a
weights file may leave out), and how to make its BatchNorm layers synchronised across ranks.
(Grad-CAM finds the last convolutional stage itself: inference/gradcam.py.)
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from carbrand.config import TORCHVISION_ARCHS
from carbrand.errors import CarbrandError, ConfigError, first_line
from carbrand.weights import (
    check_state_fits,
    imagenet_state_dict,
    load_backbone_file,
    node_local_main_first,
    resolve_weights_path,
    strip_wrapper_prefixes,
)

TIMM_PREFIX = "timm/"  # timm/resnet50: timm's ResNet-50 rather than torchvision's


def build_model(arch: str, num_classes: int, pretrained: str = "none", key_map: str = "auto",
                drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> nn.Module:
    """`arch` with a `num_classes` head; backbone weights from `pretrained` (imagenet | none | PATH). Dropout before the
    head and stochastic depth (timm models only; config validation says so) act in training mode only."""
    if arch in TORCHVISION_ARCHS:
        model = getattr(torchvision.models, arch)(weights=None)
        if pretrained == "imagenet":
            model.load_state_dict(imagenet_state_dict(arch))
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:
        model = build_timm_model(timm_name(arch), num_classes, imagenet=pretrained == "imagenet",
                                 drop_rate=drop_rate, drop_path_rate=drop_path_rate)
    if pretrained not in ("imagenet", "none"):
        load_backbone_file(model, resolve_weights_path(pretrained), head_prefix(model), key_map)
    return model


def load_timm():
    """timm, imported only for timm models: importing it imports wandb, which makes folders in TMPDIR (predict and
    serve of a torchvision export must write nothing)."""
    import timm

    return timm


def timm_name(arch: str) -> str:
    timm = load_timm()
    name = arch.removeprefix(TIMM_PREFIX)
    if not timm.is_model(name):
        raise ConfigError(f"config key 'model.arch': {arch!r} is neither a torchvision ResNet ({', '.join(TORCHVISION_ARCHS)}) "
                          f"nor a timm model (e.g. efficientnet_lite0, convnext_tiny; timm.list_models() lists them)")
    return name


def build_timm_model(name: str, num_classes: int, imagenet: bool, drop_rate: float = 0.0,
                     drop_path_rate: float = 0.0) -> nn.Module:
    """timm's model; with `imagenet`, timm's pretrained weights (fetched by timm once per node into its cache)."""
    timm = load_timm()
    options = dict(num_classes=num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
    if not imagenet:
        model = timm.create_model(name, pretrained=False, **options)
    else:
        with node_local_main_first():  # the node's first process fetches into timm's cache; the others then read it there
            try:
                model = timm.create_model(name, pretrained=True, **options)
            except Exception as error:  # offline, no pretrained weights for this name, proxy: one line either way
                raise CarbrandError(f"timm's ImageNet weights for {name} could not be loaded ({type(error).__name__}: "
                                    f"{first_line(error, 160)}); set HF_HUB_OFFLINE=1 with the weights in timm's cache, "
                                    f"or model.pretrained=PATH to a weights file, or none") from None
    # Some timm families initialise a Linear head uniformly in +-1/sqrt(classes): with 5 brands, +-0.45 per weight,
    # whose logits on 1280 pretrained features start in the tens (a first loss near 7, not ln 5). A small head
    # starts every brand near chance and lets the warm-up move it, as a freshly initialised torchvision head does.
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
    return model


def head_prefix(model: nn.Module) -> str:
    """The state-dict prefix of the classifier head: `fc.` for a torchvision ResNet, timm's `classifier` name otherwise."""
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if pretrained_cfg and pretrained_cfg.get("classifier"):
        return pretrained_cfg["classifier"] + "."
    return "fc."


def is_head_parameter(name: str, prefix: str) -> bool:
    return strip_wrapper_prefixes(name).startswith(prefix)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """SyncBatchNorm in place of every BatchNorm; timm's own converter keeps its fused BatchNorm + activation layers."""
    if getattr(model, "pretrained_cfg", None) is not None:
        return load_timm().layers.convert_sync_batchnorm(model)
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def load_classifier_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a full exported state dict (head included) with a clear error on any mismatch."""
    state = {strip_wrapper_prefixes(k): v for k, v in state.items()}
    check_state_fits(state, model.state_dict(), source)
    model.load_state_dict(state)


class BrandsFromCarModels(nn.Module):
    """Brand logits from car-model logits: the log of the summed probabilities of each brand's models.

    softmax of the result is exactly the car-model softmax summed per brand, so whatever comes after
    (argmax, temperature scaling, top-k, ONNX) sees an ordinary brand classifier.
    """

    def __init__(self, brand_of_car_model: list[int], num_brands: int):
        super().__init__()
        membership = torch.full((num_brands, len(brand_of_car_model)), float("-inf"))
        membership[brand_of_car_model, range(len(brand_of_car_model))] = 0.0
        self.register_buffer("log_membership", membership, persistent=False)  # from car_models.json, not the weights

    def forward(self, car_model_logits: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(car_model_logits.unsqueeze(1) + self.log_membership.to(car_model_logits.dtype), dim=2)


def answer_brands(model: nn.Module, brand_of_car_model: list[int], num_brands: int) -> nn.Module:
    """`model`, trained on car models, with its head followed by BrandsFromCarModels (in place).

    The head is extended rather than the model wrapped: the model keeps its top-level parts, which
    Grad-CAM searches for the last feature map. Load the weights first: the head's keys gain a `.0`.
    """
    parent_name, _, head_name = head_prefix(model).removesuffix(".").rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, head_name, nn.Sequential(getattr(parent, head_name), BrandsFromCarModels(brand_of_car_model, num_brands)))
    return model
