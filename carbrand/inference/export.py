"""Export a trained classifier for use outside carbrand: ONNX (onnxruntime, web, mobile) or TorchScript.

    carbrand export --checkpoint runs/cars/best --format onnx                  # -> runs/cars/export_onnx/
    carbrand export --checkpoint runs/cars/best --format torchscript --out model_ts/

The output folder holds the model (model.onnx or model.pt), classes.json, contract.json and,
when best/ has one, calibration.json. contract.json is the input contract a caller must meet:
RGB with EXIF orientation applied, the centre crop of eval size / eval_crop_fraction resized to
the eval size (data.eval_image_size, else data.image_size), float32 NCHW normalised with the mean
and std the weights expect (data.mean, data.std; ImageNet's unless the recipe says other); the output is logits, one
row per image, brands in classes.json order. The batch size is dynamic. The model is fp32, on
the CPU, in eval mode, exactly the weights `carbrand predict` uses: onnxruntime and TorchScript
give the same logits within 1e-4 (tests/test_export.py checks it on the cars5 test split).
The folder is written atomically (replaced as a whole).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import warnings
from pathlib import Path

import torch

from carbrand.checkpoint import load_export_model
from carbrand.command_line import run_command_module
from carbrand.data.images import pixel_limit
from carbrand.data.preprocessing import eval_resize_size
from carbrand.errors import CarbrandError, UsageError, first_line
from carbrand.filesystem import write_directory_atomically
from carbrand.inference.calibration import CALIBRATION_FILE  # written into best/ by training or `carbrand calibrate`, copied as is

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
CONTRACT_FILE = "contract.json"
ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "logits"
TRACE_BATCH = 2  # any batch size works afterwards; 2 keeps BatchNorm and flatten off a batch-1 special case


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="an export directory (RUN/best)")
    parser.add_argument("--format", choices=tuple(FORMATS), required=True, help="onnx (onnxruntime) or torchscript (torch.jit.load)")
    parser.add_argument("--out", type=Path, default=None, help="output folder, replaced as a whole (default: RUN/export_<format>)")


def run(args: argparse.Namespace) -> int:
    out = (args.out or args.checkpoint.resolve().parent / f"export_{args.format}").resolve()
    if args.checkpoint.is_dir() and out == args.checkpoint.resolve():
        raise UsageError(f"--out {out} is the checkpoint itself: choose another folder")
    written = export_checkpoint(args.checkpoint, args.format, out)
    print(f"wrote {written} ({', '.join(sorted(p.name for p in written.iterdir()))})")
    return 0


def export_checkpoint(checkpoint: Path, format: str, out: Path) -> Path:
    """Write model, classes.json, contract.json (and calibration.json if best/ has one) into `out`."""
    if format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}; got {format!r}")
    model, export = load_export_model(checkpoint)  # one-line CarbrandError for a missing or foreign folder
    image_size = export.config.data.eval_size
    example = torch.zeros(TRACE_BATCH, 3, image_size, image_size)
    calibration = export.directory / CALIBRATION_FILE
    contract = input_contract(export, format, has_calibration=calibration.is_file())

    def write(into: Path) -> None:
        model_file = into / FORMATS[format]
        (save_onnx if format == "onnx" else save_torchscript)(model, example, model_file)
        (into / "classes.json").write_text(json.dumps(export.classes, indent=2, ensure_ascii=False) + "\n")
        (into / CONTRACT_FILE).write_text(json.dumps(contract, indent=2, ensure_ascii=False) + "\n")
        if calibration.is_file():
            shutil.copyfile(calibration, into / CALIBRATION_FILE)

    return write_directory_atomically(out, write)


def save_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """torch.export-based exporter (torch's default since 2.9), batch dimension dynamic, one self-contained file."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        # The exporter prints progress lines on stdout; the command prints its own one line.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes={"x": {0: batch}}, opset_version=ONNX_OPSET, dynamo=True,
                              external_data=False, verbose=False)
    except Exception as error:
        raise CarbrandError(f"ONNX export failed ({type(error).__name__}: {first_line(error)})") from None


def save_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """A traced module: the ResNets have no data-dependent control flow, so the trace holds for every batch size."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream but still what C++/mobile load
            traced = torch.jit.trace(model, example, check_trace=False)
            traced.save(str(path))
    except Exception as error:
        raise CarbrandError(f"TorchScript export failed ({type(error).__name__}: {first_line(error)})") from None


def input_contract(export, format: str, has_calibration: bool) -> dict:
    """What a caller outside carbrand must do to an image so that the model sees what it was trained on."""
    data = export.config.data
    probabilities = ("softmax(logits / temperature), temperature from calibration.json" if has_calibration
                     else "softmax(logits)")
    return {
        "format": format,
        "model_file": FORMATS[format],
        "architecture": export.config.model.arch,
        "classes_file": "classes.json",
        "num_classes": len(export.classes),
        "calibration_file": CALIBRATION_FILE if has_calibration else None,
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "layout": "NCHW",
            "shape": ["batch", 3, data.eval_size, data.eval_size],
            "color": "RGB, EXIF orientation applied",
            # the limit the training data was prepared with: predict and serve refuse larger photos
            "max_pixels": pixel_limit(data.max_pixels),
            "resize": {
                "shorter_side": eval_resize_size(data.eval_size, data.eval_crop_fraction),
                "center_crop": data.eval_size,
                "interpolation": "bilinear, antialiased (PIL Image.resize with the crop box; carbrand/data/torch_loader.py eval_transform)",
                # data.eval_crops: 1 is the centre crop above; K > 1 crops that same crop at K places along the
                # longer side and averages the K softmaxes (carbrand/data/preprocessing.py eval_crop_boxes)
                "crops": data.eval_crops,
            },
            "normalisation": {"scale": "pixel / 255", "mean": list(data.mean), "std": list(data.std),
                              "formula": "(pixel / 255 - mean) / std, per channel"},
        },
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", len(export.classes)],
            "meaning": "logits; column i is the brand classes_file[i]",
            "probabilities": probabilities,
        },
        "source_checkpoint": str(export.directory.resolve()),
        "onnx_opset": ONNX_OPSET if format == "onnx" else None,
        "torch_version": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    return run_command_module("export", sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
