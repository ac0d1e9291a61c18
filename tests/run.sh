#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine, then run it:  bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
# torch/torchvision first and pinned: an unpinned resolve may pull a multi-GB build from the network.
python3 -c "import torch, torchvision" 2>/dev/null || python3 -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
python3 -m pip install --quiet -e ".[dev]"
# The SLURM tests start a real two-node cluster on this host (tests/helpers/slurm_cluster.py): Debian's packages, a few MB.
# The browser tests drive Debian's headless Chromium through selenium (tests/helpers/browser.py).
apt_packages=()
[[ -x /usr/sbin/slurmctld || ${CARBRAND_SKIP_SLURM:-0} == 1 ]] || apt_packages+=(slurmctld slurmd slurm-client munge)
command -v chromedriver >/dev/null || apt_packages+=(chromium chromium-driver)
if (( ${#apt_packages[@]} )); then
    sudo=$( (( EUID == 0 )) || echo sudo )
    $sudo apt-get update -qq >/dev/null
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi
exec python3 -m pytest -q -p no:cacheprovider "$@"
