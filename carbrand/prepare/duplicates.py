"""Exact and near-duplicate groups: same bytes (sha1) or perceptual hashes within a Hamming distance.

Groups are the connected components of both relations, so A~B and B~C put A, B, C together.

The near-duplicate search is multi-index hashing, exact (the same pairs as comparing every
pair) and near-linear on real hash sets:

1. Identical hashes are collapsed first: they are all distance 0 apart, so k copies of one
   hash cost one entry, not k²/2 comparisons.
2. The 64 bits are split into max_distance + 1 bands. Two hashes within max_distance bits
   differ in at most max_distance bands, so at least one band is equal (pigeonhole). Only
   hashes in the same bucket (same band value) are compared, each pair once: it is counted
   in the first band where the two agree and dropped from later ones.
3. A bucket larger than BUCKET_LIMIT (a pathological set: thousands of photos sharing a
   band, e.g. flat backgrounds) is not compared all-pairs: its members are searched again
   on their remaining bits that still vary, cut into max_distance + 1 sub-bands, up to
   MAX_DEPTH levels. A bucket with fewer varying bits than bands holds at most
   2**bits distinct hashes, all near each other (the output itself is then that big); one
   still crowded at MAX_DEPTH is compared within itself, in O(n) memory.

The work is sorting (n log n per band) plus the bucket comparisons, about
n²/2**band_bits per band for random hashes. Memory is O(n): candidates are made one
sort-offset at a time. docs/BENCHMARKS.md has the timings up to 1M hashes.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

DEFAULT_NEAR_DUPLICATE_DISTANCE = 4  # bits of 64; on cars5 the closest different photos are 6 apart
HASH_BITS = 64
BUCKET_LIMIT = 32  # larger buckets are split on their remaining bits instead of compared all-pairs
MAX_DEPTH = 3  # splits of a crowded bucket; each costs (max_distance + 1) sorts of its members
BLOCK_ROWS = 512  # rows per block of the all-pairs reference search


def near_pairs(phashes, max_distance: int) -> np.ndarray:
    """All index pairs (i < j) whose hashes differ in at most `max_distance` bits, as a sorted (k, 2) int64 array.

    The same pairs as `near_pairs_all` (every pair compared), found by multi-index hashing.
    The output holds every pair, so k identical hashes give k²/2 rows: `duplicate_groups`
    avoids that by working on the distinct hashes.
    """
    hashes = np.asarray(phashes, dtype=np.uint64)
    if max_distance < 0 or len(hashes) < 2:
        return np.empty((0, 2), dtype=np.int64)
    distinct, inverse = np.unique(hashes, return_inverse=True)
    distinct_pairs = distinct_near_pairs(distinct, max_distance)
    members = _members_of(inverse, len(distinct))
    expanded = [_cross_pairs(members[a], members[b]) for a, b in distinct_pairs.tolist()]
    expanded += [_cross_pairs(group, group) for group in members if len(group) > 1]
    if not expanded:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(expanded)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def near_pairs_all(phashes, max_distance: int) -> np.ndarray:
    """The reference search: every pair compared, one block of rows at a time (O(n²); tests and small sets)."""
    hashes = np.asarray(phashes, dtype=np.uint64)
    if max_distance < 0 or len(hashes) < 2:
        return np.empty((0, 2), dtype=np.int64)
    found = []
    for start in range(0, len(hashes), BLOCK_ROWS):
        distances = popcount(hashes[start : start + BLOCK_ROWS, None] ^ hashes[None, :])
        rows, columns = np.nonzero(distances <= max_distance)
        rows += start
        keep = columns > rows  # each unordered pair once, no self-pairs
        found.append(np.stack([rows[keep], columns[keep]], axis=1))
    return np.concatenate(found).astype(np.int64)  # row-major nonzero: already sorted


def distinct_near_pairs(distinct: np.ndarray, max_distance: int) -> np.ndarray:
    """Pairs (i < j) of positions in `distinct` (unique uint64 hashes) within max_distance bits, each once."""
    if max_distance < 0 or len(distinct) < 2:
        return np.empty((0, 2), dtype=np.int64)
    everyone = np.arange(len(distinct), dtype=np.int64)
    all_bits = np.uint64(np.iinfo(np.uint64).max)
    pairs = _search(distinct, everyone, np.zeros(len(distinct), dtype=np.int64), all_bits, max_distance)
    pairs = np.sort(pairs, axis=1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def _search(hashes, members, groups, free_mask: np.uint64, max_distance: int, depth: int = 0) -> np.ndarray:
    """Near pairs among `members` (positions into hashes) that share a group; `free_mask` = bits not known equal."""
    member_hashes = hashes[members]
    # Bits equal across every group say nothing about distance: bands are cut from the others only.
    free_mask = np.uint64(free_mask & _varying_bits(member_hashes, groups))
    bands = band_masks(free_mask, max_distance + 1)
    if bands is None:  # fewer varying bits than bands: every group holds few distinct hashes
        return _pairs_in_runs(hashes, members, groups, np.zeros(len(members), dtype=np.uint64), [], max_distance)
    split_crowded = depth < MAX_DEPTH
    found = []
    for band, mask in enumerate(bands):
        keys = member_hashes & mask
        order = _bucket_order(keys, groups, mask)
        sorted_members = members[order]
        starts, lengths = _runs(groups[order], keys[order])
        small = lengths <= BUCKET_LIMIT if split_crowded else np.ones(len(lengths), dtype=bool)
        found.append(_pairs_in_runs_sorted(hashes, sorted_members, starts[small], lengths[small], bands[:band], max_distance))
        if not small.all():
            crowded_members, crowded_groups = _members_of_runs(sorted_members, starts[~small], lengths[~small])
            deeper = _search(hashes, crowded_members, crowded_groups, np.uint64(free_mask & ~mask), max_distance, depth + 1)
            found.append(_first_band_only(hashes, deeper, bands[:band]))
    return np.concatenate(found)


def _bucket_order(keys: np.ndarray, groups: np.ndarray, mask: np.uint64) -> np.ndarray:
    """An order that puts equal (group, key) next to each other: one argsort of group and key packed in 64 bits."""
    bits = [bit for bit in range(HASH_BITS) if (int(mask) >> bit) & 1]
    group_bits = int(groups.max()).bit_length() if len(groups) else 0
    if group_bits + len(bits) > HASH_BITS:  # cannot pack: the slower two-key sort
        return np.lexsort((keys, groups))
    packed = groups.astype(np.uint64) << np.uint64(len(bits))
    position = 0
    for low, width in _bit_runs(bits):  # the band's bits moved next to each other, a run of bits at a time
        packed |= ((keys >> np.uint64(low)) & np.uint64((1 << width) - 1)) << np.uint64(position)
        position += width
    return np.argsort(packed)


def _bit_runs(bits: list[int]) -> list[tuple[int, int]]:
    """Sorted bit positions as (lowest bit, width) runs of consecutive positions."""
    runs: list[tuple[int, int]] = []
    for bit in bits:
        if runs and runs[-1][0] + runs[-1][1] == bit:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((bit, 1))
    return runs


def _varying_bits(member_hashes: np.ndarray, groups: np.ndarray) -> np.uint64:
    """Bits that differ between two members of some group."""
    if len(member_hashes) == 0:
        return np.uint64(0)
    representative = np.zeros(int(groups.max()) + 1, dtype=np.uint64)
    representative[groups] = member_hashes  # any member of its group will do
    return np.bitwise_or.reduce(member_hashes ^ representative[groups])


def band_masks(free_mask: np.uint64, count: int) -> list[np.uint64] | None:
    """Split the set bits of free_mask into `count` bands of consecutive free bits; None if too few bits."""
    bits = [bit for bit in range(HASH_BITS) if (int(free_mask) >> bit) & 1]
    if len(bits) < count:
        return None
    masks = []
    for chunk in np.array_split(np.array(bits), count):
        masks.append(np.uint64(sum(1 << int(bit) for bit in chunk)))
    return masks


def _runs(sorted_groups: np.ndarray, sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of each run of equal (group, key) in sorted order."""
    if len(sorted_keys) == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    change = (sorted_groups[1:] != sorted_groups[:-1]) | (sorted_keys[1:] != sorted_keys[:-1])
    starts = np.concatenate(([0], np.flatnonzero(change) + 1)).astype(np.int64)
    lengths = np.diff(np.append(starts, len(sorted_keys)))
    return starts, lengths


def _pairs_in_runs(hashes, members, groups, keys, earlier_bands, max_distance: int) -> np.ndarray:
    order = np.lexsort((keys, groups))
    starts, lengths = _runs(groups[order], keys[order])
    return _pairs_in_runs_sorted(hashes, members[order], starts, lengths, earlier_bands, max_distance)


def _pairs_in_runs_sorted(hashes, sorted_members, starts, lengths, earlier_bands, max_distance: int) -> np.ndarray:
    """Compare every pair inside each run: position p against p + offset, one offset at a time (memory O(n))."""
    keep = lengths > 1
    starts, lengths = starts[keep], lengths[keep]
    # Every position of a run with the end of its run: p pairs with p+1, p+2, ... while inside the run.
    positions = np.repeat(starts, lengths) + _ranks_within(lengths)
    ends = np.repeat(starts + lengths, lengths)
    sorted_hashes = hashes[sorted_members]  # gathered once: the loop then reads memory in order
    found = []
    offset = 1
    while len(positions):
        inside = positions + offset < ends
        positions, ends = positions[inside], ends[inside]
        difference = sorted_hashes[positions] ^ sorted_hashes[positions + offset]
        near = popcount(difference) <= max_distance
        for mask in earlier_bands:  # counted in the first band where the pair agrees
            near &= (difference & mask) != 0
        hits = positions[near]
        found.append(np.stack([sorted_members[hits], sorted_members[hits + offset]], axis=1))
        offset += 1
    return np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)


def _ranks_within(lengths: np.ndarray) -> np.ndarray:
    """0, 1, ..., length-1 for each run, concatenated."""
    total = int(lengths.sum())
    return np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def _members_of_runs(sorted_members, starts, lengths) -> tuple[np.ndarray, np.ndarray]:
    positions = np.repeat(starts, lengths) + _ranks_within(lengths)
    return sorted_members[positions], np.repeat(np.arange(len(starts), dtype=np.int64), lengths)


def _first_band_only(hashes, pairs: np.ndarray, earlier_bands) -> np.ndarray:
    if len(pairs) == 0 or not earlier_bands:
        return pairs
    difference = hashes[pairs[:, 0]] ^ hashes[pairs[:, 1]]
    keep = np.ones(len(pairs), dtype=bool)
    for mask in earlier_bands:
        keep &= (difference & mask) != 0
    return pairs[keep]


def popcount(values: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(values)
    as_bytes = values.view(np.uint8).reshape(*values.shape, 8)
    return np.unpackbits(as_bytes, axis=-1).sum(axis=-1)


def _members_of(inverse: np.ndarray, count: int) -> list[np.ndarray]:
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(np.bincount(inverse, minlength=count))[:-1])


def _cross_pairs(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """(min, max) pairs of left x right; for left is right, each unordered pair once."""
    a, b = np.meshgrid(left, right, indexing="ij")
    a, b = a.ravel(), b.ravel()
    keep = a < b if left is right else np.ones(len(a), dtype=bool)
    return np.stack([np.minimum(a, b)[keep], np.maximum(a, b)[keep]], axis=1).astype(np.int64)


def duplicate_groups(sha1s: list[str], phashes, max_distance: int) -> list[list[int]]:
    """Groups (sorted index lists, two or more members) of exact (same sha1) or near (pHash) duplicates."""
    count = len(sha1s)
    first_with_sha1: dict[str, int] = {}
    same_bytes = np.fromiter((first_with_sha1.setdefault(sha1, index) for index, sha1 in enumerate(sha1s)), dtype=np.int64, count=count)
    edges = [np.stack([np.arange(count, dtype=np.int64), same_bytes], axis=1)]
    if max_distance >= 0 and count > 1:
        distinct, first, inverse = np.unique(np.asarray(phashes, dtype=np.uint64), return_index=True, return_inverse=True)
        edges.append(np.stack([np.arange(count, dtype=np.int64), first[inverse]], axis=1))  # identical hashes: distance 0
        edges.append(first[distinct_near_pairs(distinct, max_distance)].reshape(-1, 2))
    return _components(count, np.concatenate(edges))


def _components(count: int, edges: np.ndarray) -> list[list[int]]:
    """Connected components of two or more items, as sorted index lists, sorted."""
    if count == 0:
        return []
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(count, count))
    _, labels = connected_components(graph, directed=False)
    grouped = np.flatnonzero(np.bincount(labels)[labels] > 1)  # items in groups of two or more, in index order
    order = grouped[np.argsort(labels[grouped], kind="stable")]
    sorted_labels = labels[order]
    groups = np.split(order, np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 1) if len(order) else []
    return sorted(group.tolist() for group in groups)
