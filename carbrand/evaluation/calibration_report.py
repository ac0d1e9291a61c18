"""What the evaluator says about confidence: calibration before/after, "unknown" answers, the open set.

    metrics.json   temperature, expected_calibration_error (before) / expected_calibration_error_calibrated,
                   nll / nll_calibrated, calibration_calibrated (reliability bins after),
                   expected_calibration_error_of_a_calibrated_model (+ _sd): the ECE this many images can show at best,
                   min_confidence, rejected_share, accepted_accuracy,
                   open_set (with --unknown-brands report and photos of brands the model does not know):
                   auroc, unknown_rejected_share, known_rejected_share, ...
    reliability.png  the reliability diagram before and after temperature scaling

Scores: the calibrated top-1 probability. The open-set AUROC is P(a known-brand photo scores
above an unknown-brand one); temperature scaling keeps the ranking of a single image's brands
but not across images, so it is computed on the calibrated scores that predict answers with.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from carbrand import metrics as M
from carbrand.inference.calibration import ECE_BINS


def _tensor(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float64)


def mean_nll(true_probabilities: torch.Tensor) -> float:
    if len(true_probabilities) == 0:
        return math.nan
    return float(-(true_probabilities.clamp(min=1e-300)).log().mean())


def calibration_metrics(known: list, temperature: float, calibrated: bool) -> dict[str, Any]:
    """ECE and NLL before and after temperature scaling over known-brand samples (ScoredSample)."""
    correct = torch.tensor([s.record.predicted == s.target for s in known], dtype=torch.bool)
    after = _tensor(s.record.calibrated_confidence for s in known)
    floor_mean, floor_sd = M.ece_of_a_calibrated_model(after, ECE_BINS)
    return {
        "calibrated": calibrated,
        "temperature": temperature,
        "nll": mean_nll(_tensor(s.record.true_probability for s in known)),
        "nll_calibrated": mean_nll(_tensor(s.record.calibrated_true_probability for s in known)),
        "expected_calibration_error_calibrated": M.expected_calibration_error(after, correct, ECE_BINS),
        "mean_confidence_calibrated": float(after.mean()) if len(known) else 0.0,
        "calibration_calibrated": M.calibration_bins(after, correct, ECE_BINS),
        # what a perfectly calibrated model would show on this many images: small sets cannot measure ECE below it
        "expected_calibration_error_of_a_calibrated_model": floor_mean,
        "expected_calibration_error_of_a_calibrated_model_sd": floor_sd,
    }


def rejection_metrics(known: list, threshold: float | None) -> dict[str, Any]:
    """How many known-brand photos the threshold answers "unknown", and the accuracy on the rest."""
    if threshold is None:
        return {"min_confidence": None}
    accepted = [s for s in known if s.record.calibrated_confidence >= threshold]
    right = sum(s.record.predicted == s.target for s in accepted)
    return {
        "min_confidence": threshold,
        "rejected_share": 1 - len(accepted) / len(known) if known else 0.0,
        "accepted_accuracy": right / len(accepted) if accepted else math.nan,
    }


def open_set_metrics(scored: list, threshold: float | None) -> dict[str, Any] | None:
    """Known vs unknown brands by the calibrated top-1 probability; None when no unknown-brand photo was given."""
    known = [s.record.calibrated_confidence for s in scored if s.target >= 0]
    unknown = [s.record.calibrated_confidence for s in scored if s.target < 0]
    if not unknown:
        return None
    result: dict[str, Any] = {
        "score": "calibrated top-1 probability",
        "known_samples": len(known),
        "unknown_samples": len(unknown),
        "auroc": M.auroc(_tensor(known), _tensor(unknown)),
        "threshold": threshold,
    }
    if threshold is not None:
        result["unknown_rejected_share"] = sum(c < threshold for c in unknown) / len(unknown)
        result["known_rejected_share"] = sum(c < threshold for c in known) / len(known) if known else math.nan
    return result


def plot_reliability(before: list[dict], after: list[dict], path: Path, ece_before: float, ece_after: float,
                     temperature: float) -> None:
    """Two reliability diagrams side by side: accuracy per confidence bin (bars) against the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9.6, 4.6), dpi=110, sharey=True)
    panels = ((before, f"before: ECE {ece_before:.3f}"), (after, f"after (T = {temperature:.3g}): ECE {ece_after:.3f}"))
    for axis, (bins, title) in zip(axes, panels):
        width = bins[0]["upper"] - bins[0]["lower"]
        lowers = [b["lower"] for b in bins]
        total = sum(b["count"] for b in bins) or 1
        axis.bar(lowers, [b["accuracy"] for b in bins], width=width, align="edge", color="#4c78a8",
                 edgecolor="white", label="accuracy")
        gaps = [b["confidence"] - b["accuracy"] if b["count"] else 0 for b in bins]
        axis.bar(lowers, gaps, bottom=[b["accuracy"] for b in bins], width=width, align="edge", color="#e45756",
                 alpha=0.35, edgecolor="#e45756", hatch="//", label="gap to confidence")
        axis.plot([0, 1], [0, 1], linestyle="--", color="black", linewidth=1, label="perfect calibration")
        share = axis.twinx()
        share.plot([b["lower"] + width / 2 for b in bins], [b["count"] / total for b in bins], color="#f58518",
                   marker="o", markersize=3, linewidth=1, label="share of images")
        share.set_ylim(0, 1)
        share.tick_params(axis="y", labelsize=8, colors="#f58518")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.set_xlabel("confidence (top-1 probability)")
        axis.set_title(title, fontsize=11)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)


def format_summary_lines(metrics: dict[str, Any]) -> list[str]:
    """The console lines about confidence, under the evaluator's table."""
    lines = []
    if metrics.get("calibrated"):
        lines.append(f"temperature {metrics['temperature']:.4g}: ECE {metrics['expected_calibration_error']:.4f} -> "
                     f"{metrics['expected_calibration_error_calibrated']:.4f}, NLL {metrics['nll']:.4f} -> {metrics['nll_calibrated']:.4f} "
                     f"(a perfectly calibrated model would show ECE {metrics['expected_calibration_error_of_a_calibrated_model']:.3f}"
                     f" ± {metrics['expected_calibration_error_of_a_calibrated_model_sd']:.3f} on these images)")
    else:
        lines.append("uncalibrated (no calibration.json in the export: run carbrand calibrate)")
    if metrics.get("min_confidence") is not None:
        lines.append(f"unknown below {metrics['min_confidence']:.4f}: {metrics['rejected_share']:.1%} of known-brand images "
                     f"rejected; accuracy on the rest {metrics['accepted_accuracy']:.4f}")
    open_set = metrics.get("open_set")
    if open_set:
        line = f"open set: AUROC {open_set['auroc']:.4f} known ({open_set['known_samples']}) vs unknown ({open_set['unknown_samples']}) brands"
        if open_set.get("threshold") is not None:
            line += f"; {open_set['unknown_rejected_share']:.1%} of unknown-brand images answered unknown"
        lines.append(line)
    return lines
