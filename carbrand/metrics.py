"""Classification metrics from a confusion matrix (rows = true brand, columns = predicted).

A confusion matrix is a fixed-size sum, so ranks add theirs with one all-reduce and the
result is exact whatever the world size; everything else is derived from it. The formulas
match scikit-learn's (zero_division=0), which the tests check.
"""

from __future__ import annotations

import torch


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 [num_classes, num_classes] counts; stays on the inputs' device (no host sync)."""
    flat = targets.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def summarize(confusion: torch.Tensor) -> dict[str, float]:
    """accuracy, macro/weighted precision, recall and F1 of a confusion matrix."""
    per_class = per_class_metrics(confusion)
    support = per_class["support"]
    total = support.sum()
    # macro averages over brands that occur as truth or prediction: sklearn's default label set
    present = (support > 0) | (per_class["predicted"] > 0)
    weights = support / total if total > 0 else support
    summary = {"accuracy": float(confusion.diag().sum() / total) if total > 0 else 0.0, "samples": int(total)}
    for name in ("precision", "recall", "f1"):
        values = per_class[name]
        summary[f"macro_{name}"] = float(values[present].mean()) if present.any() else 0.0
        summary[f"weighted_{name}"] = float((values * weights).sum())
    return summary


def per_class_metrics(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    confusion = confusion.double().cpu()
    true_positive = confusion.diag()
    predicted = confusion.sum(dim=0)
    support = confusion.sum(dim=1)
    precision = _safe_divide(true_positive, predicted)
    recall = _safe_divide(true_positive, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support, "predicted": predicted}


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-12), torch.zeros_like(numerator))


def row_normalized(confusion: torch.Tensor) -> torch.Tensor:
    """Each true brand's row divided by its support (rows of absent brands stay 0)."""
    confusion = confusion.double().cpu()
    return _safe_divide(confusion, confusion.sum(dim=1, keepdim=True).expand_as(confusion))


def top_k_accuracy(scores: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Share of samples whose true label is among the k highest scores ([n, num_classes] scores)."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return top_k_hits(top, targets)


def top_k_hits(top_labels: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of rows of `top_labels` ([n, k] predicted labels, best first) that contain the target."""
    if len(targets) == 0:
        return 0.0
    hits = (top_labels == targets.view(-1, 1)).any(dim=1)
    return float(hits.double().mean())


def confidence_bins(confidences: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Each confidence's bin: equal widths over (0, 1], b/num_bins < c <= (b+1)/num_bins (bin 0 also takes c = 0)."""
    # bucketize(right=False): bin b holds uppers[b-1] < c <= uppers[b], the usual ECE convention
    uppers = torch.linspace(0, 1, num_bins + 1, dtype=torch.float64)[1:-1]
    return torch.bucketize(confidences, uppers, right=False)


def calibration_bins(confidences: torch.Tensor, correct: torch.Tensor, num_bins: int = 15) -> list[dict[str, float]]:
    """Reliability diagram data: equal-width bins over (0, 1] of the max softmax probability.

    A confidence c falls in bin b when b/num_bins < c <= (b+1)/num_bins (bin 0 also takes c = 0).
    """
    confidences = confidences.double().cpu()
    correct = correct.double().cpu()
    bins = confidence_bins(confidences, num_bins)
    counts = torch.bincount(bins, minlength=num_bins).double()
    confidence_sums = torch.bincount(bins, weights=confidences, minlength=num_bins)
    correct_sums = torch.bincount(bins, weights=correct, minlength=num_bins)
    result = []
    for b in range(num_bins):
        n = counts[b].item()
        result.append({
            "lower": b / num_bins,
            "upper": (b + 1) / num_bins,
            "count": int(n),
            "confidence": confidence_sums[b].item() / n if n else 0.0,
            "accuracy": correct_sums[b].item() / n if n else 0.0,
        })
    return result


def expected_calibration_error(confidences: torch.Tensor, correct: torch.Tensor, num_bins: int = 15) -> float:
    """ECE: sum over bins of (bin share) * |accuracy - mean confidence| (Guo et al., 2017)."""
    total = len(confidences)
    if total == 0:
        return 0.0
    bins = calibration_bins(confidences, correct, num_bins)
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins))


def ece_of_a_calibrated_model(confidences: torch.Tensor, num_bins: int = 15, draws: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, sd) of the ECE that a *perfectly* calibrated model with these confidences shows on this many images.

    ECE is biased upwards on small sets: each bin's accuracy is a small-sample estimate. Each draw
    makes every image right with probability equal to its confidence (what perfect calibration
    means) and measures the ECE of that draw; an ECE inside this spread is as good as a test set
    of this size can show.
    """
    confidences = confidences.double().cpu().sort().values  # one answer for one set of images, in any order
    if len(confidences) == 0:
        return 0.0, 0.0
    bins = confidence_bins(confidences, num_bins)
    counts = torch.bincount(bins, minlength=num_bins).double()
    confidence_sums = torch.bincount(bins, weights=confidences, minlength=num_bins)
    generator = torch.Generator().manual_seed(seed)
    correct = torch.bernoulli(confidences.expand(draws, -1), generator=generator)
    correct_sums = torch.zeros(draws, num_bins, dtype=torch.float64).index_add_(1, bins, correct)
    errors = (correct_sums - confidence_sums).abs().sum(dim=1) / len(confidences)  # sum_b n_b/N * |acc_b - conf_b|
    return float(errors.mean()), float(errors.std())


def auroc(positive_scores: torch.Tensor, negative_scores: torch.Tensor) -> float:
    """Area under the ROC curve: P(a positive scores above a negative), ties counting one half (Mann-Whitney U)."""
    positive, negative = positive_scores.double().cpu().flatten(), negative_scores.double().cpu().flatten()
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    scores = torch.cat([positive, negative])
    # average ranks (1-based) of tied scores
    order = scores.argsort()
    sorted_scores = scores[order]
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = average_rank[inverse]
    n_positive, n_negative = len(positive), len(negative)
    u = ranks[:n_positive].sum() - n_positive * (n_positive + 1) / 2
    return float(u / (n_positive * n_negative))
