"""carbrand.metrics against scikit-learn (and ECE against a direct numpy computation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from carbrand import metrics as M

NUM_CLASSES = 7


def random_case(seed: int, n: int = 300, absent_truth=(5,), absent_predicted=(6,)):
    """Random labels where class 5 never occurs as truth and class 6 is never predicted."""
    rng = np.random.default_rng(seed)
    truth_classes = [c for c in range(NUM_CLASSES) if c not in absent_truth]
    targets = rng.choice(truth_classes, size=n)
    scores = rng.random((n, NUM_CLASSES))
    scores[:, list(absent_predicted)] = -1.0  # never the argmax, still ranked for top-k
    # Make predictions agree with the truth more often than chance, so the numbers are not all tiny.
    boost = rng.random(n) < 0.4
    scores[boost, targets[boost]] += 1.0
    scores[:, list(absent_predicted)] = -1.0
    return targets, scores


# (seed, brands never true, brands never predicted): brand 6 absent from both in the last two cases, as when
# a split holds only some of the model's brands and the model never names the missing ones
CASES = [(0, (5,), (6,)), (1, (5,), (6,)), (2, (5,), (6,)), (3, (5, 6), (6,)), (4, (2, 6), (6, 4))]


@pytest.mark.parametrize("seed, absent_truth, absent_predicted", CASES)
def test_confusion_and_summary_match_sklearn(seed, absent_truth, absent_predicted):
    targets, scores = random_case(seed, absent_truth=absent_truth, absent_predicted=absent_predicted)
    predicted = scores.argmax(axis=1)
    confusion = M.confusion_matrix(torch.from_numpy(predicted), torch.from_numpy(targets), NUM_CLASSES)
    np.testing.assert_array_equal(confusion.numpy(), skm.confusion_matrix(targets, predicted, labels=range(NUM_CLASSES)))

    summary = M.summarize(confusion)
    assert summary["samples"] == len(targets)
    assert summary["accuracy"] == pytest.approx(skm.accuracy_score(targets, predicted), abs=1e-12)
    for average in ("macro", "weighted"):
        # sklearn's default label set (union of truth and predictions) is what summarize documents
        precision, recall, f1, _ = skm.precision_recall_fscore_support(targets, predicted, average=average, zero_division=0)
        assert summary[f"{average}_precision"] == pytest.approx(precision, abs=1e-12)
        assert summary[f"{average}_recall"] == pytest.approx(recall, abs=1e-12)
        assert summary[f"{average}_f1"] == pytest.approx(f1, abs=1e-12)

    per_class = M.per_class_metrics(confusion)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        targets, predicted, labels=range(NUM_CLASSES), average=None, zero_division=0)
    np.testing.assert_allclose(per_class["precision"].numpy(), precision, atol=1e-12)
    np.testing.assert_allclose(per_class["recall"].numpy(), recall, atol=1e-12)
    np.testing.assert_allclose(per_class["f1"].numpy(), f1, atol=1e-12)
    np.testing.assert_array_equal(per_class["support"].numpy(), support)
    # the absent classes really are absent, so the zero_division paths were exercised
    assert all(support[c] == 0 for c in absent_truth) and all(per_class["predicted"][c] == 0 for c in absent_predicted)
    absent_from_both = set(absent_truth) & set(absent_predicted)
    if absent_from_both:  # a mean over all brands would differ: the case can tell the two label sets apart
        _, _, all_brands_f1, _ = skm.precision_recall_fscore_support(
            targets, predicted, labels=range(NUM_CLASSES), average="macro", zero_division=0)
        assert summary["macro_f1"] != pytest.approx(all_brands_f1, abs=1e-3)


def test_row_normalized_matches_sklearn():
    targets, scores = random_case(3)
    predicted = scores.argmax(axis=1)
    confusion = M.confusion_matrix(torch.from_numpy(predicted), torch.from_numpy(targets), NUM_CLASSES)
    expected = skm.confusion_matrix(targets, predicted, labels=range(NUM_CLASSES), normalize="true")
    np.testing.assert_allclose(M.row_normalized(confusion).numpy(), np.nan_to_num(expected), atol=1e-12)
    assert M.row_normalized(confusion)[5].sum() == 0  # a brand absent from the truth: a zero row, not NaN


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_accuracy_matches_sklearn(k):
    targets, scores = random_case(4)
    expected = skm.top_k_accuracy_score(targets, scores, k=k, labels=range(NUM_CLASSES))
    assert M.top_k_accuracy(torch.from_numpy(scores), torch.from_numpy(targets), k) == pytest.approx(expected, abs=1e-12)
    top = torch.from_numpy(scores).topk(k, dim=1).indices
    assert M.top_k_hits(top, torch.from_numpy(targets)) == pytest.approx(expected, abs=1e-12)


def test_top_k_is_capped_at_the_number_of_classes():
    targets, scores = random_case(5)
    assert M.top_k_accuracy(torch.from_numpy(scores), torch.from_numpy(targets), 50) == 1.0


def numpy_ece(confidences: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lower, upper in zip(edges[:-1], edges[1:]):
        inside = (confidences > lower) & (confidences <= upper)
        if lower == 0.0:
            inside |= confidences == 0.0
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidences[inside].mean())
    return float(ece)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_expected_calibration_error_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(500, NUM_CLASSES))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    targets = rng.integers(0, NUM_CLASSES, 500)
    confidences = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    expected = numpy_ece(confidences, correct)
    assert expected > 0.05  # random labels: badly calibrated, so a wrong formula would show
    got = M.expected_calibration_error(torch.from_numpy(confidences), torch.from_numpy(correct))
    assert got == pytest.approx(expected, abs=1e-12)
    bins = M.calibration_bins(torch.from_numpy(confidences), torch.from_numpy(correct))
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 500


def test_ece_edges_and_perfect_calibration():
    # confidences exactly on bin edges go to the bin they close (lower < c <= upper)
    edges = torch.tensor([1 / 15, 2 / 15, 1.0], dtype=torch.float64)
    counts = [b["count"] for b in M.calibration_bins(edges, torch.ones(3))]
    assert counts[0] == 1 and counts[1] == 1 and counts[14] == 1
    # always right at confidence 1: perfectly calibrated
    assert M.expected_calibration_error(torch.ones(10, dtype=torch.float64), torch.ones(10)) == 0.0
    assert M.expected_calibration_error(torch.zeros(0), torch.zeros(0)) == 0.0


def test_ece_of_a_calibrated_model_is_what_perfect_calibration_measures_on_that_many_images():
    """The floor matches a brute-force simulation, is 0 for certain answers, and shrinks as the test set grows."""
    rng = np.random.default_rng(0)
    confidences = rng.uniform(0.4, 1.0, size=100)
    brute = [numpy_ece(confidences, rng.uniform(size=100) < confidences) for _ in range(2000)]
    mean, sd = M.ece_of_a_calibrated_model(torch.from_numpy(confidences))
    assert mean == pytest.approx(np.mean(brute), abs=0.004) and sd == pytest.approx(np.std(brute), abs=0.004)
    assert 0.05 < mean < 0.15, "100 images: ECE cannot be measured far below 0.1"
    assert M.ece_of_a_calibrated_model(torch.ones(50, dtype=torch.float64)) == (0.0, 0.0)
    assert M.ece_of_a_calibrated_model(torch.from_numpy(np.tile(confidences, 100)))[0] < mean / 5


def test_ece_of_a_calibrated_model_does_not_depend_on_the_order_of_the_images():
    confidences = torch.rand(300, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    shuffled = confidences[torch.randperm(300, generator=torch.Generator().manual_seed(2))]
    assert M.ece_of_a_calibrated_model(confidences) == M.ece_of_a_calibrated_model(shuffled)
