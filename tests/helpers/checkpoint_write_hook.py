"""What the test-only wrappers kill_during_save.py, stall_during_save.py and kill_during_swap.py share: run
the trainer with its checkpoint file writer (or the swap's rename) wrapped, and act right after the first file
of checkpoints/step_STEP is written into its temporary folder (or right after an old export was renamed aside).
The product code runs unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import carbrand.checkpoint as checkpoint
import carbrand.filesystem as filesystem
from carbrand import train


def train_acting_inside_the_save(act: Callable[[Path], None]) -> int:
    """`python WRAPPER.py STEP --config ... [key=value ...]`: `act(file)` once step STEP's first file is on disk."""
    step, arguments = sys.argv[1], sys.argv[2:]
    write = checkpoint.save_file

    def write_then_act(tensors, filename, metadata=None):
        write(tensors, filename, metadata=metadata)
        if Path(filename).parent.name.startswith(f".tmp-step_{step}-"):
            act(Path(filename))

    checkpoint.save_file = write_then_act
    return train.main(arguments)


def train_acting_inside_the_swap(act: Callable[[Path], None]) -> int:
    """`python WRAPPER.py NAME --config ... [key=value ...]`: `act(aside)` once the second save of RUN/NAME has
    renamed the previous NAME aside and not yet renamed the new one in (write_directory_atomically's swap)."""
    name, arguments = sys.argv[1], sys.argv[2:]
    rename = filesystem.os.rename  # the os module itself: only this process, which is about to die, sees the wrapper

    def rename_then_act(source, destination):
        rename(source, destination)
        if Path(destination).name.startswith(f".old-{name}-"):
            act(Path(destination))

    filesystem.os.rename = rename_then_act
    return train.main(arguments)
