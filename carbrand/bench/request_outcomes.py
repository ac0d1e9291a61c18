"""What one benchmark request came to (status, latency) and the nearest-rank percentile of latencies."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Outcome:
    good: bool  # a good upload (else a bad one)
    status: int  # 0: no answer (connection error)
    latency_s: float
    batch_images: int = 0


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation): the value that q% of the requests did not exceed."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100)
    return sorted_values[int(rank) - 1]
