"""Bad input to every command: one line naming the problem, a non-zero exit code (2 for usage), no traceback,
nothing changed on disk.

Each row runs the real `carbrand` dispatcher (carbrand.cli.main) in-process: an exception it
does not turn into one line fails the test, as it would print a traceback. Add a row per new
case, e.g.

    ("bench", "missing dataset", BENCH_DATA.replace("{prepared}", "{missing}"), 1, "{missing}"),

Deeper checks of single commands live beside them: tests/test_config.py (every bad config
value names its key), tests/test_evaluate.py::test_bad_inputs_fail_with_one_line_and_write_nothing,
tests/test_predict.py (broken and missing images among good ones), tests/test_prepare.py
(rejected images, bad options), tests/test_model.py (weights of another architecture).
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from carbrand import cli
from carbrand.checkpoint import plain_state_dict, save_export
from carbrand.config import load_config
from carbrand.model import build_model
from tests.helpers.fault_runs import tree
from tests.helpers.training_runs import CPU_RECIPE

CARS5 = ["audi", "bmw", "ferrari", "lamborghini", "mercedes"]
TRAIN = "train --config {recipe} data.manifest={prepared} output.dir={out} data.loader=torchvision data.workers=0"
EVALUATE = "evaluate --checkpoint {export} --data {prepared} --out {out}"
PREDICT = "predict --checkpoint {export} {photo}"
BENCH_DATA = "bench data --manifest {prepared} --backends torchvision --workers 1 --batches 1 --out {out}.json"
BENCH_TRAIN = "bench train --config {recipe} data.manifest={prepared} --steps 1 --warmup-steps 1 --out {out}.json"

CASES = [
    # (command, bad input, arguments with {fields} of the `inputs` fixture, exit code, what the line must name)
    ("prepare", "missing source", "prepare {missing} --out {existing_out}", 1, "{missing}"),
    ("prepare", "empty dataset", "prepare {empty_source} --out {existing_out}", 1, "no images"),
    ("prepare", "output is a file", "prepare {empty_source} --out {a_file}", 2, "{a_file}"),
    ("prepare", "wrong type", "prepare {empty_source} --out {out} --val-frac lots", 2, "--val-frac"),
    ("prepare", "impossible value", "prepare {empty_source} --out {out} --val-frac 0.7 --test-frac 0.5", 2, "--val-frac"),
    ("prepare", "unknown option", "prepare {empty_source} --out {out} --colour red", 2, "--colour"),
    ("train", "missing config", "train --config {missing}", 2, "{missing}"),
    ("train", "config with an unknown key", "train --config {unknown_key_recipe}", 2, "optim.learning_rate"),
    ("train", "config value of the wrong type", TRAIN + " data.batch_size=sixteen", 2, "data.batch_size"),
    ("train", "missing dataset", TRAIN + " data.manifest={missing}", 1, "{missing}"),
    ("train", "empty dataset", TRAIN + " data.manifest={empty_dataset}", 1, "no samples"),
    ("train", "manifest from an older format", TRAIN + " data.manifest={old_manifest}", 1, "format_version 0"),
    ("train", "car model of an unknown brand", TRAIN + " data.manifest={car_model_of_no_brand}", 1,
     "{car_model_of_no_brand}/car_models.json: brand(s) 'tesla' are not in classes.json"),
    ("train", "resume: missing checkpoint", TRAIN + " train.resume={missing}", 2, "{missing}"),
    ("train", "resume: another architecture", TRAIN + " train.resume={checkpoint_resnet34}", 1, "does not fit"),
    ("train", "resume: another number of brands", TRAIN + " train.resume={checkpoint_6_brands}", 1, "does not fit"),
    ("train", "resume: another optimizer", TRAIN + " train.resume={checkpoint_sgd}", 1, "training state does not fit"),
    ("train", "resume: not a checkpoint", TRAIN + " train.resume={checkpoint_junk}", 1, "cannot be loaded safely"),
    ("train", "resume: a file", TRAIN + " train.resume={a_file}", 1, "not a complete training checkpoint"),
    ("train", "weights of another architecture", TRAIN + " model.pretrained={weights_resnet34}", 2, "{weights_resnet34} does not fit"),
    ("train", "weights that are not weights", TRAIN + " model.pretrained={a_file}", 2, "{a_file} is not a readable weights file"),
    ("train", "missing weights file", TRAIN + " model.pretrained={missing}", 2, "weights file not found: {missing}"),
    ("train", "truncated weights file", TRAIN + " model.pretrained={weights_truncated}", 2, "{weights_truncated} is not a readable"),
    ("train", "weights file holding a pickled object", TRAIN + " model.pretrained={weights_pickled}", 2,
     "{weights_pickled} is not a readable weights file (refused by the weights-only loader"),
    ("train", "weights file holding no tensors", TRAIN + " model.pretrained={weights_not_a_state_dict}", 2,
     "{weights_not_a_state_dict} does not hold a state dict of tensors"),
    ("evaluate", "missing checkpoint", EVALUATE + " --checkpoint {missing}", 1, "{missing}"),
    ("evaluate", "missing dataset", EVALUATE + " --data {missing}", 1, "{missing}"),
    ("evaluate", "empty dataset", EVALUATE + " --data {empty_dataset}", 1, "no samples"),
    ("evaluate", "manifest from an older format", EVALUATE + " --data {old_manifest}", 1, "format_version 0"),
    ("evaluate", "another architecture", EVALUATE + " --checkpoint {export_resnet34_config}", 1, "does not fit"),
    ("evaluate", "more brands than weights", EVALUATE + " --checkpoint {export_6_brands}", 1, "does not fit"),
    ("evaluate", "model knows fewer brands", EVALUATE + " --checkpoint {export_4_brands}", 1, "unknown to the model"),
    ("evaluate", "not a checkpoint", EVALUATE + " --checkpoint {not_an_export}", 1, "not a valid safetensors file"),
    ("evaluate", "export config: unknown key", EVALUATE + " --checkpoint {export_unknown_key}", 1, "not a valid carbrand config"),
    ("evaluate", "wrong type", EVALUATE + " --batch-size many", 2, "--batch-size"),
    ("evaluate", "unknown option", EVALUATE + " --colour red", 2, "--colour"),
    ("predict", "missing checkpoint", "predict --checkpoint {missing} {photo}", 1, "{missing}"),
    ("predict", "missing image", PREDICT + " {missing}", 1, "{missing}"),
    ("predict", "folder without images", PREDICT.replace("{photo}", "{empty_source}"), 1, "{empty_source}"),
    ("predict", "another architecture", "predict --checkpoint {export_resnet34_config} {photo}", 1, "does not fit"),
    ("predict", "more brands than weights", "predict --checkpoint {export_6_brands} {photo}", 1, "does not fit"),
    ("predict", "not a checkpoint", "predict --checkpoint {not_an_export} {photo}", 1, "not a valid safetensors file"),
    ("predict", "checkpoint is a file", "predict --checkpoint {a_file} {photo}", 1, "{a_file}"),
    ("predict", "export config: unknown key", PREDICT.replace("{export}", "{export_unknown_key}"), 1, "carbrand config"),
    ("predict", "export's car models are not JSON", PREDICT.replace("{export}", "{export_car_models_junk}"), 1,
     "{export_car_models_junk}/car_models.json is not valid JSON"),
    ("predict", "impossible value", PREDICT + " --topk 0", 2, "--topk"),
    ("predict", "wrong type", PREDICT + " --topk three", 2, "--topk"),
    ("bench", "missing dataset", BENCH_DATA.replace("{prepared}", "{missing}"), 1, "{missing}"),
    ("bench", "empty dataset", BENCH_DATA.replace("{prepared}", "{empty_dataset}"), 1, "no samples"),
    ("bench", "manifest from an older format", BENCH_DATA.replace("{prepared}", "{old_manifest}"), 1, "format_version 0"),
    ("bench", "impossible value", BENCH_DATA + " --batches 0", 2, "--batches"),
    ("bench", "unknown backend", BENCH_DATA.replace("torchvision", "opencv"), 2, "opencv"),
    ("bench", "missing config", BENCH_TRAIN.replace("{recipe}", "{missing}"), 2, "{missing}"),
    ("bench", "config with an unknown key", BENCH_TRAIN.replace("{recipe}", "{unknown_key_recipe}"), 2, "optim.learning_rate"),
    ("bench", "config value of the wrong type", BENCH_TRAIN + " data.batch_size=sixteen", 2, "data.batch_size"),
    ("bench", "output folder missing", BENCH_TRAIN.replace("{out}.json", "{missing}/report.json"), 2, "{missing}"),
]


def write_export(directory: Path, *, brands: list[str], weights_brands: int | None = None, arch: str = "resnet18") -> str:
    torch.manual_seed(0)
    model = build_model("resnet18", weights_brands or len(brands))
    config = load_config(None, [f"model.arch={arch}", "data.image_size=32", "wandb.mode=disabled"])
    save_export(directory, plain_state_dict(model), brands, config)
    return str(directory)


def write_training_checkpoint(directory: Path, model: torch.nn.Module, training_state) -> str:
    directory.mkdir(parents=True)
    save_file(plain_state_dict(model), str(directory / "model.safetensors"))
    torch.save(training_state, directory / "training_state.pt")
    return str(directory)


def copy_prepared(prepared: Path, directory: Path, change) -> str:
    shutil.copytree(prepared, directory)
    change(directory)
    return str(directory)


class NotATensor:
    """Pickled by reference: loading it would import and build an arbitrary class."""


@pytest.fixture(scope="module")
def inputs(prepared_cars5, cars5_dir, tmp_path_factory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("bad_input")
    (work / "empty_source" / "alfa").mkdir(parents=True)
    (work / "empty_source" / "alfa" / "notes.txt").write_text("not an image\n")
    (work / "a_file.txt").write_text("neither a folder nor a checkpoint\n")
    unknown_key = work / "unknown_key.yaml"
    unknown_key.write_text(f"data:\n  manifest: {prepared_cars5}\noptim:\n  learning_rate: 0.1\n")

    def old_format(d):
        manifest = json.loads((d / "manifest.json").read_text())
        (d / "manifest.json").write_text(json.dumps(manifest | {"format_version": 0}))

    def car_model_of_no_brand(d):
        (d / "car_models.json").write_text(json.dumps([{"name": "Tesla Model S Sedan 2012", "brand": "tesla"}]))

    def no_samples(d):
        for split in ("train", "val", "test"):
            (d / f"{split}.csv").write_text("path,label,brand\n")

    resnet34, six_way = build_model("resnet34", 5), build_model("resnet18", 6)
    torch.save(resnet34.state_dict(), work / "resnet34.pt")
    truncated = (work / "resnet34.pt").read_bytes()
    (work / "resnet18-truncated.pth").write_bytes(truncated[: len(truncated) // 2])
    torch.save({"conv1.weight": NotATensor()}, work / "pickled.pt")  # an object the weights-only loader must refuse
    torch.save([1, 2, 3], work / "a-list.pt")
    progress = {"step": 3, "epoch": 0, "batch_in_epoch": 3}
    one_group_sgd = torch.optim.SGD(build_model("resnet18", 5).parameters(), lr=0.1).state_dict()
    export_unknown_key = Path(write_export(work / "export_unknown_key", brands=CARS5))
    (export_unknown_key / "config.yaml").write_text((export_unknown_key / "config.yaml").read_text() + "colour: red\n")
    not_an_export = Path(write_export(work / "not_an_export", brands=CARS5))
    (not_an_export / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    export_car_models_junk = Path(write_export(work / "export_car_models_junk", brands=CARS5))
    (export_car_models_junk / "car_models.json").write_text("[{\"name\": ")
    junk = Path(write_training_checkpoint(work / "checkpoint_junk", build_model("resnet18", 5), {}))
    (junk / "training_state.pt").write_bytes(b"not a torch file")
    return {
        "missing": str(work / "no" / "such" / "path"),
        "out": str(work / "out"),
        "a_file": str(work / "a_file.txt"),
        "empty_source": str(work / "empty_source"),
        "existing_out": copy_prepared(prepared_cars5, work / "existing_out", lambda d: None),
        "recipe": str(CPU_RECIPE),
        "unknown_key_recipe": str(unknown_key),
        "prepared": str(prepared_cars5),
        "empty_dataset": copy_prepared(prepared_cars5, work / "empty_dataset", no_samples),
        "old_manifest": copy_prepared(prepared_cars5, work / "old_manifest", old_format),
        "car_model_of_no_brand": copy_prepared(prepared_cars5, work / "car_model_of_no_brand", car_model_of_no_brand),
        "photo": str(sorted((cars5_dir / "test" / "audi").iterdir())[0]),
        "export": write_export(work / "export", brands=CARS5),
        "export_resnet34_config": write_export(work / "export_resnet34_config", brands=CARS5, arch="resnet34"),
        "export_6_brands": write_export(work / "export_6_brands", brands=CARS5 + ["tesla"], weights_brands=5),
        "export_4_brands": write_export(work / "export_4_brands", brands=CARS5[:4]),
        "export_unknown_key": str(export_unknown_key),
        "not_an_export": str(not_an_export),
        "export_car_models_junk": str(export_car_models_junk),
        "checkpoint_resnet34": write_training_checkpoint(work / "checkpoint_resnet34", resnet34, {"progress": progress}),
        "checkpoint_6_brands": write_training_checkpoint(work / "checkpoint_6_brands", six_way, {"progress": progress}),
        "checkpoint_sgd": write_training_checkpoint(
            work / "checkpoint_sgd", build_model("resnet18", 5),
            {"progress": progress, "optimizer": one_group_sgd, "scheduler": {}}),
        "checkpoint_junk": str(junk),
        "weights_resnet34": str(work / "resnet34.pt"),
        "weights_truncated": str(work / "resnet18-truncated.pth"),
        "weights_pickled": str(work / "pickled.pt"),
        "weights_not_a_state_dict": str(work / "a-list.pt"),
        "work": str(work),
    }


@pytest.mark.parametrize("command, problem, arguments, exit_code, named", CASES,
                         ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(command, problem, arguments, exit_code, named, inputs,
                                                   prepared_cars5, cars5_dir, capsys, fresh_accelerate_state):
    watched = [Path(inputs["work"]), prepared_cars5, cars5_dir]
    before = [tree(path) for path in watched]
    try:
        code = cli.main(shlex.split(arguments.format(**inputs)))
    except SystemExit as exit_:  # argparse: usage errors exit 2 after printing usage and one error line
        code = exit_.code
    captured = capsys.readouterr()
    assert code == exit_code, captured.err
    lines = [line for line in captured.err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert len(lines) == 1, captured.err  # argparse's usage lines above its error line are allowed
    assert lines[0].startswith(f"carbrand {command}: error: "), lines[0]
    assert named.format(**inputs) in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert [tree(path) for path in watched] == before, "a bad input must change nothing on disk"
