"""`carbrand bench duplicates`: time and memory of the near-duplicate search, 10k to 1M hashes.

    carbrand bench duplicates                                   # 10k, 100k, 1M at distance 4
    carbrand bench duplicates --sizes 1000000 --distance 4 --crowded 0.3

Each size runs `duplicate_groups` (what `carbrand prepare` calls) in a fresh process on random
64-bit hashes with planted near pairs (1 % of the set, 0..distance bits apart) and chains
(A~B~C), distinct sha1s. --crowded F makes a fraction F of the hashes share their top 24 bits,
the pathological case (a few bands equal for many photos). Reported per size: wall and CPU
seconds (wall counts other processes on a shared machine; CPU does not), the process's peak
resident memory, the load average, and whether every planted pair landed in one group.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

import numpy as np

from carbrand.errors import UsageError
from carbrand.prepare.duplicates import DEFAULT_NEAR_DUPLICATE_DISTANCE, duplicate_groups

DEFAULT_SIZES = "10000,100000,1000000"
PLANTED_FRACTION = 0.01
CROWDED_BITS = 24


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated hash counts (default: {DEFAULT_SIZES})")
    parser.add_argument("--distance", type=int, default=DEFAULT_NEAR_DUPLICATE_DISTANCE, help=f"near-duplicate distance in bits (default: {DEFAULT_NEAR_DUPLICATE_DISTANCE})")
    parser.add_argument("--crowded", type=float, default=0.0, help=f"fraction of hashes sharing their top {CROWDED_BITS} bits (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random hashes (default: 0)")


def run_duplicate_benchmark(args: argparse.Namespace) -> dict:
    sizes = _sizes(args.sizes)
    if not 0 <= args.distance <= 64:
        raise UsageError(f"--distance {args.distance} must be in 0..64")
    if not 0 <= args.crowded <= 1:
        raise UsageError(f"--crowded {args.crowded} must be in [0, 1]")
    context = multiprocessing.get_context("spawn")  # a fresh process per size: its peak memory is its own
    results = []
    with context.Pool(1, maxtasksperchild=1) as pool:
        for size in sizes:
            result = pool.apply(measure, (size, args.distance, args.crowded, args.seed))
            print(f"{size:>9,} hashes: {result['wall_seconds']:.2f} s wall, {result['cpu_seconds']:.2f} s CPU, "
                  f"peak {result['peak_rss_mb']:.0f} MB, planted pairs found: {result['planted_found']}/{result['planted_pairs']}",
                  file=sys.stderr, flush=True)
            results.append(result)
    return {"benchmark": "duplicates", "distance": args.distance, "crowded": args.crowded, "cpus": os.cpu_count(), "results": results}


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--sizes {text!r} must be comma-separated integers") from None
    if not sizes or min(sizes) < 2:
        raise UsageError(f"--sizes {text!r}: every size must be at least 2")
    return sizes


def planted_hashes(size: int, distance: int, crowded: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`size` hashes and the (k, 2) index pairs planted within `distance` bits (pairs and 3-long chains)."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=size, dtype=np.uint64, endpoint=False)
    crowd = rng.random(size) < crowded
    hashes[crowd] &= np.uint64(2 ** (64 - CROWDED_BITS) - 1)
    planted = max(1, int(size * PLANTED_FRACTION))
    chosen = rng.choice(size, size=2 * planted, replace=False)
    sources, targets = chosen[:planted], chosen[planted:]
    sources[1 : planted // 3] = targets[: planted // 3 - 1]  # a third form chains: each pair starts where the last ended
    for source, target in zip(sources.tolist(), targets.tolist()):  # in order, so a chain copies the changed hash
        flips = rng.choice(64, size=int(rng.integers(0, distance + 1)), replace=False)
        hashes[target] = hashes[source] ^ np.uint64(sum(1 << int(bit) for bit in flips))
    return hashes, np.stack([sources, targets], axis=1)


def measure(size: int, distance: int, crowded: float, seed: int) -> dict:
    hashes, planted = planted_hashes(size, distance, crowded, seed)
    sha1s = [f"{index:040x}" for index in range(size)]
    wall, cpu = time.perf_counter(), time.process_time()
    groups = duplicate_groups(sha1s, hashes, distance)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    group_of = np.full(size, -1, dtype=np.int64)
    for number, group in enumerate(groups):
        group_of[group] = number
    found = int(np.sum((group_of[planted[:, 0]] == group_of[planted[:, 1]]) & (group_of[planted[:, 0]] >= 0)))
    return {
        "hashes": size,
        "wall_seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "peak_rss_mb": round(peak_resident_kb() / 1024, 1),
        "groups": len(groups),
        "planted_pairs": len(planted),
        "planted_found": found,
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def peak_resident_kb() -> int:
    """This process's peak resident memory. Not getrusage: Linux carries ru_maxrss over exec, so a
    spawned child would report its parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmHWM line")
