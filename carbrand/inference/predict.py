"""Which brand is this? The top-k brands of image files, folders of them, or PIL images.

    carbrand predict --checkpoint runs/cars/best photo.jpg                # photo.jpg: audi 0.91, bmw 0.05, mercedes 0.02
    carbrand predict --checkpoint runs/cars/best photos/ --topk 5         # folders are scanned recursively
    carbrand predict --checkpoint runs/cars/best photos/ --json > out.json
    python -m carbrand.inference.predict --checkpoint runs/cars/best photo.jpg

    from carbrand.inference.predict import Predictor
    predictor = Predictor.from_checkpoint("runs/cars/best")
    best = predictor.predict(["photo.jpg"], topk=3)[0]    # best.brand, best.probability, best.topk
    carbrand predict --checkpoint runs/cars/best photo.jpg --min-confidence auto   # "unknown" below the stored threshold
    carbrand predict --checkpoint runs/cars/best photos/ --explain overlays/       # + a Grad-CAM overlay per photo

Probabilities are calibrated when the export holds calibration.json (`carbrand calibrate`, or
the end of training): softmax(logits / temperature). With --min-confidence auto (the threshold
stored there) or a number, a photo whose calibrated top-1 probability is below it is answered
"unknown": the model is not sure it is any brand it knows. Without it, the top-1 brand is
always the answer.

Preprocessing is the evaluator's torchvision path (torch_loader.eval_transform): EXIF
orientation applied, the centre crop of eval size / eval_crop_fraction resized to the eval
size (data.eval_image_size, else data.image_size), normalised with the export's data.mean and data.std. Runs on the GPU when there is one, else the CPU. A file that cannot be
read or decoded gets an error line on stderr; the others are still predicted, and the
exit code is 1 if anything failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from carbrand.checkpoint import load_export_model
from carbrand.command_line import run_command_module
from carbrand.config import Config
from carbrand.data.images import Normalizer, load_rgb, upright_rgb
from carbrand.data.torch_loader import eval_transform
from carbrand.errors import DataError, UsageError
from carbrand.filesystem import write_bytes_atomically
from carbrand.inference.calibration import Calibration, calibrated_probabilities, load_calibration, resolve_min_confidence
from carbrand.inference.classifier import (PRECISIONS, add_crops_argument, classify, inference_precision, place_model,
                                           with_eval_crops)
from carbrand.inference.gradcam import Explanation, explain, overlay, png_bytes
from carbrand.inference.overlays import write_overlays
from carbrand.prepare.formats import IMAGE_EXTENSIONS

DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class BrandProbability:
    brand: str
    probability: float  # calibrated (softmax of logits / temperature) when the export has calibration.json
    uncalibrated: float | None = None  # the plain softmax


UNKNOWN = "unknown"


@dataclass
class Prediction:
    source: str  # the path as given, or "<image N>" for an in-memory PIL image
    topk: list[BrandProbability] = field(default_factory=list)  # most probable first
    unknown: bool = False  # the calibrated top-1 probability is below min_confidence
    min_confidence: float | None = None  # the threshold applied (None: never "unknown")
    temperature: float = 1.0  # 1.0: the export has no calibration
    overlay: str | None = None  # the Grad-CAM overlay written for it (predict --explain)

    @property
    def brand(self) -> str:
        """The most probable known brand (even when the answer is "unknown")."""
        return self.topk[0].brand

    @property
    def answer(self) -> str:
        return UNKNOWN if self.unknown else self.brand

    @property
    def probability(self) -> float:
        return self.topk[0].probability

    def to_dict(self) -> dict:
        return {"path": self.source, "answer": self.answer, "unknown": self.unknown, "brand": self.brand,
                "probability": self.probability, "min_confidence": self.min_confidence, "temperature": self.temperature,
                **({"overlay": self.overlay} if self.overlay else {}),
                "topk": [{"brand": b.brand, "probability": b.probability, "uncalibrated_probability": b.uncalibrated}
                         for b in self.topk]}


def load_image(path: Path, max_pixels: int = 0) -> Image.Image:
    """Fully decoded RGB with EXIF orientation applied; a DataError naming the file otherwise.

    `max_pixels`: the export's data.max_pixels, the limit its training data was prepared with (0 = the default).
    """
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (0 bytes)")
        return load_rgb(path, max_pixels)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image (Pillow cannot identify the content)") from None
    except Exception as error:  # truncated data, decompression bomb, permission denied, ...
        raise DataError(f"{path}: cannot decode: {type(error).__name__}: {error}") from None


class Predictor:
    """An exported classifier plus the eval preprocessing and its calibration, ready for files or PIL images.

    `min_confidence`: None (always a brand), "auto" (the threshold in calibration.json) or a probability.
    """

    def __init__(self, model: torch.nn.Module, classes: list[str], config: Config, device: torch.device | str | None = None,
                 precision: str = "auto", calibration: Calibration | None = None, min_confidence: float | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.classes = classes
        self.data = config.data
        self.image_size = config.data.eval_size  # the side of the eval crop (reported by serve)
        self.crop_fraction = config.data.eval_crop_fraction
        self.crops = config.data.eval_crops  # crops along the longer side, probabilities averaged
        self.channels_last = config.train.channels_last
        self.precision = inference_precision(precision, config.train.precision, self.device)
        self.model = place_model(model, self.device, self.channels_last)
        # float32 input, as the eval loaders give for full precision; autocast lowers it inside the model
        self.normalize = Normalizer(self.device, torch.float32, self.channels_last, mean=config.data.mean, std=config.data.std)
        self.calibration = calibration
        self.temperature = calibration.temperature if calibration is not None else 1.0
        self.min_confidence = resolve_min_confidence(min_confidence, calibration, "this export")

    @classmethod
    def from_checkpoint(cls, directory: str | Path, device: torch.device | str | None = None, precision: str = "auto",
                        min_confidence: str | float | None = None, crops: int | None = None) -> Predictor:
        """`crops`: eval crops per photo, instead of the export's data.eval_crops."""
        model, export = load_export_model(directory)
        calibration = load_calibration(directory)
        threshold = resolve_min_confidence(min_confidence, calibration, directory)
        config = export.config if crops is None else with_eval_crops(export.config, crops)
        return cls(model, export.classes, config, device=device, precision=precision,
                   calibration=calibration, min_confidence=threshold)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """uint8 HWC crop (KHWC for several crops), exactly as the torchvision eval loader makes it."""
        return eval_transform(image, self.image_size, self.crop_fraction, self.crops)

    def predict(self, inputs, topk: int = 3, batch_size: int = DEFAULT_BATCH_SIZE) -> list[Prediction]:
        """Top-k brands of each input (path or PIL image), in input order; an unreadable file raises DataError."""
        if isinstance(inputs, (str, Path, Image.Image)):
            inputs = [inputs]
        crops, sources = [], []
        for number, item in enumerate(inputs):
            if isinstance(item, Image.Image):
                image, source = upright_rgb(item), f"<image {number}>"
            else:
                image, source = load_image(Path(item), self.data.max_pixels), str(item)
            crops.append(self.preprocess(image))
            sources.append(source)
        return self.predict_crops(crops, sources, topk=topk, batch_size=batch_size)

    def predict_crops(self, crops: list[torch.Tensor], sources: list[str], topk: int = 3,
                      batch_size: int = DEFAULT_BATCH_SIZE) -> list[Prediction]:
        if topk < 1:
            raise UsageError(f"--topk must be at least 1; got {topk}")
        topk = min(topk, len(self.classes))
        predictions = []
        for start in range(0, len(crops), batch_size):
            images = self.normalize(torch.stack(crops[start:start + batch_size]))  # as the eval loaders normalise
            logits, probabilities = classify(self.model, images, precision=self.precision)
            calibrated = calibrated_probabilities(logits, self.temperature)
            top = calibrated.topk(topk, dim=1)
            for row, source in enumerate(sources[start:start + batch_size]):
                ranked = [BrandProbability(self.classes[label], float(probability), float(probabilities[row, label]))
                          for label, probability in zip(top.indices[row].tolist(), top.values[row].tolist())]
                unknown = self.min_confidence is not None and ranked[0].probability < self.min_confidence
                predictions.append(Prediction(source, ranked, unknown=unknown, min_confidence=self.min_confidence,
                                              temperature=self.temperature))
        return predictions

    def explain(self, item, brand: str | None = None) -> tuple[Image.Image, Explanation]:
        """(upright photo, Grad-CAM of `brand` or of the top-1 brand) for a path or a PIL image."""
        photo = upright_rgb(item) if isinstance(item, Image.Image) else load_image(Path(item), self.data.max_pixels)
        if brand is not None and brand not in self.classes:
            raise UsageError(f"--brand {brand!r} is not a brand this model knows ({', '.join(self.classes)})")
        label = self.classes.index(brand) if brand is not None else None
        return photo, explain(self.model, photo, self.data, label=label, channels_last=self.channels_last)

    def write_overlay(self, item, out_path: Path, brand: str | None = None) -> Explanation:
        """Grad-CAM overlay PNG of one photo (see carbrand.inference.gradcam) at `out_path`."""
        photo, explanation = self.explain(item, brand)
        write_bytes_atomically(out_path, png_bytes(overlay(photo, explanation)))
        return explanation


def image_files(paths: list[Path]) -> tuple[list[Path], list[dict[str, str]]]:
    """Files as given plus the images inside folders (recursively, sorted); errors for missing paths."""
    files, errors = [], []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                errors.append({"path": str(path), "error": f"no images in this folder (looked for {', '.join(IMAGE_EXTENSIONS)})"})
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            errors.append({"path": str(path), "error": "no such file or directory"})
    return files, errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="an export directory (RUN/best)")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files and/or folders (scanned recursively)")
    parser.add_argument("--topk", type=int, default=3, help="brands shown per image (default: 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON document {checkpoint, predictions, errors} instead of lines")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"images per forward pass (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="autocast dtype (default: auto = the training precision on a GPU, fp32 on the CPU)")
    parser.add_argument("--min-confidence", default=None, metavar="auto|P",
                        help="answer 'unknown' below this calibrated top-1 probability; auto = the threshold in "
                             "the export's calibration.json (default: never unknown)")
    parser.add_argument("--explain", type=Path, default=None, metavar="DIR",
                        help="also write a Grad-CAM overlay per photo into DIR (NAME.gradcam.png; see carbrand explain)")
    add_crops_argument(parser)


def run(args: argparse.Namespace) -> int:
    if args.topk < 1:
        raise UsageError(f"--topk must be at least 1; got {args.topk}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer; got {args.batch_size}")
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, precision=args.precision,
                                          min_confidence=args.min_confidence, crops=args.crops)
    files, errors = image_files(args.paths)
    crops, sources = [], []
    for path in files:
        try:
            crops.append(predictor.preprocess(load_image(path, predictor.data.max_pixels)))
            sources.append(str(path))
        except DataError as error:
            errors.append({"path": str(path), "error": str(error).removeprefix(f"{path}: ")})
    predictions = predictor.predict_crops(crops, sources, topk=args.topk, batch_size=args.batch_size)
    if args.explain is not None:
        overlays, failed = write_overlays(predictor, [Path(s) for s in sources], args.explain)
        for prediction, overlay_path in zip(predictions, overlays):
            prediction.overlay = overlay_path
        errors.extend(failed)
    for error in errors:
        print(f"carbrand predict: error: {error['path']}: {error['error']}", file=sys.stderr)
    if args.json:
        document = {"checkpoint": str(Path(args.checkpoint).resolve()),
                    "predictions": [p.to_dict() for p in predictions], "errors": errors}
        print(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        for p in predictions:
            ranked = ", ".join(f"{b.brand} {b.probability:.2f}" for b in p.topk)
            answer = f"unknown (below {p.min_confidence:.2f}; best: {ranked})" if p.unknown else ranked
            print(f"{p.source}: {answer}" + (f"  [{p.overlay}]" if p.overlay else ""))
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    return run_command_module("predict", sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
