"""Test-only wrapper: run the trainer with the fp16 grad scaler reporting skipped steps STEPS (e.g. 2,3).

    python tests/helpers/fake_scaler_skips.py 2,3 --config ... [key=value ...]

fp16 needs a CUDA GPU, so on a CPU the scaler never runs. This answers Accelerate's
`optimizer_step_was_skipped` as the scaler would after inf gradients on those steps, to show
the trainer counts and logs them and goes on. The optimizer still steps (the weights change as
usual): what is checked is the trainer's bookkeeping, not the scaler.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this tree's carbrand, wherever it is installed

from accelerate import Accelerator  # noqa: E402

from carbrand import train  # noqa: E402


def main() -> int:
    skipped = {int(step) for step in sys.argv[1].split(",")}
    calls = {"steps": 0}

    def optimizer_step_was_skipped(self) -> bool:  # asked once per optimizer step, after the step
        calls["steps"] += 1
        return calls["steps"] in skipped

    Accelerator.optimizer_step_was_skipped = property(optimizer_step_was_skipped)
    return train.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
