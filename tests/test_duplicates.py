"""The multi-index near-duplicate search gives exactly the all-pairs answer, without comparing all pairs."""

from __future__ import annotations

import numpy as np
import pytest

from carbrand.prepare import duplicates
from carbrand.prepare.duplicates import band_masks, duplicate_groups, near_pairs, near_pairs_all

THRESHOLDS = (0, 1, 3, 4, 8, 16)


def flip(value: int, bits, rng: np.random.Generator) -> int:
    """value with `bits` distinct random bit positions flipped."""
    for bit in rng.choice(64, size=bits, replace=False):
        value ^= 1 << int(bit)
    return value


def planted_hashes(count: int, max_distance: int, seed: int) -> list[int]:
    """Random hashes plus near pairs at distances around the threshold, chains A~B~C~D, and identical copies."""
    rng = np.random.default_rng(seed)
    hashes = [int(value) for value in rng.integers(0, 2**64, size=count, dtype=np.uint64, endpoint=False)]
    for _ in range(count // 20):  # pairs at distance 0 .. max_distance + 1 (the +1 ones must not pair)
        hashes.append(flip(hashes[int(rng.integers(len(hashes)))], int(rng.integers(0, max_distance + 2)), rng))
    for _ in range(count // 100):  # chains: each link within the threshold, the ends usually beyond it
        link = hashes[int(rng.integers(count))]
        for _ in range(3):
            link = flip(link, max_distance, rng)
            hashes.append(link)
    hashes += hashes[:5] * 3  # exact copies
    order = rng.permutation(len(hashes))
    return [hashes[i] for i in order]


def reference_groups(sha1s: list[str], pairs: np.ndarray) -> list[list[int]]:
    """Plain union-find over same-sha1 and the given pairs."""
    parent = list(range(len(sha1s)))

    def find(item: int) -> int:
        while parent[item] != item:
            item = parent[item]
        return item

    first: dict[str, int] = {}
    links = [(first.setdefault(sha1, i), i) for i, sha1 in enumerate(sha1s)] + [tuple(pair) for pair in pairs.tolist()]
    for a, b in links:
        root_a, root_b = find(a), find(b)
        if root_a != root_b:
            parent[max(root_a, root_b)] = min(root_a, root_b)
    members: dict[int, list[int]] = {}
    for i in range(len(sha1s)):
        members.setdefault(find(i), []).append(i)
    return sorted(group for group in members.values() if len(group) > 1)


@pytest.mark.parametrize("max_distance", THRESHOLDS)
def test_pairs_and_groups_match_the_all_pairs_search(max_distance):
    hashes = planted_hashes(3000, max_distance, seed=max_distance)
    expected = near_pairs_all(hashes, max_distance)
    assert len(expected) > 3000 // 40  # the planted pairs are there (the check below is not vacuous)
    np.testing.assert_array_equal(near_pairs(hashes, max_distance), expected)
    sha1s = [f"{i % 2900:040x}" for i in range(len(hashes))]  # some exact byte copies as well
    assert duplicate_groups(sha1s, hashes, max_distance) == reference_groups(sha1s, expected)


def test_a_chain_is_one_group_but_only_its_links_are_pairs():
    a = 0
    b = a ^ 0b1111  # 4 bits from a
    c = b ^ (0b1111 << 8)  # 4 bits from b, 8 from a
    d = 0xFFFF_FFFF_0000_0000  # far from all
    hashes = [c, d, a, b]
    assert near_pairs(hashes, 4).tolist() == [[0, 3], [2, 3]]
    assert duplicate_groups(["w", "x", "y", "z"], hashes, 4) == [[0, 2, 3]]
    assert duplicate_groups(["w", "x", "y", "z"], hashes, 3) == []
    assert duplicate_groups(["w", "x", "y", "z"], hashes, -1) == []  # near duplicates off
    assert duplicate_groups(["s", "x", "y", "s"], hashes, -1) == [[0, 3]]  # exact copies always


def test_threshold_64_pairs_everything():
    hashes = planted_hashes(200, 4, seed=7)
    assert len(near_pairs(hashes, 64)) == len(hashes) * (len(hashes) - 1) // 2


@pytest.mark.parametrize("max_distance", [0, 4, 12, 63])
def test_bands_are_disjoint_and_cover_the_hash(max_distance):
    masks = [int(mask) for mask in band_masks(np.uint64(2**64 - 1), max_distance + 1)]
    assert len(masks) == max_distance + 1
    assert sum(masks) == 2**64 - 1 and all(a & b == 0 for i, a in enumerate(masks) for b in masks[i + 1 :])
    assert band_masks(np.uint64(0b111), 4) is None  # fewer free bits than bands


def test_a_crowded_bucket_is_split_not_compared_all_pairs(monkeypatch):
    """6,000 of 10,000 hashes share their top 24 bits (one band-key for all of them): still exact, far below n²/2."""
    rng = np.random.default_rng(3)
    crowded = [int(value) for value in rng.integers(0, 2**40, size=6000, dtype=np.uint64)]
    crowded += [flip(value, 3, rng) & (2**40 - 1) for value in crowded[:200]]
    spread = [int(value) for value in rng.integers(0, 2**64, size=4000, dtype=np.uint64, endpoint=False)]
    hashes = crowded + spread
    compared = []
    original = duplicates.popcount
    monkeypatch.setattr(duplicates, "popcount", lambda values: compared.append(values.size) or original(values))
    found = near_pairs(hashes, 4)
    monkeypatch.setattr(duplicates, "popcount", original)
    np.testing.assert_array_equal(found, near_pairs_all(hashes, 4))
    assert len(found) >= 200
    all_pairs = len(hashes) * (len(hashes) - 1) // 2
    assert sum(compared) < all_pairs / 50, f"compared {sum(compared)} pairs of {all_pairs}"
