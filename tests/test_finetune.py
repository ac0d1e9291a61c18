"""A timm EfficientNet-Lite0 (tf_efficientnet_lite0) fine-tuned from the weights file goes through the product as a ResNet does.

One short run of configs/cars5_finetune_cpu.yaml (cars5 at 64 px, evaluated at 96, a few steps, EMA on):
the recipe's dropout and drop path are in the model, the head-only warm-up leaves the backbone as
loaded, frozen BatchNorm keeps ImageNet's running statistics,
the backbone learns at optim.backbone_lr_scale of the head's rate; then evaluate (at the eval resolution),
predict with a Grad-CAM overlay, an ONNX export whose contract carries the eval size and normalisation
and whose logits match PyTorch's, and `carbrand serve` answering as predict does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from carbrand.checkpoint import load_export_model
from carbrand.cli import main
from carbrand.config import load_config
from carbrand.data.images import Normalizer, load_rgb
from carbrand.data.torch_loader import eval_transform
from carbrand.training.optimization import Schedule
from carbrand.weights import read_state_dict, resolve_weights_path
from tests.helpers.paths import REPO
from tests.helpers.training_runs import read_metrics

RECIPE = REPO / "configs" / "cars5_finetune_cpu.yaml"
# 266 train images / batch 32 = 8 steps an epoch: epoch 1 head only, then 2 steps of the backbone too.
QUICK = ("data.image_size=64", "data.eval_image_size=96", "data.batch_size=32", "data.workers=0",
         "data.loader=torchvision", "train.epochs=2", "train.max_steps=10", "train.ema_decay=0.5",
         "train.log_every=1", "wandb.mode=disabled")


@pytest.fixture(scope="module")
def finetuned(prepared_cars5, tmp_path_factory) -> tuple[Path, dict[int, dict[str, torch.Tensor]], dict[str, float]]:
    """(run directory, weights after steps 8 and 10, the trained model's dropout rates): the head-only epoch ends at
    step 8."""
    from accelerate.state import AcceleratorState

    import carbrand.train as trainer

    run_dir = tmp_path_factory.mktemp("finetune") / "run"
    config = load_config(RECIPE, [f"data.manifest={prepared_cars5}", f"output.dir={run_dir}", *QUICK])
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    rates: dict[str, float] = {}
    finish_optimizer_step = trainer.finish_optimizer_step

    def recording_step(run) -> None:
        finish_optimizer_step(run)
        model = run.unwrapped_model
        rates["drop_rate"] = model.drop_rate
        rates["drop_path_rate"] = max((b.drop_path.drop_prob for stage in model.blocks for b in stage
                                       if hasattr(b.drop_path, "drop_prob")), default=0.0)
        if run.progress.step in (8, 10):
            snapshots[run.progress.step] = {k: v.detach().clone() for k, v in run.unwrapped_model.state_dict().items()}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(trainer, "finish_optimizer_step", recording_step)
            assert trainer.train(config) == 0
    finally:
        AcceleratorState._reset_state(True)
        torch.set_num_threads(threads)
    return run_dir, snapshots, rates


def test_head_only_warm_up_then_the_backbone_moves_with_batchnorm_frozen(finetuned):
    run_dir, at, _ = finetuned
    source = read_state_dict(resolve_weights_path(load_config(RECIPE).model.pretrained))
    assert torch.equal(at[8]["conv_stem.weight"], source["_conv_stem.weight"]), "the backbone moved in the head-only epoch"
    assert not torch.equal(at[8]["classifier.weight"], at[10]["classifier.weight"])
    assert not torch.equal(at[10]["conv_stem.weight"], source["_conv_stem.weight"]), "the backbone never learned"
    for name, file_name in (("bn1.running_mean", "_bn0.running_mean"), ("bn2.running_var", "_bn1.running_var")):
        assert torch.equal(at[10][name], source[file_name]), f"{name}: frozen BatchNorm statistics changed"
    best = load_file(str(run_dir / "best" / "model.safetensors"))
    assert torch.equal(best["bn2.running_var"], source["_bn1.running_var"])
    assert (run_dir / "best" / "calibration.json").is_file(), "training ends with a calibration fit"
    assert [r["step"] for r in read_metrics(run_dir) if "val/accuracy" in r] == [8, 10]


def test_the_recipes_dropout_and_drop_path_reach_the_model_that_trains(finetuned):
    _, _, rates = finetuned
    recipe = load_config(RECIPE).model
    assert rates["drop_rate"] == recipe.drop_rate > 0
    assert 0 < rates["drop_path_rate"] <= recipe.drop_path_rate  # timm raises the rate block by block up to the key's


def test_the_backbone_learns_at_its_share_of_the_head_rate():
    schedule = Schedule(total_steps=100, warmup_steps=10, frozen_backbone_steps=20, min_lr_ratio=0.0, backbone_lr_scale=0.3)
    assert schedule.backbone_factor(19) == 0.0
    for step in (20, 50, 99):
        assert schedule.backbone_factor(step) == pytest.approx(0.3 * schedule.factor(step))


def test_evaluate_predict_and_export_take_the_fine_tuned_export(finetuned, prepared_cars5, cars5_dir, tmp_path):
    run_dir, _, _ = finetuned
    best = run_dir / "best"
    assert main(["evaluate", "--checkpoint", str(best), "--data", str(prepared_cars5), "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["arch"] == "tf_efficientnet_lite0" and metrics["image_size"] == 96 and metrics["samples"] > 0

    photo = sorted((cars5_dir / "test" / "audi").iterdir())[0]
    assert main(["predict", "--checkpoint", str(best), str(photo), "--json", "--explain", str(tmp_path / "why")]) == 0
    assert list((tmp_path / "why").glob("*.png")), "no Grad-CAM overlay written"

    import onnxruntime

    assert main(["export", "--checkpoint", str(best), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    contract = json.loads((tmp_path / "onnx" / "contract.json").read_text())
    config = load_config(RECIPE)
    assert contract["input"]["shape"][2:] == [96, 96] and contract["input"]["resize"]["center_crop"] == 96
    assert contract["input"]["normalisation"]["mean"] == config.data.mean
    crops = torch.stack([eval_transform(load_rgb(p), 96, config.data.eval_crop_fraction)
                         for p in sorted((cars5_dir / "test" / "bmw").iterdir())[:4]])
    images = Normalizer(torch.device("cpu"), torch.float32, False, mean=config.data.mean, std=config.data.std)(crops)
    model, _ = load_export_model(best)
    with torch.inference_mode():
        reference = model(images.contiguous())
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.contiguous().numpy()})[0])
    assert (logits - reference).abs().max().item() <= 1e-4


def test_serve_answers_as_predict_does_with_the_fine_tuned_export(finetuned, cars5_dir, tmp_path):
    from carbrand.bench.http_client import FilePart
    from carbrand.inference.predict import Predictor
    from tests.helpers.serving import serving

    run_dir, _, _ = finetuned
    photos = [sorted((cars5_dir / "test" / brand).iterdir())[0] for brand in ("ferrari", "mercedes")]
    expected = Predictor.from_checkpoint(run_dir / "best", device="cpu").predict(photos, topk=3)
    with serving(run_dir / "best", tmp_path) as server:
        client = server.client()
        assert client.get("/v1/model").json()["architecture"] == "tf_efficientnet_lite0"
        answer = client.predict([FilePart(p.name, p.read_bytes()) for p in photos], topk=3)
    assert answer.status == 200, answer.body
    for served, local in zip(answer.json()["predictions"], expected):
        assert [b["brand"] for b in served["topk"]] == [b.brand for b in local.topk]
        assert served["topk"][0]["probability"] == pytest.approx(local.probability, abs=1e-5)
