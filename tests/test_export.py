"""`carbrand export`: ONNX (onnxruntime on the CPU) and TorchScript give PyTorch's logits on the cars5 test split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
import torch

from carbrand.checkpoint import load_export_model
from carbrand.cli import main
from carbrand.data.images import Normalizer, load_rgb
from carbrand.data.manifest import load_prepared
from carbrand.data.preprocessing import MAX_PIXELS
from carbrand.data.torch_loader import eval_transform

LOGIT_TOLERANCE = 1e-4  # max abs difference, fp32
BATCH_SIZES = (1, 7, 32)  # the exported batch dimension is dynamic: sizes other than the traced one


@pytest.fixture(scope="module")
def test_split_inputs(fitted_cars5_export: Path, prepared_cars5: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised NCHW float32 images of every cars5 test photo, PyTorch's logits for them)."""
    model, export = load_export_model(fitted_cars5_export)
    data = export.config.data
    size, fraction = data.eval_size, data.eval_crop_fraction
    samples = load_prepared(prepared_cars5).split("test")
    crops = torch.stack([eval_transform(load_rgb(sample.path), size, fraction) for sample in samples])
    images = Normalizer(torch.device("cpu"), torch.float32, channels_last=False, mean=data.mean, std=data.std)(crops).contiguous()
    with torch.inference_mode():
        return images, model(images)


def run_in_batches(run_batch, images: torch.Tensor) -> torch.Tensor:
    """Logits of all images, the batch size cycling through BATCH_SIZES."""
    outputs, start, turn = [], 0, 0
    while start < len(images):
        size = BATCH_SIZES[turn % len(BATCH_SIZES)]
        outputs.append(torch.as_tensor(run_batch(images[start:start + size])))
        start, turn = start + size, turn + 1
    return torch.cat(outputs)


def assert_parity(logits: torch.Tensor, reference: torch.Tensor) -> None:
    assert logits.shape == reference.shape
    difference = (logits - reference).abs().max().item()
    assert difference <= LOGIT_TOLERANCE, f"max abs logit difference {difference:.2e} > {LOGIT_TOLERANCE}"
    changed = (logits.argmax(1) != reference.argmax(1)).nonzero().flatten().tolist()
    assert not changed, f"top-1 differs for test photos {changed}"


def export(checkpoint: Path, format: str, out: Path) -> Path:
    assert main(["export", "--checkpoint", str(checkpoint), "--format", format, "--out", str(out)]) == 0
    return out


def test_onnx_export_matches_pytorch_on_cars5_test(fitted_cars5_export, test_split_inputs, tmp_path):
    import onnxruntime

    images, reference = test_split_inputs
    assert len(images) == 100, "the cars5 test split: 20 photos of each of 5 brands"
    out = export(fitted_cars5_export, "onnx", tmp_path / "onnx")
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    assert model_input.name == "images" and isinstance(model_input.shape[0], str), "batch dimension must be dynamic"
    assert_parity(run_in_batches(lambda batch: session.run(["logits"], {"images": batch.numpy()})[0], images), reference)
    check_contract(out, fitted_cars5_export, "model.onnx", len(images[0][0]))


def test_torchscript_export_matches_pytorch_on_cars5_test(fitted_cars5_export, test_split_inputs, tmp_path):
    images, reference = test_split_inputs
    out = export(fitted_cars5_export, "torchscript", tmp_path / "torchscript")
    scripted = torch.jit.load(str(out / "model.pt"))
    with torch.inference_mode():
        assert_parity(run_in_batches(scripted, images), reference)
    check_contract(out, fitted_cars5_export, "model.pt", len(images[0][0]))


def check_contract(out: Path, checkpoint: Path, model_file: str, image_size: int) -> None:
    contract = json.loads((out / "contract.json").read_text())
    assert contract["model_file"] == model_file
    assert contract["input"]["shape"] == ["batch", 3, image_size, image_size]
    assert contract["input"]["layout"] == "NCHW"
    assert contract["input"]["max_pixels"] == MAX_PIXELS  # an export from before the limit travelled: the default
    assert contract["input"]["normalisation"]["mean"] == [0.485, 0.456, 0.406]
    assert json.loads((out / "classes.json").read_text()) == json.loads((checkpoint / "classes.json").read_text())
    assert contract["calibration_file"] is None and not (out / "calibration.json").exists()


def test_the_contract_names_the_pixel_limit_the_training_data_was_prepared_with(fitted_cars5_export, tmp_path):
    import shutil

    checkpoint = tmp_path / "best"
    shutil.copytree(fitted_cars5_export, checkpoint)
    config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    config["data"]["max_pixels"] = 12_000_000  # prepare --max-pixels 12000000
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(config))
    out = export(checkpoint, "torchscript", tmp_path / "ts")
    assert json.loads((out / "contract.json").read_text())["input"]["max_pixels"] == 12_000_000


def test_calibration_is_copied_and_named_in_the_contract(fitted_cars5_export, tmp_path):
    import shutil

    checkpoint = tmp_path / "best"
    shutil.copytree(fitted_cars5_export, checkpoint)
    calibration = {"temperature": 1.7, "threshold": 0.4}
    (checkpoint / "calibration.json").write_text(json.dumps(calibration))
    out = export(checkpoint, "torchscript", tmp_path / "ts")
    assert json.loads((out / "calibration.json").read_text()) == calibration
    contract = json.loads((out / "contract.json").read_text())
    assert contract["calibration_file"] == "calibration.json"
    assert "temperature" in contract["output"]["probabilities"]


@pytest.mark.parametrize("case", ["missing", "foreign", "file"])
def test_missing_or_foreign_checkpoint_is_one_line(case, tmp_path, capsys):
    checkpoint = tmp_path / "best"
    if case == "foreign":
        checkpoint.mkdir()
        (checkpoint / "model.safetensors").write_bytes(b"not safetensors at all")
        (checkpoint / "classes.json").write_text('["a", "b"]')
        (checkpoint / "config.yaml").write_text("model: {arch: resnet18}\n")
    elif case == "file":
        checkpoint.write_text("a file, not an export")
    out = tmp_path / "out"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("carbrand export: error: "), error
    assert str(checkpoint) in error
    assert not out.exists(), "nothing half-written"
