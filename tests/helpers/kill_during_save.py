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

import carbrand.checkpoint as checkpoint  # noqa: E402
from carbrand import train  # noqa: E402


def main() -> int:
    step, arguments = sys.argv[1], sys.argv[2:]
    write = checkpoint.save_file

    def write_half_then_die(tensors, filename, metadata=None):
        write(tensors, filename, metadata=metadata)
        if Path(filename).parent.name.startswith(f".tmp-step_{step}-"):
            os.truncate(filename, os.path.getsize(filename) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save_file = write_half_then_die
    return train.main(arguments)


if __name__ == "__main__":
    sys.exit(main())
