"""What the evaluator writes and shows: metrics.json, CSVs, the confusion-matrix picture, a console table.

    OUT/metrics.json          every number, plus checkpoint, data, split, sample counts, world size, seconds
    OUT/per_class.csv         brand, precision, recall, f1, support, predicted
    OUT/confusion_matrix.png  brand names on both axes, counts in the cells, colour = row share
    OUT/misclassified.csv     path, true brand, predicted brand, confidence (most confident mistakes first)
    OUT/predictions.csv       every scored sample: its prediction, confidence (also calibrated), top-k brands, answer
    OUT/reliability.png       reliability diagram before and after temperature scaling (calibration_report.py)
    OUT/report.html           one self-contained page to look at (html_report.py)

The whole directory is written under a temporary name and renamed when complete, so an
error mid-way leaves the previous result (or nothing), never half of one.

Label space: the model's brands, restricted to those present in the truth or the
predictions (scikit-learn's default label set). A brand the model knows but the test set
lacks counts only when the model predicts it (as a false positive); brands neither in the
truth nor predicted are left out, so they do not drag the macro averages down.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from carbrand import metrics as M
from carbrand.data.shard_format import Member
from carbrand.errors import CarbrandError
from carbrand.evaluation.calibration_report import format_summary_lines, plot_reliability
from carbrand.evaluation.html_report import wandb_gallery_rows, write_report
from carbrand.filesystem import write_directory_atomically

ECE_BINS = 15
WORST_MISTAKES = 32  # rows of the W&B mistakes table (each with its image)


@dataclass(frozen=True)
class SampleRecord:
    """One evaluated image, as a rank sends it to the main process (plain, picklable values)."""

    index: int  # position in the split's sample list
    predicted: int  # model label of the top prediction
    confidence: float  # its probability (max softmax)
    true_probability: float  # probability given to the true brand (nan when the model does not know it)
    topk: tuple[int, ...]  # model labels, most probable first
    topk_probabilities: tuple[float, ...]
    calibrated_confidence: float = math.nan  # top-1 probability of softmax(logits / temperature)
    calibrated_true_probability: float = math.nan


@dataclass
class ScoredSample:
    """A record joined with what the main process knows about the sample."""

    path: str
    true_brand: str
    target: int  # model label of the true brand, -1 when the model does not know the brand
    record: SampleRecord
    rejected: bool = False  # answered "unknown": calibrated confidence below --min-confidence
    member: Member | None = None  # where the photo lies in a shard (a sharded dataset): the gallery reads it there


def build_metrics(scored: list[ScoredSample], classes: list[str], top_k: int) -> tuple[dict[str, Any], torch.Tensor]:
    """All metrics over the samples whose brand the model knows; returns (metrics, full confusion)."""
    known = [s for s in scored if s.target >= 0]
    num_classes = len(classes)
    targets = torch.tensor([s.target for s in known], dtype=torch.int64)
    predicted = torch.tensor([s.record.predicted for s in known], dtype=torch.int64)
    top_labels = torch.tensor([s.record.topk[:top_k] for s in known], dtype=torch.int64).reshape(len(known), top_k)
    confidences = torch.tensor([s.record.confidence for s in known], dtype=torch.float64)
    confusion = M.confusion_matrix(predicted, targets, num_classes)
    per_class = M.per_class_metrics(confusion)
    summary = M.summarize(confusion)
    present = ((per_class["support"] > 0) | (per_class["predicted"] > 0)).nonzero().flatten().tolist()
    brands = [classes[i] for i in present]
    restricted = confusion[present][:, present]
    normalized = M.row_normalized(restricted)
    correct = predicted == targets
    bins = M.calibration_bins(confidences, correct, ECE_BINS)
    result: dict[str, Any] = {
        "samples": summary["samples"],
        "accuracy": summary["accuracy"],
        "top_k": top_k,
        "top_k_accuracy": M.top_k_hits(top_labels, targets),
        **{key: summary[key] for key in summary if key.startswith(("macro_", "weighted_"))},
        "expected_calibration_error": M.expected_calibration_error(confidences, correct, ECE_BINS),
        "ece_bins": ECE_BINS,
        "mean_confidence": float(confidences.mean()) if len(known) else 0.0,
        "brands": brands,
        "model_brands_not_in_data": [c for i, c in enumerate(classes) if per_class["support"][i] == 0],
        "per_class": {
            classes[i]: {
                "precision": float(per_class["precision"][i]),
                "recall": float(per_class["recall"][i]),
                "f1": float(per_class["f1"][i]),
                "support": int(per_class["support"][i]),
                "predicted": int(per_class["predicted"][i]),
            }
            for i in present
        },
        "confusion_matrix": {
            "brands": brands,  # rows = true brand, columns = predicted brand
            "counts": restricted.tolist(),
            "row_normalized": [[round(v, 6) for v in row] for row in normalized.tolist()],
        },
        "calibration": bins,
    }
    return result, confusion


def unknown_brand_report(scored: list[ScoredSample], classes: list[str]) -> dict[str, Any]:
    """Samples of brands the model was never taught: how many, and what it called them."""
    unknown = [s for s in scored if s.target < 0]
    brands: dict[str, dict[str, Any]] = {}
    for s in unknown:
        entry = brands.setdefault(s.true_brand, {"samples": 0, "predicted": {}})
        entry["samples"] += 1
        name = classes[s.record.predicted]
        entry["predicted"][name] = entry["predicted"].get(name, 0) + 1
    for entry in brands.values():
        entry["predicted"] = dict(sorted(entry["predicted"].items(), key=lambda kv: (-kv[1], kv[0])))
    return {"samples": len(unknown), "brands": dict(sorted(brands.items()))}


# ----------------------------------------------------------------------------- files


def mistakes(scored: list[ScoredSample]) -> list[ScoredSample]:
    """Wrong predictions on known brands, the most confident first."""
    wrong = [s for s in scored if s.target >= 0 and s.record.predicted != s.target]
    return sorted(wrong, key=lambda s: (-s.record.confidence, s.record.index))


def write_outputs(out: Path, metrics: dict[str, Any], scored: list[ScoredSample], classes: list[str],
                  gallery: list | None = None) -> Path:
    """Write every output file into `out` atomically (temporary directory, then rename)."""

    check_output_directory(out)

    def write(into: Path) -> None:
        (into / "metrics.json").write_text(json.dumps(_json_safe(metrics), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (into / "per_class.csv").write_text(per_class_csv(metrics), encoding="utf-8")
        (into / "misclassified.csv").write_text(misclassified_csv(scored, classes), encoding="utf-8")
        (into / "predictions.csv").write_text(predictions_csv(scored, classes), encoding="utf-8")
        matrix = metrics["confusion_matrix"]
        plot_confusion_matrix(matrix["counts"], matrix["brands"], into / "confusion_matrix.png",
                              title=f"{metrics.get('split', '')} split: accuracy {metrics['accuracy']:.3f}, {metrics['samples']} images")
        plot_reliability(metrics["calibration"], metrics["calibration_calibrated"], into / "reliability.png",
                         metrics["expected_calibration_error"], metrics["expected_calibration_error_calibrated"],
                         metrics["temperature"])
        write_report(into / "report.html", metrics, into, gallery or [])

    return write_directory_atomically(out, write)  # removes its temporary on any failure


def default_out_dir(checkpoint: Path, split: str) -> Path:
    """RUN/eval_<split> for RUN/best, else <checkpoint>/../eval_<name>_<split>."""
    checkpoint = checkpoint.resolve()
    name = f"eval_{split}" if checkpoint.name == "best" else f"eval_{checkpoint.name}_{split}"
    return checkpoint.parent / name


def check_output_directory(out: Path) -> None:
    """`--out` is replaced as a whole, so refuse anything that is not (or was not) an evaluation output."""
    if out.exists() and not out.is_dir():
        raise CarbrandError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "metrics.json").is_file():
        raise CarbrandError(f"--out {out} is a non-empty directory without metrics.json: choose a new or empty directory "
                            f"(the evaluator replaces its --out directory as a whole)")


def per_class_csv(metrics: dict[str, Any]) -> str:
    rows = [[brand, f"{v['precision']:.6f}", f"{v['recall']:.6f}", f"{v['f1']:.6f}", v["support"], v["predicted"]]
            for brand, v in metrics["per_class"].items()]
    return _csv(["brand", "precision", "recall", "f1", "support", "predicted"], rows)


def misclassified_csv(scored: list[ScoredSample], classes: list[str]) -> str:
    rows = [[s.path, s.true_brand, classes[s.record.predicted], f"{s.record.confidence:.6f}", f"{s.record.true_probability:.6f}"]
            for s in mistakes(scored)]
    return _csv(["path", "true_brand", "predicted_brand", "confidence", "true_brand_probability"], rows)


def predictions_csv(scored: list[ScoredSample], classes: list[str]) -> str:
    """Every sample (unknown brands included, marked known=0), in split order."""
    rows = []
    for s in sorted(scored, key=lambda s: s.record.index):
        r = s.record
        rows.append([
            r.index, s.path, s.true_brand, int(s.target >= 0), classes[r.predicted], f"{r.confidence:.6f}",
            "" if math.isnan(r.true_probability) else f"{r.true_probability:.6f}",
            json.dumps([classes[label] for label in r.topk], ensure_ascii=False),
            json.dumps([round(p, 6) for p in r.topk_probabilities]),
            f"{r.calibrated_confidence:.10f}", "unknown" if s.rejected else classes[r.predicted],
        ])
    return _csv(["index", "path", "true_brand", "known", "predicted_brand", "confidence", "true_brand_probability",
                 "topk_brands", "topk_probabilities", "calibrated_confidence", "answer"], rows)


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def plot_confusion_matrix(counts: list[list[int]], brands: list[str], path: Path, title: str = "") -> None:
    """Counts in the cells, colour = share of the true brand's images (row-normalised).

    Sized so a cell stays readable: a 5-brand matrix is a small square, 49 brands get a
    larger canvas and smaller type.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    import numpy as np

    matrix = np.asarray(counts, dtype=np.int64).reshape(len(brands), len(brands))
    support = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, support, out=np.zeros(matrix.shape, dtype=float), where=support > 0)
    n = len(brands)
    cell_inches = 0.5 if n <= 12 else 0.32
    side = max(5.0, n * cell_inches + 2.5)
    label_size = 10 if n <= 12 else max(6, 10 - n // 16)
    count_size = 10 if n <= 12 else max(5, 9 - n // 16)
    figure, axes = plt.subplots(figsize=(side + 1.2, side), dpi=120 if n <= 20 else 150)
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    colorbar = figure.colorbar(image, ax=axes, fraction=0.046, pad=0.02)
    colorbar.set_label("share of the true brand's images", fontsize=label_size)
    axes.set_xticks(range(n), labels=brands, rotation=60 if n > 6 else 30, ha="right", rotation_mode="anchor", fontsize=label_size)
    axes.set_yticks(range(n), labels=brands, fontsize=label_size)
    axes.set_xlabel("predicted brand", fontsize=label_size + 1)
    axes.set_ylabel("true brand", fontsize=label_size + 1)
    if title:
        axes.set_title(title, fontsize=label_size + 2)
    for row in range(n):
        for column in range(n):
            if matrix[row, column]:
                colour = "white" if shares[row, column] > 0.55 else "black"
                axes.text(column, row, str(matrix[row, column]), ha="center", va="center", fontsize=count_size, color=colour)
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)


# ----------------------------------------------------------------------------- console and W&B


def format_summary(metrics: dict[str, Any]) -> str:
    """The console table: one line per brand, then the overall numbers."""
    width = max([len("brand")] + [len(b) for b in metrics["per_class"]])
    lines = [f"{'brand':<{width}}  precision  recall     f1  support"]
    for brand, v in metrics["per_class"].items():
        lines.append(f"{brand:<{width}}  {v['precision']:9.3f}  {v['recall']:6.3f}  {v['f1']:5.3f}  {v['support']:7d}")
    k = metrics["top_k"]
    lines += [
        "",
        f"accuracy {metrics['accuracy']:.4f}   top-{k} accuracy {metrics['top_k_accuracy']:.4f}   "
        f"macro F1 {metrics['macro_f1']:.4f}   weighted F1 {metrics['weighted_f1']:.4f}   "
        f"ECE {metrics['expected_calibration_error']:.4f}",
        f"{metrics['samples']} images of split '{metrics.get('split', '?')}' scored"
        f" ({metrics.get('world_size', 1)} process(es), {metrics.get('seconds', 0):.1f} s)",
    ]
    unknown = metrics.get("unknown_brands")
    if unknown and unknown["samples"]:
        for brand, entry in unknown["brands"].items():
            called = ", ".join(f"{name} {count}" for name, count in entry["predicted"].items())
            lines.append(f"not scored: {entry['samples']} images of brand '{brand}' the model does not know (predicted as: {called})")
    if "temperature" in metrics:
        lines += format_summary_lines(metrics)
    if metrics.get("model_brands_not_in_data"):
        lines.append(f"model brands absent from this split: {', '.join(metrics['model_brands_not_in_data'])}")
    return "\n".join(lines)


def log_to_wandb(tracker, metrics: dict[str, Any], out: Path, scored: list[ScoredSample], classes: list[str],
                 gallery: list | None = None) -> None:
    """Metrics as the run summary (calibrated ones and the open set too), the confusion and reliability pictures,
    a per-brand table, the worst mistakes with images, the per-brand gallery with its Grad-CAM overlays."""
    if tracker.run is None:
        return
    import wandb

    scalars = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    scalars |= {f"eval/open_set/{k}": v for k, v in (metrics.get("open_set") or {}).items() if isinstance(v, (int, float))}
    tracker.summary(scalars)
    tracker.log_image("eval/confusion_matrix", out / "confusion_matrix.png")
    tracker.log_image("eval/reliability", out / "reliability.png")
    tracker.log_table("eval/per_class", ["brand", "precision", "recall", "f1", "support", "predicted"],
                      [[b, v["precision"], v["recall"], v["f1"], v["support"], v["predicted"]] for b, v in metrics["per_class"].items()])
    rows = [[wandb.Image(s.path), s.path, s.true_brand, classes[s.record.predicted], s.record.confidence, s.record.true_probability]
            for s in mistakes(scored)[:WORST_MISTAKES]]
    tracker.log_table("eval/worst_mistakes", ["image", "path", "true_brand", "predicted_brand", "confidence", "true_brand_probability"], rows)
    if gallery:
        tracker.log_table("eval/gallery", ["photo", "grad_cam", "path", "true_brand", "predicted_brand", "confidence",
                                           "calibrated_confidence"], wandb_gallery_rows(gallery))
