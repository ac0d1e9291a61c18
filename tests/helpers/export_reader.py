"""Test-only reader: load RUN/best the way predict and evaluate do, in a loop, until a stop file appears.

    python tests/helpers/export_reader.py RUN/best STOP_FILE RESULT.json

Each load records the version it got (config.yaml's wandb.name, set by export_every_step.py) and the
digest of the weights it got, or the one-line error it met; RESULT.json holds them all.
"""

import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this tree's carbrand, wherever it is installed


def state_digest(state) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].contiguous().reshape(-1).view(-1).numpy().tobytes())
    return digest.hexdigest()[:16]


def main() -> int:
    from carbrand.checkpoint import load_export_model
    from carbrand.errors import CarbrandError

    best, stop, result = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    while not best.exists() and not stop.exists():
        time.sleep(0.01)
    loads, errors = [], []
    while not stop.exists():
        try:
            _, export = load_export_model(best)  # what Predictor.from_checkpoint and evaluate call
            loads.append([export.config.wandb.name, state_digest(export.state_dict)])
        except CarbrandError as error:
            errors.append(str(error))
    result.write_text(json.dumps({"loads": loads, "errors": errors}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
