"""Test-only wrapper: run the trainer and stall it inside the write of checkpoints/step_STEP, in C code.

    python tests/helpers/stall_during_save.py STEP --config ... [key=value ...]

The checkpoint's first file (model.safetensors) is written into the temporary folder, then the
main thread spins in hashlib.pbkdf2_hmac: C code that releases the GIL and does not return to the
interpreter for tens of seconds, so no Python signal handler runs meanwhile. That is what a slow
step, a long compile or a collective waiting for a peer look like to a stop signal; and a stop
that ends the process now leaves a half-written checkpoint behind, hidden. The product code runs
unchanged; only its file writer is wrapped. STALLED_LINE on stderr says the stall has begun.
"""

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this tree's carbrand, wherever it is installed

from tests.helpers.checkpoint_write_hook import train_acting_inside_the_save  # noqa: E402

STALLED_LINE = "stall_during_save: stalled inside the checkpoint write"


def stall_in_c_code(_written: Path) -> None:
    print(STALLED_LINE, file=sys.stderr, flush=True)
    while True:  # returns to Python only between these calls, tens of seconds apart
        hashlib.pbkdf2_hmac("sha256", b"stall", b"salt", 100_000_000)


if __name__ == "__main__":
    sys.exit(train_acting_inside_the_save(stall_in_c_code))
