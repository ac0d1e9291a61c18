"""`carbrand predict` and the Predictor API on real cars5 photos, with broken files among them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.helpers.exports import CARS5, make_export


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("run") / "best")


@pytest.fixture
def photos(cars5_dir: Path, tmp_path: Path) -> dict[str, Path]:
    """A single photo, a folder tree of 5 more (one per brand, nested), and two broken files inside it."""
    single = tmp_path / "single.jpg"
    shutil.copy(sorted((cars5_dir / "test" / "audi").iterdir())[0], single)
    folder = tmp_path / "folder"
    for brand in CARS5:
        (folder / "nested" / brand).mkdir(parents=True)
        shutil.copy(sorted((cars5_dir / "test" / brand).iterdir())[1], folder / "nested" / brand / "car.jpg")
    (folder / "notes.txt").write_text("not scanned: no image extension\n")
    text_as_jpeg = folder / "not_an_image.jpg"
    text_as_jpeg.write_text("hello\n")
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(single.read_bytes()[:2000])
    return {"single": single, "folder": folder, "text": text_as_jpeg, "truncated": truncated}


def predict_main(*args, capsys) -> tuple[int, str, str]:
    from carbrand.inference import predict

    code = predict.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_command_predicts_the_good_files_and_reports_the_broken_ones(export, photos, tmp_path):
    missing = tmp_path / "missing.jpg"
    command = [sys.executable, "-m", "carbrand.inference.predict", "--checkpoint", export, photos["single"], photos["folder"], missing, "--topk", "3"]
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 1, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 6  # the single photo + 5 in the folder; the broken two and the missing one are not predicted
    assert lines[0].startswith(f"{photos['single']}: ")
    for line in lines:
        path, _, ranking = line.rpartition(": ")
        entries = [entry.rsplit(" ", 1) for entry in ranking.split(", ")]
        assert len(entries) == 3 and all(brand in CARS5 for brand, _ in entries)
        probabilities = [float(p) for _, p in entries]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.02
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 3, result.stderr
    assert any(str(photos["text"]) in e and "not an image" in e for e in errors)
    assert any(str(photos["truncated"]) in e and "truncated" in e for e in errors)
    assert any(str(missing) in e and "no such file" in e for e in errors)
    assert "Traceback" not in result.stderr


def test_json_output(export, photos, capsys):
    code, out, err = predict_main("--checkpoint", export, photos["folder"], "--json", "--topk", "9", capsys=capsys)
    assert code == 1  # the two broken files
    document = json.loads(out)
    assert document["checkpoint"] == str(export.resolve())
    assert len(document["predictions"]) == 5 and len(document["errors"]) == 2
    assert {Path(e["path"]).name for e in document["errors"]} == {"not_an_image.jpg", "truncated.jpg"}
    for prediction in document["predictions"]:
        assert Path(prediction["path"]).name == "car.jpg"
        assert [t["brand"] for t in prediction["topk"]] != []
        assert sorted(t["brand"] for t in prediction["topk"]) == CARS5  # topk 9 is capped at the 5 brands
        assert sum(t["probability"] for t in prediction["topk"]) == pytest.approx(1.0, abs=1e-4)
    assert len(err.strip().splitlines()) == 2


def test_all_good_files_exit_zero(export, photos, capsys):
    code, out, err = predict_main("--checkpoint", export, photos["single"], "--json", capsys=capsys)
    assert code == 0 and err == ""
    assert json.loads(out)["errors"] == []


# A lowered pixel limit: cars5's largest photo has 262,094 pixels; the generated image has one column too many.
LOWERED_LIMIT = 600 * 500


def test_an_image_over_the_pixel_limit_is_refused_and_the_others_predicted(export, photos, tmp_path, capsys, monkeypatch):
    from tests.helpers.image_factory import write_jpeg

    monkeypatch.setattr("carbrand.data.preprocessing.MAX_PIXELS", LOWERED_LIMIT)  # the one constant
    huge = write_jpeg(tmp_path / "huge.jpg", seed=1, size=(601, 500))
    code, out, err = predict_main("--checkpoint", export, photos["single"], huge, capsys=capsys)
    assert code == 1
    assert [line.rpartition(": ")[0] for line in out.strip().splitlines()] == [str(photos["single"])]
    assert err.strip() == (f"carbrand predict: error: {huge}: 601x500 = 300500 pixels is over the limit of "
                           f"{LOWERED_LIMIT} pixels (prepare --max-pixels)"), err


def test_python_api(export, photos):
    from carbrand.inference.predict import Predictor

    predictor = Predictor.from_checkpoint(export, device="cpu")
    with Image.open(photos["single"]) as image:
        in_memory = image.copy()
    paths = sorted(photos["folder"].rglob("car.jpg"))
    predictions = predictor.predict([photos["single"], in_memory, *paths], topk=2)
    assert len(predictions) == 7
    assert predictions[1].source == "<image 1>"
    for prediction in predictions:
        assert len(prediction.topk) == 2 and prediction.brand in CARS5
        assert prediction.probability == prediction.topk[0].probability >= prediction.topk[1].probability
    # a PIL image and its file give the same answer
    assert predictions[0].brand == predictions[1].brand
    assert predictions[0].probability == pytest.approx(predictions[1].probability, abs=1e-6)
    # batching does not change anything
    one_by_one = [predictor.predict(path, topk=2)[0] for path in paths]
    assert [p.brand for p in one_by_one] == [p.brand for p in predictions[2:]]
    assert [p.probability for p in one_by_one] == pytest.approx([p.probability for p in predictions[2:]], abs=1e-5)

    from carbrand.errors import DataError

    with pytest.raises(DataError, match="not an image"):
        predictor.predict([photos["text"]])


def test_preprocessing_is_the_torchvision_eval_loaders(export, cars5_dir):
    from carbrand.data.manifest import Sample
    from carbrand.data.torch_loader import EvalDataset
    from carbrand.inference.predict import Predictor, load_image

    predictor = Predictor.from_checkpoint(export, device="cpu")
    samples = [Sample(path=p, label=0, brand="audi") for p in sorted((cars5_dir / "test" / "audi").iterdir())[:3]]
    dataset = EvalDataset(samples, predictor.image_size, 0.875)
    for index, sample in enumerate(samples):
        expected, _, _ = dataset[index]
        assert torch.equal(predictor.preprocess(load_image(sample.path)), expected)


def test_predictor_agrees_with_the_evaluator(export, photos, tmp_path, fresh_accelerate_state):
    """Same model, same torchvision preprocessing: the evaluator's confidence is the predictor's probability."""
    import csv

    from carbrand import evaluate
    from carbrand.inference.predict import Predictor

    raw = tmp_path / "raw"
    for path in sorted(photos["folder"].rglob("car.jpg")):
        (raw / path.parent.name).mkdir(parents=True)
        shutil.copy(path, raw / path.parent.name / "car.jpg")
    code = evaluate.main(["--checkpoint", str(export), "--data", str(raw), "--out", str(tmp_path / "eval"),
                          "--loader", "torchvision", "--workers", "0", "--batch-size", "2", "--wandb-mode", "disabled"])
    assert code == 0
    with (tmp_path / "eval" / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    predictions = Predictor.from_checkpoint(export, device="cpu").predict([r["path"] for r in rows], topk=1)
    assert len(rows) == len(predictions) == 5, (rows, predictions)  # zip would stop at the shorter silently
    for row, prediction in zip(rows, predictions):
        assert prediction.brand == row["predicted_brand"]
        assert prediction.probability == pytest.approx(float(row["confidence"]), abs=1e-4)


@pytest.mark.parametrize("case", ["missing checkpoint", "not an export", "other architecture", "more brands than weights"])
def test_bad_checkpoint_is_one_line(case, export, photos, tmp_path, capsys):
    if case == "missing checkpoint":
        checkpoint = tmp_path / "nope" / "best"
    elif case == "not an export":
        checkpoint = tmp_path / "plain"
        checkpoint.mkdir()
    elif case == "other architecture":
        checkpoint = make_export(tmp_path / "arch", arch_in_config="resnet50")
    else:
        checkpoint = tmp_path / "six"
        shutil.copytree(export, checkpoint)
        (checkpoint / "classes.json").write_text(json.dumps(CARS5 + ["tesla"]))
    code, out, err = predict_main("--checkpoint", checkpoint, photos["single"], capsys=capsys)
    assert code == 1 and out == "", err  # README: 1 for what the files hold or lack (2 is for usage errors)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("carbrand predict: error:"), err
