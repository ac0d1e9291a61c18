"""Exact and near-duplicate groups: same bytes (sha1) or perceptual hashes within a Hamming distance.

Groups come from union-find over both relations, so A~B and B~C put A, B, C together.
The near-duplicate search compares every pair of 64-bit hashes with numpy, one block of
rows at a time (20k images = 200M pairs, a few seconds; memory stays at block x n).
"""

from __future__ import annotations

import numpy as np

DEFAULT_NEAR_DUPLICATE_DISTANCE = 4  # bits of 64; on cars5 the closest different photos are 6 apart
BLOCK_ROWS = 512


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, item: int) -> int:
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]  # path halving keeps trees flat
            item = self.parent[item]
        return item

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)


def near_pairs(phashes: list[int], max_distance: int) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose hashes differ in at most `max_distance` bits."""
    if max_distance < 0 or len(phashes) < 2:
        return []
    hashes = np.array(phashes, dtype=np.uint64)
    pairs = []
    for start in range(0, len(hashes), BLOCK_ROWS):
        block = hashes[start : start + BLOCK_ROWS]
        distances = _popcount(block[:, None] ^ hashes[None, :])
        rows, columns = np.nonzero(distances <= max_distance)
        rows += start
        keep = columns > rows  # each unordered pair once, no self-pairs
        pairs += zip(rows[keep].tolist(), columns[keep].tolist())
    return pairs


def _popcount(values: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(values)
    as_bytes = values.view(np.uint8).reshape(*values.shape, 8)
    return np.unpackbits(as_bytes, axis=-1).sum(axis=-1)


def duplicate_groups(sha1s: list[str], phashes: list[int], max_distance: int) -> list[list[int]]:
    """Groups (sorted index lists, two or more members) of exact or near duplicates."""
    union_find = _UnionFind(len(sha1s))
    first_with_sha1: dict[str, int] = {}
    for index, sha1 in enumerate(sha1s):
        union_find.union(first_with_sha1.setdefault(sha1, index), index)
    for a, b in near_pairs(phashes, max_distance):
        union_find.union(a, b)
    members: dict[int, list[int]] = {}
    for index in range(len(sha1s)):
        members.setdefault(union_find.find(index), []).append(index)
    return sorted(group for group in members.values() if len(group) > 1)
