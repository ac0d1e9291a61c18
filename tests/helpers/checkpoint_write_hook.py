"""What the test-only wrappers kill_during_save.py and stall_during_save.py share: run the trainer
with its checkpoint file writer wrapped, and act right after the first file of checkpoints/step_STEP
is written into its temporary folder. The product code runs unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import carbrand.checkpoint as checkpoint
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
