"""The evaluator on real cars5 photos: 1 and 2 processes, brand matching by name, raw folders, bad inputs.

The export is not made by the trainer: `fitted_cars5_export` (tests/helpers/exports.py) fits a
resnet18's BatchNorm statistics and head to cars5's training photos in one forward pass, so its
predictions are above chance but far from perfect — there are mistakes to count.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from sklearn import metrics as skm

from carbrand.checkpoint import plain_state_dict, save_export
from carbrand.model import build_model
from carbrand.prepare.command import prepare_dataset
from tests.helpers.exports import CARS5, export_config, reference_probabilities
from tests.helpers.paths import REPO
from tests.helpers.subprocesses import assert_ok, subprocess_environment
from tests.helpers.training_runs import launch_command

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # in-process runs create an Accelerator

EVALUATE = REPO / "carbrand" / "evaluate.py"


@pytest.fixture(scope="module")
def fitted_export(fitted_cars5_export: Path) -> Path:
    return fitted_cars5_export


def evaluate_in_process(*args: str) -> int:
    from carbrand import evaluate

    return evaluate.main([str(a) for a in args])


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def read_outputs(out: Path) -> tuple[dict, list[dict[str, str]]]:
    return json.loads((out / "metrics.json").read_text()), read_csv(out / "predictions.csv")


def check_against_sklearn(metrics: dict, rows: list[dict[str, str]], classes: list[str]) -> None:
    """metrics.json agrees with scikit-learn run on the per-sample predictions the evaluator wrote."""
    known = [r for r in rows if r["known"] == "1"]
    truth = [r["true_brand"] for r in known]
    predicted = [r["predicted_brand"] for r in known]
    assert metrics["samples"] == len(known)
    assert metrics["accuracy"] == pytest.approx(skm.accuracy_score(truth, predicted), abs=1e-9)
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = skm.precision_recall_fscore_support(truth, predicted, average=average, zero_division=0)
        assert metrics[f"{average}_precision"] == pytest.approx(precision, abs=1e-9)
        assert metrics[f"{average}_recall"] == pytest.approx(recall, abs=1e-9)
        assert metrics[f"{average}_f1"] == pytest.approx(f1, abs=1e-9)
    brands = metrics["confusion_matrix"]["brands"]
    assert brands == [c for c in classes if c in set(truth) | set(predicted)]  # model order, present brands only
    assert metrics["confusion_matrix"]["counts"] == skm.confusion_matrix(truth, predicted, labels=brands).tolist()
    hits = [r["true_brand"] in json.loads(r["topk_brands"])[: metrics["top_k"]] for r in known]
    assert metrics["top_k_accuracy"] == pytest.approx(sum(hits) / len(hits), abs=1e-9)
    assert all(r["predicted_brand"] == json.loads(r["topk_brands"])[0] for r in rows)


@pytest.fixture(scope="module")
def cars5_runs(fitted_export, prepared_cars5, tmp_path_factory) -> dict:
    """The cars5 test split evaluated by 1 process (file form) and by 2 over gloo (accelerate launch)."""
    tmp_path = tmp_path_factory.mktemp("cars5_eval")
    common = ["--checkpoint", fitted_export, "--data", prepared_cars5, "--split", "test"]
    one = launch_command(1, EVALUATE) + [*common, "--out", tmp_path / "one", "--batch-size", "7"]  # 100 = 14 x 7 + 2
    two = launch_command(2, EVALUATE) + [*common, "--out", tmp_path / "two", "--batch-size", "9"]  # 50 per rank = 5 x 9 + 5
    # Both at once: the machine has few cores and each run is mostly start-up.
    runs = [subprocess.Popen([str(a) for a in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=subprocess_environment(), cwd=tmp_path) for command in (one, two)]
    outputs = [run.communicate(timeout=300) for run in runs]
    results = [subprocess.CompletedProcess(run.args, run.returncode, *output) for run, output in zip(runs, outputs)]
    return {"dir": tmp_path, "one": tmp_path / "one", "two": tmp_path / "two", "results": results, "export": fitted_export}


def check_against_the_manifest_and_a_forward_pass(rows: list[dict[str, str]], prepared: Path, export: Path) -> None:
    """The rows the sklearn check reads are not taken on the evaluator's word: each true_brand is the one
    test.csv gives its photo, and a forward pass made apart (tests/helpers/exports.py) predicts the same
    brand for every 10th photo. (DALI decodes a little differently from PIL: probabilities differ by up
    to 0.05, measured, so only photos whose best brand leads by more than 0.1 are compared.)"""
    manifest = read_csv(prepared / "test.csv")  # read here as plain CSV, in the split's order
    assert len(rows) == len(manifest)
    for row, sample in zip(rows, manifest):
        assert Path(row["path"]).as_posix().endswith("/" + sample["path"]), (row["path"], sample["path"])
        assert row["true_brand"] == sample["brand"], row
    picked = rows[::10]
    probabilities = reference_probabilities(export, [Path(r["path"]) for r in picked])
    top2 = probabilities.topk(2, dim=1)
    clear = [(row, CARS5[best]) for row, best, (first, second) in zip(picked, top2.indices[:, 0].tolist(), top2.values.tolist())
             if first - second > 0.1]
    assert len(clear) >= 5, "too few clear-cut photos to compare"
    assert [row["predicted_brand"] for row, _ in clear] == [brand for _, brand in clear]


def test_one_and_two_processes_count_every_image_once_and_agree(cars5_runs, prepared_cars5):
    from carbrand.data.manifest import load_prepared

    test_split = load_prepared(prepared_cars5).split("test")
    tmp_path = cars5_runs["dir"]
    for result in cars5_runs["results"]:
        assert_ok(result)
        assert result.stdout.count("wrote ") == 1  # only the main process prints the summary
        assert "accuracy" in result.stdout and "lamborghini" in result.stdout

    one_metrics, one_rows = read_outputs(tmp_path / "one")
    two_metrics, two_rows = read_outputs(tmp_path / "two")
    assert one_metrics["world_size"] == 1 and two_metrics["world_size"] == 2
    for metrics, rows in ((one_metrics, one_rows), (two_metrics, two_rows)):
        assert metrics["samples"] == metrics["split_samples"] == len(test_split) == 100
        assert [int(r["index"]) for r in rows] == list(range(100))
        assert [r["path"] for r in rows] == [str(s.path) for s in test_split]
        check_against_sklearn(metrics, rows, CARS5)
        check_against_the_manifest_and_a_forward_pass(rows, prepared_cars5, cars5_runs["export"])
        assert 0.0 < metrics["accuracy"] < 1.0  # right and wrong answers both present
        assert sum(v["predicted"] > 0 for v in metrics["per_class"].values()) >= 3  # not one brand for everything
        mistakes = read_csv(tmp_path / ("one" if metrics is one_metrics else "two") / "misclassified.csv")
        assert len(mistakes) == round(100 * (1 - metrics["accuracy"]))
        assert all(m["true_brand"] != m["predicted_brand"] for m in mistakes)
        assert [float(m["confidence"]) for m in mistakes] == sorted((float(m["confidence"]) for m in mistakes), reverse=True)

    # The same numbers whatever the world size and batch size (floats up to summation order).
    for key, value in one_metrics.items():
        if key in ("world_size", "seconds", "batch_size"):
            continue
        if isinstance(value, float):
            assert two_metrics[key] == pytest.approx(value, abs=1e-6), key
        elif not key.startswith("calibration"):  # reliability bins: floats up to summation order
            assert two_metrics[key] == value, key
    assert [r["predicted_brand"] for r in one_rows] == [r["predicted_brand"] for r in two_rows]

    out = tmp_path / "one"
    per_class = read_csv(out / "per_class.csv")
    assert [r["brand"] for r in per_class] == CARS5 and sum(int(r["support"]) for r in per_class) == 100
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # no temporary directory left over


def copy_photos(cars5_dir: Path, root: Path, picks: dict[str, tuple[str, str, int]]) -> Path:
    """root/<brand>/ with `count` photos taken from cars5/<split>/<source brand>/."""
    for brand, (split, source, count) in picks.items():
        (root / brand).mkdir(parents=True)
        for photo in sorted((cars5_dir / split / source).iterdir())[:count]:
            shutil.copy(photo, root / brand / photo.name)
    return root


def predictions_by_photo(rows: list[dict[str, str]]) -> dict[tuple[str, str], dict[str, str]]:
    return {(r["true_brand"], Path(r["path"]).name): r for r in rows}


def test_raw_folder_with_some_brands_matches_brands_by_name(cars5_runs, fitted_export, cars5_dir, tmp_path):
    # 3 of the model's 5 brands: the data's labels 0,1,2 are the model's 1,3,4.
    raw = copy_photos(cars5_dir, tmp_path / "raw", {b: ("test", b, 4) for b in ("bmw", "lamborghini", "mercedes")})
    assert evaluate_in_process("--checkpoint", fitted_export, "--data", raw, "--out", tmp_path / "out", "--batch-size", "5") == 0
    metrics, rows = read_outputs(tmp_path / "out")
    assert metrics["split_samples"] == metrics["samples"] == 12 and metrics["data_kind"] == "raw flat image folder"
    assert metrics["model_brands_not_in_data"] == ["audi", "ferrari"]
    assert {b: v["support"] for b, v in metrics["per_class"].items() if v["support"]} == {"bmw": 4, "lamborghini": 4, "mercedes": 4}
    check_against_sklearn(metrics, rows, CARS5)
    # Each photo gets exactly the prediction and true-brand probability it got in the full 5-brand run:
    # a label mapped by index instead of by name would change the true-brand probability.
    reference = predictions_by_photo(read_outputs(cars5_runs["one"])[1])
    for key, row in predictions_by_photo(rows).items():
        assert row["predicted_brand"] == reference[key]["predicted_brand"]
        assert float(row["true_brand_probability"]) == pytest.approx(float(reference[key]["true_brand_probability"]), abs=1e-5)


def test_a_brand_neither_in_the_data_nor_predicted_stays_out_of_the_macro_averages(fitted_export, cars5_dir, tmp_path):
    """Evaluating on some of the model's brands: a brand absent from the truth and from the predictions is not
    in scikit-learn's label set, so it must not pull the macro averages towards 0 (a mean over all brands would)."""
    from safetensors.torch import load_file, save_file

    never_ferrari = tmp_path / "never_ferrari"
    shutil.copytree(fitted_export, never_ferrari)
    weights = load_file(str(never_ferrari / "model.safetensors"))
    weights["fc.bias"][CARS5.index("ferrari")] = -1e4  # never the best brand, whatever the photo
    save_file(weights, str(never_ferrari / "model.safetensors"))
    raw = copy_photos(cars5_dir, tmp_path / "raw", {b: ("test", b, 5) for b in ("audi", "bmw", "lamborghini", "mercedes")})
    assert evaluate_in_process("--checkpoint", never_ferrari, "--data", raw, "--out", tmp_path / "out", "--batch-size", "8") == 0
    metrics, rows = read_outputs(tmp_path / "out")
    truth, predicted = [r["true_brand"] for r in rows], [r["predicted_brand"] for r in rows]
    assert "ferrari" not in truth + predicted and metrics["samples"] == 20
    check_against_sklearn(metrics, rows, CARS5)
    assert "ferrari" not in metrics["per_class"] and metrics["model_brands_not_in_data"] == ["ferrari"]
    _, _, over_all_brands, _ = skm.precision_recall_fscore_support(truth, predicted, labels=CARS5, average="macro",
                                                                   zero_division=0)
    assert metrics["macro_f1"] != pytest.approx(over_all_brands, abs=1e-3), "the case cannot tell the label sets apart"


def test_unknown_brand_is_an_error_or_reported_apart(fitted_export, cars5_dir, tmp_path, capsys, monkeypatch):
    raw = copy_photos(cars5_dir, tmp_path / "raw", {"bmw": ("test", "bmw", 3), "mercedes": ("test", "mercedes", 3),
                                                    "tesla": ("train", "audi", 3)})
    out = tmp_path / "out"
    assert evaluate_in_process("--checkpoint", fitted_export, "--data", raw, "--out", out) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "'tesla'" in error and "--unknown-brands report" in error
    assert not out.exists()

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert evaluate_in_process("--checkpoint", fitted_export, "--data", raw, "--out", out, "--unknown-brands", "report",
                               "--wandb-mode", "offline", "--tta-flip", "--topk", "2", "--loader", "torchvision") == 0
    console = capsys.readouterr().out
    assert "3 images of brand 'tesla' the model does not know" in console
    metrics, rows = read_outputs(out)
    assert metrics["split_samples"] == 9 and metrics["samples"] == 6 and metrics["tta_flip"] and metrics["top_k"] == 2
    unknown = metrics["unknown_brands"]
    assert unknown["samples"] == 3 and list(unknown["brands"]) == ["tesla"]
    assert sum(unknown["brands"]["tesla"]["predicted"].values()) == 3
    assert set(unknown["brands"]["tesla"]["predicted"]) <= set(CARS5)
    assert sorted(r["known"] for r in rows) == ["0"] * 3 + ["1"] * 6
    check_against_sklearn(metrics, rows, CARS5)  # metrics over the 6 known-brand photos only
    assert "tesla" not in metrics["per_class"]
    # --tta-flip: each probability is the mean of the photo's and its mirror image's, from a forward pass made
    # here (PIL decoding like the torchvision loader: measured agreement 1e-5; a mirror alone moves them by > 0.03)
    paths = [Path(r["path"]) for r in rows]
    plain = reference_probabilities(fitted_export, paths)
    expected = (plain + reference_probabilities(fitted_export, paths, mirrored=True)) / 2
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected):
        top = want.topk(2)
        assert json.loads(row["topk_brands"]) == [CARS5[i] for i in top.indices.tolist()], row
        assert json.loads(row["topk_probabilities"]) == pytest.approx(top.values.tolist(), abs=1e-4), row
        assert float(row["confidence"]) == pytest.approx(float(top.values[0]), abs=1e-4), row
    assert (expected - plain).abs().max() > 0.01, "the mirror images change nothing: the check would prove nothing"
    assert list((out / "wandb").glob("offline-run-*")), "no offline W&B run was written"


def test_crops_along_the_longer_side_average_their_probabilities_in_evaluate_and_predict(fitted_export, cars5_dir,
                                                                                        tmp_path, capsys):
    """--crops 3: each photo's probabilities are the mean over its start, centre and end crops, from forward passes
    made here; predict --crops 3 answers the same, metrics.json says how the split was scored, and a bad count is
    one line naming the option."""
    from carbrand.inference.predict import Predictor

    raw = copy_photos(cars5_dir, tmp_path / "raw", {b: ("test", b, 2) for b in CARS5})
    out = tmp_path / "out"
    assert evaluate_in_process("--checkpoint", fitted_export, "--data", raw, "--out", out, "--crops", "3",
                               "--loader", "torchvision", "--gallery", "0", "--wandb-mode", "disabled") == 0
    metrics, rows = read_outputs(out)
    assert metrics["eval_crops"] == 3 and metrics["samples"] == 10
    paths = [Path(r["path"]) for r in rows]
    expected = reference_probabilities(fitted_export, paths, crops=3)
    for row, want in zip(rows, expected, strict=True):
        top = want.topk(len(CARS5))
        assert json.loads(row["topk_brands"]) == [CARS5[i] for i in top.indices.tolist()], row
        assert json.loads(row["topk_probabilities"]) == pytest.approx(top.values.tolist(), abs=1e-4), row
    centre_only = reference_probabilities(fitted_export, paths)
    assert (expected - centre_only).abs().max() > 0.01, "the crops change nothing: the check would prove nothing"
    predictions = Predictor.from_checkpoint(fitted_export, device="cpu", crops=3).predict(paths, topk=1)
    assert [p.probability for p in predictions] == pytest.approx(expected.max(dim=1).values.tolist(), abs=1e-4)

    assert evaluate_in_process("--checkpoint", fitted_export, "--data", raw, "--out", tmp_path / "bad", "--crops", "0") == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--crops must be in 1..8; got 0" in error, error
    assert not (tmp_path / "bad").exists()


def test_two_processes_verify_a_raw_folder_once_and_count_every_image_once(fitted_export, cars5_dir, tmp_path):
    """The main process prepares the raw folder; the other receives the list (no shared /tmp needed).

    What shows it ran once: the rejected file is reported once, not once per process.
    """
    raw = copy_photos(cars5_dir, tmp_path / "raw", {b: ("test", b, 5) for b in ("audi", "bmw", "ferrari")})
    (raw / "bmw" / "notes.jpg").write_text("not a photo\n")  # rejected by prepare's rules
    command = launch_command(2, EVALUATE) + ["--checkpoint", fitted_export, "--data", raw, "--out", tmp_path / "out",
                                             "--batch-size", "4"]
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=300,
                            env=subprocess_environment(), cwd=tmp_path)
    assert_ok(result)
    assert result.stderr.count("rejected, e.g. bmw/notes.jpg: not an image") == 1, result.stderr
    metrics, rows = read_outputs(tmp_path / "out")
    assert metrics["world_size"] == 2 and metrics["data_kind"] == "raw flat image folder"
    assert metrics["split_samples"] == metrics["samples"] == 15
    assert sorted(int(r["index"]) for r in rows) == list(range(15))
    assert sorted(Path(r["path"]).relative_to(raw.resolve()).as_posix() for r in rows) == sorted(
        p.relative_to(raw).as_posix() for p in raw.glob("*/*.jpg") if p.name != "notes.jpg")
    check_against_sklearn(metrics, rows, CARS5)


def test_raw_split_tree_gives_the_prepared_results(cars5_runs, fitted_export, cars5_dir, tmp_path):
    # cars5 itself is root/train|test/<brand>: verified on the fly, its own test folder is the split.
    assert evaluate_in_process("--checkpoint", fitted_export, "--data", cars5_dir, "--split", "test",
                               "--out", tmp_path / "out", "--batch-size", "16") == 0
    metrics, rows = read_outputs(tmp_path / "out")
    reference, reference_rows = read_outputs(cars5_runs["one"])
    assert metrics["samples"] == 100 and metrics["data_kind"] == "raw split image folder"
    assert [r["path"] for r in rows] == [r["path"] for r in reference_rows]
    assert metrics["confusion_matrix"]["counts"] == reference["confusion_matrix"]["counts"]
    assert metrics["accuracy"] == reference["accuracy"]


def test_an_image_over_the_pixel_limit_is_refused_in_one_line(fitted_export, cars5_dir, tmp_path, capsys):
    """The limit is the dataset's (manifest.json's max_pixels); a file over it (replaced after prepare) is one line."""
    from tests.helpers.image_factory import write_jpeg

    raw = copy_photos(cars5_dir, tmp_path / "raw", {b: ("test", b, 3) for b in ("bmw", "mercedes")})
    huge = write_jpeg(raw / "bmw" / "huge.jpg", seed=1, size=(601, 500))
    prepared = tmp_path / "prepared"
    prepare_dataset(raw, prepared, quiet=True, val_frac=0.0, test_frac=0.5, near_duplicate_distance=-1)
    manifest = json.loads((prepared / "manifest.json").read_text())
    # Lowered: cars5's largest photo has 262,094 pixels; the generated image has one column too many.
    (prepared / "manifest.json").write_text(json.dumps(manifest | {"max_pixels": 600 * 500}))
    split = "train" if "huge.jpg" in (prepared / "train.csv").read_text() else "test"
    out = tmp_path / "out"
    # torchvision with a worker process: the refusal crosses the DataLoader and still arrives as one line
    code = evaluate_in_process("--checkpoint", fitted_export, "--data", prepared, "--split", split, "--out", out,
                               "--loader", "torchvision", "--workers", "1", "--batch-size", "4")
    error = capsys.readouterr().err.strip()
    assert code == 1 and error == (f"carbrand evaluate: error: {huge.resolve()}: 601x500 = 300500 pixels is over the "
                                   f"limit of 300000 pixels (prepare --max-pixels)"), error
    assert not out.exists()


def test_a_raw_folder_is_verified_under_the_exports_pixel_limit(fitted_export, cars5_dir, tmp_path, capsys, monkeypatch):
    """Evaluate on a raw folder rejects an image over the limit with prepare's reason, as prepare would, and goes on."""
    from tests.helpers.image_factory import write_jpeg

    monkeypatch.setattr("carbrand.data.preprocessing.MAX_PIXELS", 600 * 500)  # the default: the export has no limit
    raw = copy_photos(cars5_dir, tmp_path / "raw", {b: ("test", b, 3) for b in ("bmw", "mercedes")})
    write_jpeg(raw / "bmw" / "huge.jpg", seed=1, size=(601, 500))
    out = tmp_path / "out"
    assert evaluate_in_process("--checkpoint", fitted_export, "--data", raw, "--out", out, "--loader", "torchvision",
                               "--workers", "0") == 0
    warning = capsys.readouterr().err
    assert "1 file(s) under " in warning and ("bmw/huge.jpg: too many pixels: 601x500 = 300500 pixels is over the "
                                              "limit of 300000 pixels (prepare --max-pixels)") in warning, warning
    assert "huge.jpg" not in (out / "predictions.csv").read_text()


def write_export(directory: Path, *, classes: list[str], arch_in_config: str = "resnet18", weights_arch: str = "resnet18",
                 weights_classes: int | None = None) -> Path:
    model = build_model(weights_arch, weights_classes or len(classes))
    return save_export(directory, plain_state_dict(model), classes, export_config(arch_in_config))


@pytest.mark.parametrize("case", ["missing checkpoint", "not an export", "more brands than weights",
                                  "other architecture", "missing data", "missing split", "bad topk", "out holds other files"])
def test_bad_inputs_fail_with_one_line_and_write_nothing(case, fitted_export, prepared_cars5, tmp_path, capsys):
    checkpoint, data, extra = fitted_export, prepared_cars5, []
    if case == "missing checkpoint":
        checkpoint = tmp_path / "runs" / "nothing" / "best"
    elif case == "not an export":
        checkpoint = tmp_path / "plain"
        checkpoint.mkdir()
        (checkpoint / "notes.txt").write_text("hello\n")
    elif case == "more brands than weights":
        checkpoint = write_export(tmp_path / "six", classes=CARS5 + ["tesla"], weights_classes=5)
    elif case == "other architecture":
        checkpoint = write_export(tmp_path / "arch", classes=CARS5, arch_in_config="resnet34")
    elif case == "missing data":
        data = tmp_path / "no_such_data"
    elif case == "missing split":
        extra = ["--split", "holdout"]
    elif case == "bad topk":
        extra = ["--topk", "0"]
    out = tmp_path / "out"
    if case == "out holds other files":  # e.g. --out RUN by mistake: never replaced
        (out / "checkpoints").mkdir(parents=True)
    code = evaluate_in_process("--checkpoint", checkpoint, "--data", data, "--out", out, *extra)
    captured = capsys.readouterr()
    # README: 2 for a usage error (an impossible option value), 1 for what the files hold or lack
    assert code == (2 if case == "bad topk" else 1), captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("carbrand evaluate: error:"), captured.err
    assert "Traceback" not in captured.err
    if case == "out holds other files":
        assert [p.name for p in out.iterdir()] == ["checkpoints"]
    else:
        assert not out.exists()
