"""One pixel limit from prepare to serve: `prepare --max-pixels` above the 80 MP default is recorded in manifest.json,
training's loader applies it and writes it into the export (data.max_pixels), and evaluate and predict apply the same
number, each refusal in one message naming the file and the limit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from carbrand.config import load_config
from carbrand.data.images import over_pixel_limit
from carbrand.errors import ConfigError
from carbrand.prepare.command import prepare_dataset
from carbrand.train import with_dataset_pixel_limit
from tests.helpers.fault_runs import TINY, fault_environment
from tests.helpers.image_factory import write_brand_tree
from tests.helpers.subprocesses import assert_ok
from tests.helpers.training_runs import run_training

RAISED = 90_000_000
HUGE_SIZE = (9_000, 9_000)  # 81 MP: over the 80 MP default, under RAISED


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """train/ and test/ of two brands; train/alfa holds one 81 MP grey PNG (a few kB on disk, 81 MB decoded)."""
    root = tmp_path_factory.mktemp("pixel_limit") / "source"
    write_brand_tree(root / "train", {"alfa": 3, "brio": 3})
    write_brand_tree(root / "test", {"alfa": 2, "brio": 2}, first_seed=10)
    Image.new("L", HUGE_SIZE, 128).save(root / "train" / "alfa" / "huge.png")
    return root


def prepare(source: Path, out: Path, **options):
    return prepare_dataset(source, out, quiet=True, workers=1, val_frac=0.0, near_duplicate_distance=-1, **options)


def test_a_raised_limit_lets_prepare_training_evaluate_and_predict_read_the_same_image(source, tmp_path, capsys):
    huge = source / "train" / "alfa" / "huge.png"
    default = prepare(source, tmp_path / "default")
    assert default.rejected == [{"path": "train/alfa/huge.png", "reason": "too many pixels: 9000x9000 = 81000000 "
                                 "pixels is over the limit of 80000000 pixels (prepare --max-pixels)"}]

    prepared = tmp_path / "raised"
    summary = prepare(source, prepared, max_pixels=RAISED)
    assert summary.rejected == [] and json.loads((prepared / "manifest.json").read_text())["max_pixels"] == RAISED

    # One step over the whole train split (a batch of all 7 images): training's loader decodes the 81 MP image.
    run_dir = tmp_path / "run"
    result = run_training(prepared, run_dir, *TINY, "data.loader=torchvision", "data.batch_size=7", "train.max_steps=1",
                          "train.epochs=1", env=fault_environment())
    assert_ok(result)
    assert load_config(run_dir / "best" / "config.yaml", []).data.max_pixels == RAISED, "the export carries the limit"

    from carbrand import evaluate
    from carbrand.inference import predict

    out = tmp_path / "evaluation"
    assert evaluate.main(["--checkpoint", str(run_dir / "best"), "--data", str(prepared), "--split", "train",
                          "--out", str(out), "--loader", "torchvision", "--workers", "0"]) == 0
    assert "huge.png" in (out / "predictions.csv").read_text()
    capsys.readouterr()
    assert predict.main(["--checkpoint", str(run_dir / "best"), str(huge)]) == 0
    assert capsys.readouterr().out.startswith(f"{huge}: ")

    from carbrand.bench.http_client import FilePart
    from tests.helpers.serving import serving

    with serving(run_dir / "best", tmp_path / "serve") as server:  # serve reads the limit from the export too
        answer = server.client().predict([FilePart("huge.png", huge.read_bytes(), content_type="image/png")])
        assert answer.status == 200, answer.body


def test_a_config_limit_that_differs_from_the_datasets_is_one_line(source, tmp_path):
    prepared = tmp_path / "raised"
    prepare(source, prepared, max_pixels=RAISED)
    resolved = with_dataset_pixel_limit(load_config(None, [f"data.manifest={prepared}"]))
    assert resolved.data.max_pixels == RAISED
    with pytest.raises(ConfigError) as error:
        with_dataset_pixel_limit(load_config(None, [f"data.manifest={prepared}", "data.max_pixels=80000000"]))
    assert str(error.value) == (f"config key 'data.max_pixels' (80000000) differs from the {RAISED} pixels "
                                f"{prepared / 'manifest.json'} was prepared with; leave it 0, or run `carbrand prepare "
                                f"--max-pixels` again to change the limit")


def test_an_export_without_the_raised_limit_refuses_the_image_in_the_same_words(source, tmp_path, capsys):
    """An export whose config has no data.max_pixels (0: the default): predict refuses the 81 MP image, while
    evaluate on the dataset prepared with the raised limit reads it (the dataset's limit is what its images passed)."""
    from carbrand import evaluate
    from carbrand.checkpoint import plain_state_dict, save_export
    from carbrand.inference import predict
    from carbrand.model import build_model

    export = save_export(tmp_path / "export", plain_state_dict(build_model("resnet18", 2)), ["alfa", "brio"],
                         load_config(None, ["model.arch=resnet18", "data.image_size=32"]))
    huge = source / "train" / "alfa" / "huge.png"
    assert predict.main(["--checkpoint", str(export), str(huge)]) == 1
    assert capsys.readouterr().err.strip() == f"carbrand predict: error: {huge}: {over_pixel_limit(*HUGE_SIZE, 0)}"

    prepared = tmp_path / "raised"
    prepare(source, prepared, max_pixels=RAISED)
    out = tmp_path / "evaluation"
    assert evaluate.main(["--checkpoint", str(export), "--data", str(prepared), "--split", "train", "--out", str(out),
                          "--loader", "torchvision", "--workers", "0"]) == 0
    assert "huge.png" in (out / "predictions.csv").read_text()


def test_prepare_refuses_a_limit_above_what_pillow_decodes(source, tmp_path):
    from carbrand.errors import UsageError

    with pytest.raises(UsageError, match=r"--max-pixels 200000000 is above 178956970, where Pillow itself refuses"):
        prepare(source, tmp_path / "out", max_pixels=200_000_000)
