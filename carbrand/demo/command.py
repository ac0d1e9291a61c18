"""Run the whole story on a generated demo dataset: generate, prepare, train, evaluate, predict.

    carbrand demo                 # writes demo/ in the current folder
    carbrand demo --out /tmp/demo --epochs 4

The demo brands are coloured shapes drawn by carbrand.demo.synthetic, a stand-in that a
small network learns in a minute or two on a CPU; real photos are one `carbrand prepare`
away. Training and evaluation run as their own processes, exactly as a user launches them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from carbrand.demo.synthetic import make_demo_dataset
from carbrand.errors import CarbrandError
from carbrand.inference.predict import Predictor
from carbrand.prepare.command import prepare_dataset

REPO = Path(__file__).resolve().parents[2]  # carbrand/demo/command.py -> the repository
DEMO_RECIPE = REPO / "configs" / "demo.yaml"
DEFAULT_OUT = Path("demo")  # relative to where the demo runs
PREPARED_FOLDER = "prepared"  # OUT/prepared: configs/default.yaml's data.manifest points here


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder for everything the demo writes (default: {DEFAULT_OUT})")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images and the split (default: 0)")


def run(args: argparse.Namespace) -> int:
    if not DEMO_RECIPE.is_file():
        raise CarbrandError(f"{DEMO_RECIPE} is missing: run the demo from a clone of the repository (pip install -e .)")
    out = args.out.resolve()
    images, prepared, run_dir = out / "images", out / PREPARED_FOLDER, out / "run"

    step("1/5 generate", f"demo photos of 5 made-up brands in {images}")
    make_demo_dataset(images, seed=args.seed)
    step("2/5 prepare", f"verify every image, split, write the manifest to {prepared}")
    prepare_dataset(images, prepared, seed=args.seed)

    step("3/5 train", f"ResNet-18 from random init (configs/demo.yaml) into {run_dir}")
    overrides = [f"data.manifest={prepared}", f"output.dir={run_dir}", f"train.seed={args.seed}"]
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    launch([sys.executable, "-m", "carbrand.train", "--config", str(DEMO_RECIPE), *overrides])

    step("4/5 evaluate", "test-set metrics of the best checkpoint")
    evaluation = run_dir / "eval_test"
    launch([sys.executable, "-m", "carbrand.evaluate", "--checkpoint", str(run_dir / "best"), "--data", str(prepared),
            "--split", "test", "--out", str(evaluation)])

    step("5/5 predict", "which brand is this?")
    photo = sorted((images / "test").glob("*/*.jpg"))[0]
    prediction = Predictor.from_checkpoint(run_dir / "best").predict([photo], topk=3)[0]
    ranked = ", ".join(f"{p.brand} {p.probability:.2f}" for p in prediction.topk)
    print(f"{photo.relative_to(out)} (really {photo.parent.name}): {ranked}")

    print(f"\nDone. Results:\n  run directory   {run_dir} (config.yaml, metrics.jsonl, checkpoints/, best/)\n"
          f"  test metrics    {evaluation / 'metrics.json'}, {evaluation / 'confusion_matrix.png'}\n"
          f"  try it          carbrand predict --checkpoint {run_dir / 'best'} {images / 'test'}")
    return 0


def step(name: str, what: str) -> None:
    print(f"\n== {name}: {what}", flush=True)


def launch(command: list[str]) -> None:
    result = subprocess.run(command)
    if result.returncode != 0:
        raise CarbrandError(f"`{' '.join(command[1:4])} ...` failed with exit code {result.returncode}")
