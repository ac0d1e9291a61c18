"""Test-only wrapper: run the trainer and SIGKILL it half-way through writing checkpoints/step_STEP.

    python tests/helpers/kill_during_save.py STEP --config ... [key=value ...]

The checkpoint's first file (model.safetensors) is written into the temporary folder, cut
to half its size, and the process kills itself: what kill -9 or a node failure at the worst
moment leaves behind. The product code runs unchanged; only its file writer is wrapped.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this tree's carbrand, wherever it is installed

from tests.helpers.checkpoint_write_hook import train_acting_inside_the_save  # noqa: E402


def cut_in_half_and_die(written: Path) -> None:
    os.truncate(written, written.stat().st_size // 2)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(train_acting_inside_the_save(cut_in_half_and_die))
