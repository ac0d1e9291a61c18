#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine, then run it:  bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
# torch/torchvision first and pinned: an unpinned resolve may pull a multi-GB build from the network.
python3 -c "import torch, torchvision" 2>/dev/null || python3 -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
python3 -m pip install --quiet -e ".[dev]"
exec python3 -m pytest -q -p no:cacheprovider "$@"
