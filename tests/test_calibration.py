"""Calibrated confidence and "unknown": temperature scaling (calibrate, evaluate, predict), the open set,
and report.html looked at in headless Chromium.

The models are fitted, not trained (tests/helpers/exports.py): the session's 5-brand cars5 export, and one
fitted to three brands (audi, lamborghini, mercedes) so that bmw and ferrari are brands it never saw.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from sklearn import metrics as skm

from carbrand.inference.calibration import fit_calibration, fit_temperature, known_share_threshold, load_calibration, nll
from tests.helpers.exports import fit_export

KNOWN = ["audi", "lamborghini", "mercedes"]  # bmw and ferrari play the brands the model never saw


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def run_command(name: str, *args) -> int:
    from carbrand.cli import run_command as run

    try:
        return run(name, [str(a) for a in args])
    finally:
        reset_accelerate()  # each in-process command makes its own Accelerator


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def brand_subset(prepared: Path, brands: list[str], out: Path) -> Path:
    """A prepared dataset holding only `brands` (relabelled 0..n-1), same photos, same splits."""
    out.mkdir(parents=True)
    shutil.copy(prepared / "manifest.json", out / "manifest.json")  # absolute root: the photos stay where they are
    (out / "classes.json").write_text(json.dumps(brands))
    for split in ("train", "val", "test"):
        rows = [{"path": r["path"], "label": brands.index(r["brand"]), "brand": r["brand"]}
                for r in read_csv(prepared / f"{split}.csv") if r["brand"] in brands]
        with (out / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, ["path", "label", "brand"], lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    return out


# ----------------------------------------------------------------------------- the fit itself


def test_temperature_is_the_nll_minimum_and_the_threshold_keeps_the_share():
    generator = torch.Generator().manual_seed(0)
    honest = torch.randn(4000, 5, generator=generator) * 2
    labels = torch.multinomial(honest.softmax(dim=1), 1, generator=generator).squeeze(1)  # calibrated at T = 1
    logits = honest * 4  # four times overconfident
    temperature = fit_temperature(logits, labels)
    assert temperature == fit_temperature(logits.clone(), labels.clone())  # bit-identical refit
    assert temperature == pytest.approx(4, rel=0.1)
    best = nll(logits, labels, temperature)
    for factor in (0.98, 1.02, 0.8, 1.25):  # a minimum, not just a good value
        assert nll(logits, labels, temperature * factor) > best
    confidences = torch.linspace(0.01, 1.0, 100, dtype=torch.float64)
    threshold = known_share_threshold(confidences, 0.95)
    assert (confidences >= threshold).double().mean() >= 0.95
    assert (confidences >= threshold + 1e-9).double().mean() < 0.95  # the largest such threshold


def test_a_split_with_no_mistakes_keeps_the_temperature_at_one():
    """Every val image right with a margin (a small val split often is): the NLL falls forever as T -> 0; a T at the
    search bound would call every answer 100 % sure and make the threshold 1.0, so nothing is fitted."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(25) % 5
    logits = torch.randn(25, 5, generator=generator)
    logits[torch.arange(25), labels] += 6  # right, with a wide margin
    assert fit_temperature(logits, labels) is None
    calibration = fit_calibration(logits, labels)
    assert calibration.temperature == 1.0 and calibration.fitted is False
    assert calibration.nll_after == calibration.nll_before
    assert calibration.threshold == pytest.approx(float(logits.double().softmax(dim=1).max(dim=1).values.sort().values[1]))
    logits[0] = logits[0].roll(1)  # one mistake: now there is a minimum
    assert fit_temperature(logits, labels) is not None and fit_calibration(logits, labels).fitted


# ----------------------------------------------------------------------------- cars5: calibrate, evaluate, report


@pytest.fixture(scope="module")
def calibrated_run(fitted_cars5_export: Path, prepared_cars5: Path, tmp_path_factory) -> dict:
    """A copy of the fitted export, calibrated twice on val, then evaluated on test (report.html included)."""
    root = tmp_path_factory.mktemp("calibrated")
    export = shutil.copytree(fitted_cars5_export, root / "best")
    assert run_command("calibrate", "--checkpoint", export, "--data", prepared_cars5) == 0
    first = (export / "calibration.json").read_text()
    assert run_command("calibrate", "--checkpoint", export, "--data", prepared_cars5) == 0
    out = root / "eval_test"
    with pytest.MonkeyPatch.context() as environment:
        environment.delenv("WANDB_MODE", raising=False)
        environment.setenv("WANDB_SILENT", "true")
        assert run_command("evaluate", "--checkpoint", export, "--data", prepared_cars5, "--split", "test", "--out", out,
                           "--wandb-mode", "offline") == 0
    return {"export": export, "first_fit": first, "out": out, "metrics": json.loads((out / "metrics.json").read_text())}


def test_calibration_json_reproduces_and_halves_the_test_ece(calibrated_run):
    export, metrics = calibrated_run["export"], calibrated_run["metrics"]
    assert (export / "calibration.json").read_text() == calibrated_run["first_fit"]  # the same figures, to the bit
    calibration = load_calibration(export)
    assert calibration.split == "val" and calibration.samples == 30 and calibration.nll_after < calibration.nll_before
    assert metrics["calibrated"] is True and metrics["temperature"] == calibration.temperature
    before, after = metrics["expected_calibration_error"], metrics["expected_calibration_error_calibrated"]
    assert after <= before / 2, (before, after)
    assert metrics["nll_calibrated"] < metrics["nll"]
    # the stored threshold is applied by default: rejected answers are the calibrated confidences below it
    rows = read_csv(calibrated_run["out"] / "predictions.csv")
    below = [r for r in rows if float(r["calibrated_confidence"]) < calibration.threshold]
    assert [r["answer"] for r in below] == ["unknown"] * len(below)
    assert metrics["rejected_share"] == pytest.approx(len(below) / len(rows))
    assert (calibrated_run["out"] / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wandb_gets_the_reliability_diagram_the_calibrated_metrics_and_the_gallery(calibrated_run):
    from tests.helpers.wandb_records import read_history, read_records

    (log,) = (calibrated_run["out"] / "wandb").glob("offline-run-*/run-*.wandb")
    logged = {"/".join(key.split("/")[:2]) for row in read_history(log) for key in row}  # images and tables nest
    assert {"eval/reliability", "eval/gallery", "eval/confusion_matrix"} <= logged, logged
    (rows,) = [row["eval/gallery/nrows"] for row in read_history(log) if "eval/gallery/nrows" in row]
    assert rows >= 5  # the worst mistakes of every brand, each with its photo and Grad-CAM overlay
    summary = {}
    for record in read_records(log):
        if record.WhichOneof("record_type") == "summary":
            summary |= {"/".join(i.nested_key) if i.nested_key else i.key: json.loads(i.value_json) for i in record.summary.update}
    metrics = calibrated_run["metrics"]
    for key in ("expected_calibration_error_calibrated", "nll_calibrated", "temperature", "rejected_share"):
        assert summary[f"eval/{key}"] == pytest.approx(metrics[key]), key


def test_report_renders_in_chromium_with_every_image_loaded(calibrated_run):
    from tests.helpers.browser import headless_chromium

    report = calibrated_run["out"] / "report.html"
    page = report.read_text(encoding="utf-8")
    assert "src=\"http" not in page and "src='http" not in page  # self-contained
    with headless_chromium(1280, 900) as browser:
        browser.get(report.as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
        headings = browser.execute_script("return Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
        height = browser.execute_script("return document.body.scrollHeight")
        browser.set_window_size(1280, min(height + 120, 4000))
        browser.save_screenshot(str(calibrated_run["out"].parent / "report.png"))
    broken = [alt for complete, width, alt in images if not (complete and width > 0)]
    assert not broken, f"images that did not load: {broken}"
    alts = [alt for _, _, alt in images]
    assert "confusion matrix" in alts and "reliability diagram" in alts
    assert alts.count("photo") >= 5 and sum(a.startswith("Grad-CAM") for a in alts) == alts.count("photo")  # a gallery per brand
    assert headings == ["Per brand", "Confusion matrix", "Reliability", "Most confused", "Worst mistakes per brand"]
    assert (calibrated_run["out"].parent / "report.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------- the open set


@pytest.fixture(scope="module")
def three_brand_run(prepared_cars5: Path, tmp_path_factory) -> dict:
    """fit_export on audi, lamborghini and mercedes; calibrated with 80 % kept; evaluated on all five brands' test photos."""
    root = tmp_path_factory.mktemp("three_brands")
    subset = brand_subset(prepared_cars5, KNOWN, root / "prepared")
    export = fit_export(root / "best", subset)
    # This model is weak (fitted, not trained), so its calibrated answers sit close to 1/3: keeping 80 %
    # of known val photos gives a threshold that the unknown brands' photos can fall below.
    assert run_command("calibrate", "--checkpoint", export, "--data", subset, "--keep-share", "0.8") == 0
    out = root / "eval"
    assert run_command("evaluate", "--checkpoint", export, "--data", prepared_cars5, "--unknown-brands", "report",
                       "--gallery", "0", "--out", out) == 0
    return {"export": export, "out": out, "metrics": json.loads((out / "metrics.json").read_text()),
            "rows": read_csv(out / "predictions.csv")}


def test_open_set_auroc_and_rejection_share_are_in_metrics_json(three_brand_run):
    metrics, rows = three_brand_run["metrics"], three_brand_run["rows"]
    open_set = metrics["open_set"]
    assert open_set["known_samples"] == 60 and open_set["unknown_samples"] == 40
    known = [int(r["known"]) for r in rows]
    scores = [float(r["calibrated_confidence"]) for r in rows]
    assert open_set["auroc"] == pytest.approx(skm.roc_auc_score(known, scores), abs=1e-6)
    threshold = load_calibration(three_brand_run["export"]).threshold
    assert open_set["threshold"] == threshold
    unknown = [r for r in rows if r["known"] == "0"]
    assert {r["true_brand"] for r in unknown} == {"bmw", "ferrari"}
    rejected = [r for r in unknown if r["answer"] == "unknown"]
    assert rejected and open_set["unknown_rejected_share"] == pytest.approx(len(rejected) / len(unknown))
    assert [float(r["calibrated_confidence"]) < threshold for r in unknown] == [r["answer"] == "unknown" for r in unknown]


def test_predict_min_confidence_auto_answers_unknown_for_a_bmw(three_brand_run, capsys):
    rows = three_brand_run["rows"]
    bmws = [r for r in rows if r["true_brand"] == "bmw"]
    rejected = [Path(r["path"]) for r in bmws if r["answer"] == "unknown"]
    kept = [Path(r["path"]) for r in bmws if r["answer"] != "unknown"]
    assert rejected, "no bmw photo under the stored threshold"
    from carbrand.inference import predict

    assert predict.main(["--checkpoint", str(three_brand_run["export"]), "--json", "--min-confidence", "auto",
                         str(rejected[0]), str(kept[0])]) == 0
    document = json.loads(capsys.readouterr().out)
    first, second = document["predictions"]
    assert first["answer"] == "unknown" and first["unknown"] is True and first["brand"] in KNOWN
    assert first["probability"] < first["min_confidence"] == load_calibration(three_brand_run["export"]).threshold
    assert second["answer"] == second["brand"] and second["unknown"] is False
    # the same photo without a threshold: a brand, as before
    assert predict.main(["--checkpoint", str(three_brand_run["export"]), "--json", str(rejected[0])]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["answer"] in KNOWN


def test_min_confidence_auto_without_calibration_and_bad_values_are_one_line(fitted_cars5_export, cars5_dir, capsys):
    from carbrand.inference import predict

    photo = next((cars5_dir / "test" / "bmw").iterdir())
    assert predict.main(["--checkpoint", str(fitted_cars5_export), "--min-confidence", "auto", str(photo)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no calibration.json" in err and "carbrand calibrate" in err
    assert predict.main(["--checkpoint", str(fitted_cars5_export), "--min-confidence", "1.5", str(photo)]) == 2
    assert "--min-confidence must be" in capsys.readouterr().err
