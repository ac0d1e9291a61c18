"""Stanford Cars: the real devkit annotation files, and prepare on stand-in images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from carbrand.errors import DataError
from carbrand.prepare.command import prepare_dataset
from carbrand.prepare.sources import detect_format
from carbrand.prepare.stanford_cars import make_of, read_annotations, read_class_names
from tests.helpers.image_factory import write_jpeg
from tests.helpers.stanford_cars_devkit import STAND_IN_BOX, STAND_IN_SIZE, write_annotations, write_stand_in_devkit


def test_real_class_names_reduce_to_49_makes(devkit_dir):
    names = read_class_names(devkit_dir)
    assert len(names) == 196
    makes = {make_of(name) for name in names}
    assert len(makes) == 49
    assert {"AM General", "Aston Martin", "Land Rover", "Mercedes-Benz", "Rolls-Royce", "smart", "HUMMER", "Ram"} <= makes
    # No make is a prefix fragment of a multi-word make.
    assert not {"AM", "Aston", "Land", "General", "Martin", "Rover"} & makes
    assert make_of("AM General Hummer SUV 2000") == "AM General"
    assert make_of("Ram C/V Cargo Van Minivan 2012") == "Ram"
    assert make_of("Land Rover LR2 SUV 2012") == "Land Rover"


def test_real_training_annotations(devkit_dir):
    names = read_class_names(devkit_dir)
    annotations = read_annotations(devkit_dir / "cars_train_annos.mat", len(names))
    assert len(annotations) == 8144
    assert annotations[0].fname == "00001.jpg" and annotations[-1].fname == "08144.jpg"
    assert annotations[0].box == (39, 116, 569, 375)
    assert make_of(names[annotations[0].class_index]) == "Audi"  # class 14: Audi TTS Coupe 2012
    assert len({make_of(names[a.class_index]) for a in annotations}) == 49


def test_unlabelled_test_annotations_are_refused(devkit_dir):
    with pytest.raises(DataError, match="lack the field.*class"):
        read_annotations(devkit_dir / "cars_test_annos.mat", 196)


@pytest.fixture
def stand_in(devkit_dir, tmp_path):
    """A devkit with 36 of the real training annotations (12 each of three makes) and stand-in JPEGs."""
    return write_stand_in_devkit(devkit_dir, tmp_path)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_meta_written_by_the_test_reads_like_the_real_one(stand_in, devkit_dir):
    devkit, _, _ = stand_in
    assert read_class_names(devkit) == read_class_names(devkit_dir)


def test_prepare_stand_in_images(stand_in, tmp_path):
    devkit, images, rows = stand_in
    assert detect_format(devkit) == "stanford-cars"
    summary = prepare_dataset(devkit, tmp_path / "out", images=images, quiet=True, workers=2)
    assert summary.classes == ["Aston Martin", "BMW", "Land Rover"]
    assert {split: sum(c.values()) for split, c in summary.counts.items()} == {"train": 30, "val": 3, "test": 3}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["format"] == "stanford-cars" and manifest["root"] == str(images.resolve())
    assert read_csv(tmp_path / "out" / "train.csv")[0]["path"].startswith("cars_train/")


def test_prepare_with_crops(stand_in, tmp_path):
    devkit, images, _ = stand_in
    out = tmp_path / "out"
    prepare_dataset(devkit, out, images=images, crop_boxes=True, quiet=True, workers=2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["root"] == str((out / "crops").resolve())
    rows = read_csv(out / "train.csv")
    from PIL import Image

    with Image.open(out / "crops" / rows[0]["path"]) as crop:
        assert crop.size == (100, 70)
    assert manifest["image_sizes"]["min_short_side"] == 70


def test_images_directly_in_the_images_folder(stand_in, tmp_path):
    devkit, images, rows = stand_in
    for _, _, fname in rows:
        (images / "cars_train" / fname).rename(images / fname)
    (images / "cars_train").rmdir()
    summary = prepare_dataset(devkit, tmp_path / "out", images=images, quiet=True, workers=2)
    assert summary.total("train") + summary.total("val") + summary.total("test") == 36


def test_labelled_test_file_becomes_the_test_split(stand_in, tmp_path):
    devkit, images, rows = stand_in
    test_rows = [(STAND_IN_BOX, label, f"t{k:05d}.jpg") for k, (_, label, _) in enumerate(rows[::4])]
    write_annotations(devkit / "cars_test_annos_withlabels.mat", test_rows)
    for k, (_, _, fname) in enumerate(test_rows):
        write_jpeg(images / "cars_test" / fname, 500 + k, STAND_IN_SIZE)
    summary = prepare_dataset(devkit, tmp_path / "out", images=images, quiet=True, workers=2)
    tested = [row["path"] for row in read_csv(tmp_path / "out" / "test.csv")]
    assert sorted(tested) == sorted(f"cars_test/{fname}" for _, _, fname in test_rows)
    assert summary.total("train") + summary.total("val") == 36


def test_missing_images_are_counted_and_named(stand_in, tmp_path):
    devkit, images, rows = stand_in
    for _, _, fname in rows[:5]:
        (images / "cars_train" / fname).unlink()
    with pytest.raises(DataError, match=rf"5 of 36 annotated images are missing under .*\(e\.g\. cars_train/{rows[0][2]}, "):
        prepare_dataset(devkit, tmp_path / "out", images=images, quiet=True)


def test_no_image_folder_asks_for_images(stand_in, tmp_path):
    devkit, _, _ = stand_in
    from carbrand.errors import UsageError

    with pytest.raises(UsageError, match="--images"):
        prepare_dataset(devkit, tmp_path / "out", quiet=True)


# --- The real Stanford Cars sample (../shared/data/stanford_cars_sample: 1,565 photos, 49 makes) end to end ---

SAMPLE_PHOTOS = 1565


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    from tests.conftest import shared_folder

    return shared_folder("stanford_cars_sample", "Stanford Cars sample")


@pytest.fixture(scope="session")
def prepared_sample(sample_dir, tmp_path_factory):
    """The sample prepared with the defaults, once per session: (summary, output folder)."""
    out = tmp_path_factory.mktemp("prepared_stanford_cars")
    return prepare_dataset(sample_dir, out, format="stanford-cars", quiet=True), out


@pytest.fixture(scope="session")
def prepared_sample_crops(sample_dir, tmp_path_factory):
    """The sample prepared with --crop-boxes, once per session: (summary, output folder)."""
    out = tmp_path_factory.mktemp("prepared_stanford_cars_crops")
    return prepare_dataset(sample_dir, out, format="stanford-cars", crop_boxes=True, quiet=True), out


def annotated_makes(sample_dir: Path) -> dict[str, int]:
    from collections import Counter

    names = read_class_names(sample_dir / "devkit")
    return dict(Counter(make_of(names[a.class_index]) for a in read_annotations(sample_dir / "devkit" / "cars_train_annos.mat", len(names))))


def all_counts(summary) -> dict[str, int]:
    return {brand: sum(summary.counts[split][brand] for split in summary.counts) for brand in summary.classes}


def test_the_sample_prepares_with_every_photo_and_the_annotated_makes(prepared_sample, sample_dir):
    summary, out = prepared_sample
    assert summary.rejected == []  # the default --min-side keeps the real thumbnails (short side down to 35 px)
    expected = annotated_makes(sample_dir)
    assert len(expected) == 49 and sum(expected.values()) == SAMPLE_PHOTOS
    assert summary.classes == sorted(expected) and all_counts(summary) == expected
    assert json.loads((out / "classes.json").read_text()) == sorted(expected)
    rows = sum(len(read_csv(out / f"{split}.csv")) for split in ("train", "val", "test"))
    assert rows == SAMPLE_PHOTOS and summary.manifest["image_sizes"]["min_short_side"] < 64


def test_the_sample_prepares_with_crop_boxes(prepared_sample_crops, sample_dir):
    """The sample's files are the annotated boxes already cropped (each is exactly (x2-x1) x (y2-y1)): used whole."""
    from PIL import Image

    summary, out = prepared_sample_crops
    assert summary.rejected == [] and all_counts(summary) == annotated_makes(sample_dir)
    for row in read_csv(out / "train.csv")[:20]:
        with Image.open(sample_dir / "cars_train" / Path(row["path"]).name) as photo, Image.open(out / "crops" / row["path"]) as crop:
            assert crop.size == photo.size


def test_crop_regions_of_real_boxes():
    from carbrand.prepare.verify import crop_region

    assert crop_region((600, 400), (39, 116, 569, 375)) == (38, 115, 569, 375)  # 00001.jpg in the full dataset
    assert crop_region((88, 35), (1, 1, 88, 36)) == (0, 0, 88, 35)  # the devkit's 1-pixel overrun: clipped
    assert crop_region((3159, 1176), (190, 780, 3349, 1956)) == (0, 0, 3159, 1176)  # the sample's 01579.jpg: pre-cropped
    assert crop_region((256, 127), (259, 289, 515, 416)) == (0, 0, 256, 127)  # the sample's 00006.jpg: pre-cropped too
    assert "mostly outside the 256x127 image" in crop_region((256, 127), (100, 50, 600, 400))  # another copy's box


def test_the_sample_keeps_each_photos_car_model(prepared_sample, sample_dir):
    """Each row's car_model is its annotation's class ("Make Model Year"), inside the row's make."""
    _, out = prepared_sample
    names = read_class_names(sample_dir / "devkit")
    annotated = {a.fname: names[a.class_index] for a in read_annotations(sample_dir / "devkit" / "cars_train_annos.mat", len(names))}
    car_models = json.loads((out / "car_models.json").read_text())
    assert [m["name"] for m in car_models] == sorted(set(annotated.values()))
    assert all(m["brand"] == make_of(m["name"]) for m in car_models)
    rows = [row for split in ("train", "val", "test") for row in read_csv(out / f"{split}.csv")]
    assert len(rows) == SAMPLE_PHOTOS and all(row["car_model"] == annotated[Path(row["path"]).name] for row in rows)


def test_train_on_car_models_with_two_processes_then_evaluate_predict_and_export_answer_makes(
        prepared_sample_crops, sample_dir, tmp_path, capsys):
    """data.labels car_model: the head has one output per car model; every reader of best/ gets makes, each the sum of
    its car models' probabilities, and the ONNX export gives the same make logits."""
    import subprocess
    import sys

    import onnxruntime
    from safetensors.torch import load_file

    from carbrand.checkpoint import load_export_model
    from carbrand.cli import main
    from carbrand.data.images import Normalizer, load_rgb
    from carbrand.data.torch_loader import eval_transform
    from carbrand.inference import predict
    from carbrand.model import build_model
    from tests.helpers.subprocesses import assert_ok, subprocess_environment
    from tests.helpers.training_runs import read_metrics, run_training

    _, prepared = prepared_sample_crops
    run_dir = tmp_path / "run"
    result = run_training(prepared, run_dir, "data.image_size=32", "data.batch_size=16", "train.max_steps=3",
                          "data.labels=car_model", "train.log_every=1", "data.workers=1", num_processes=2)
    assert_ok(result)
    assert any(record.get("step") == 3 for record in read_metrics(run_dir))
    car_models = json.loads((prepared / "car_models.json").read_text())
    assert json.loads((run_dir / "best" / "car_models.json").read_text()) == car_models
    head = load_file(str(run_dir / "best" / "model.safetensors"))["fc.weight"]
    assert head.shape[0] == len(car_models) > 49

    # The make probabilities are the car-model softmax summed per make.
    model, export = load_export_model(run_dir / "best")
    network = build_model(export.config.model.arch, len(car_models))
    network.load_state_dict(load_file(str(run_dir / "best" / "model.safetensors")))
    photos = [prepared / "crops" / row["path"] for row in read_csv(prepared / "test.csv")[:12]]
    data = export.config.data
    normalize = Normalizer(torch.device("cpu"), torch.float32, channels_last=False, mean=data.mean, std=data.std)
    images = normalize(torch.stack([eval_transform(load_rgb(p), data.eval_size, data.eval_crop_fraction) for p in photos]))
    with torch.inference_mode():
        makes = model(images).softmax(dim=1)
        by_car_model = network.eval()(images).softmax(dim=1)
    brand_of = torch.tensor([export.classes.index(m["brand"]) for m in car_models])
    summed = torch.zeros(len(photos), len(export.classes)).index_add_(1, brand_of, by_car_model)
    assert makes.shape == (len(photos), 49) and torch.allclose(makes, summed, atol=1e-6)

    evaluation = subprocess.run([sys.executable, "-m", "carbrand.evaluate", "--checkpoint", str(run_dir / "best"), "--data",
                                 str(prepared), "--split", "test", "--out", str(tmp_path / "eval")],
                                capture_output=True, text=True, timeout=600, env=subprocess_environment())
    assert_ok(evaluation)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["samples"] == len(read_csv(prepared / "test.csv")) and 0 <= metrics["accuracy"] <= 1
    photo = sorted((sample_dir / "cars_train").glob("*.jpg"))[0]
    assert predict.main(["--checkpoint", str(run_dir / "best"), str(photo), "--json", "--topk", "3"]) == 0
    prediction = json.loads(capsys.readouterr().out)["predictions"][0]
    assert len(prediction["topk"]) == 3 and all(entry["brand"] in annotated_makes(sample_dir) for entry in prediction["topk"])

    assert main(["export", "--checkpoint", str(run_dir / "best"), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = torch.as_tensor(session.run(["logits"], {"images": images.numpy()})[0])
    with torch.inference_mode():
        assert torch.allclose(onnx_logits, model(images), atol=1e-4)


def test_car_model_labels_need_a_dataset_that_has_them(prepared_cars5, tmp_path, capsys):
    from carbrand.cli import main
    from tests.helpers.training_runs import CPU_RECIPE

    code = main(["train", "--config", str(CPU_RECIPE), f"data.manifest={prepared_cars5}",
                 f"output.dir={tmp_path / 'run'}", "data.labels=car_model"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "config key 'data.labels'" in err and f"{prepared_cars5} has no car_models.json" in err
    assert not (tmp_path / "run").exists()
