"""Test-only wrapper: run the trainer; once checkpoints/step_STEP is complete, no file may grow past BYTES.

    python tests/helpers/disk_full_after_save.py STEP BYTES --config ... [key=value ...]

The process lowers its own file-size limit (RLIMIT_FSIZE) right after that checkpoint is saved, so
the next checkpoint's write fails with EFBIG (File too large) in the kernel, as on a full quota,
while the earlier one is there to be kept. The product code runs unchanged; only the trainer's
save_checkpoint is wrapped, to know when the first checkpoint is done.
"""

import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this tree's carbrand, wherever it is installed

from carbrand import train  # noqa: E402


def main() -> int:
    step, limit, arguments = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    save_checkpoint = train.save_checkpoint

    def save_then_limit(run) -> None:
        save_checkpoint(run)
        if run.progress.step == step:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    train.save_checkpoint = save_then_limit
    return train.main(arguments)


if __name__ == "__main__":
    sys.exit(main())
