"""Test-only wrapper: run the trainer, make its loss or its weights NaN/inf at one step, record which check stopped it.

    python tests/helpers/inject_nonfinite.py MODE STEP OUT_FILE --config ... [key=value ...]

MODE `none`: nothing injected (a real blow-up, from the recipe). `loss`: the loss of optimizer step
STEP (its one micro-batch; a fresh run without gradient accumulation) is NaN while the weights stay
finite, so only the loss check can see it. `weights`: right after optimizer step STEP one weight of
the head becomes inf, while that step's loss was finite, so only the weights check can see it then.
When the trainer's finiteness check raises, OUT_FILE gets the step it ran at: with the run's
log/eval/checkpoint intervals, that tells which sync point caught it. The product code runs unchanged.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this tree's carbrand, wherever it is installed

import torch  # noqa: E402

from carbrand import train  # noqa: E402
from carbrand.errors import CarbrandError  # noqa: E402


def main() -> int:
    mode, step, out, arguments = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
    train_step, finish_optimizer_step, check_finite = train.train_step, train.finish_optimizer_step, train.check_finite
    micro_batches = [0]

    def nan_loss_at_step(*args, **kwargs):
        loss = train_step(*args, **kwargs)  # the real step: the weights it leaves are finite
        micro_batches[0] += 1
        return loss + float("nan") if mode == "loss" and micro_batches[0] == step else loss

    def inf_weight_after_step(run) -> None:
        finish_optimizer_step(run)
        if mode == "weights" and run.progress.step == step:
            with torch.no_grad():
                run.unwrapped_model.fc.weight[0, 0] = float("inf")

    def record_where_it_stopped(run) -> None:
        try:
            check_finite(run)
        except CarbrandError:
            out.write_text(f"{run.progress.step}\n")
            raise

    train.train_step, train.finish_optimizer_step = nan_loss_at_step, inf_weight_after_step
    train.check_finite = record_where_it_stopped
    return train.main(arguments)


if __name__ == "__main__":
    sys.exit(main())
