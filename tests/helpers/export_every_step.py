"""Test-only wrapper: run the trainer with best/ replaced at every step, each version marked, as fast as it goes.

    python tests/helpers/export_every_step.py --config ... train.eval_every_steps=1 [key=value ...]

Where the trainer would validate (every step with train.eval_every_steps=1), it exports instead,
with no validation and whatever the score: best/ is rewritten at every step through the product's
own save_export. Each version carries its step in config.yaml (wandb.name = export-STEP), and
RUN/exports.log gets `export-STEP DIGEST` once it is in place, so a reader can tell whether the
weights and the config it got belong together.
"""

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this tree's carbrand, wherever it is installed

from carbrand import train  # noqa: E402
from carbrand.checkpoint import plain_state_dict, save_export  # noqa: E402
from tests.helpers.export_reader import state_digest  # noqa: E402


def export_every_time(run) -> None:
    if not run.accelerator.is_main_process:
        return
    marker = f"export-{run.progress.step}"
    config = dataclasses.replace(run.config, wandb=dataclasses.replace(run.config.wandb, name=marker))
    state = plain_state_dict(run.scored_model)
    save_export(run.run_dir / "best", state, run.classes, config)
    with (run.run_dir / "exports.log").open("a") as log:
        log.write(f"{marker} {state_digest(state)}\n")


def main() -> int:
    train.validate_and_keep_best = export_every_time  # the loop looks the name up at every call
    return train.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
