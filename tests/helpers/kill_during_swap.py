"""Test-only wrapper: run the trainer and SIGKILL it inside the swap that replaces RUN/NAME (e.g. best).

    python tests/helpers/kill_during_swap.py NAME --config ... [key=value ...]

The second save of NAME renames the previous NAME aside to `.old-NAME-PID`, and the process kills
itself before it renames the new `.tmp-NAME-PID` in: what kill -9 or a node failure in that window
leaves behind (no NAME at all). The product code runs unchanged; only the rename is wrapped.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this tree's carbrand, wherever it is installed

from tests.helpers.checkpoint_write_hook import train_acting_inside_the_swap  # noqa: E402


def die(aside: Path) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(train_acting_inside_the_swap(die))
