"""Where things are: this repository, the helper scripts the tests start, and the real test photos.

The photos live in ../shared/data beside the repository, never inside it. CARBRAND_TEST_DATA
points elsewhere (a GPU host that has them in another place); tests/run_gpu_checks.sh reads it
the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HELPERS = Path(__file__).resolve().parent  # the scripts tests run as processes (ddp_step_worker.py, ...)
SHARED_DATA = Path(os.environ.get("CARBRAND_TEST_DATA") or REPO.parent / "shared" / "data")
