"""Stratified, duplicate-aware assignment of images to train/val/test.

The unit of assignment is a duplicate group (a single image is a group of one), so
copies of one photo always share a split. Per brand, units are shuffled with a seed
derived from (seed, brand) -- adding a brand does not reshuffle the others -- and dealt
to test, then val, until each reaches round(fraction x brand size) (at least one),
the rest to train.

Too-small brands (fewer units than splits to fill) follow a fixed rule with a warning:
one unit each to train, then test, then val, in that order; so 1 image -> train,
2 -> train + test.

A source that already fixes a split (root/train, root/test, a labelled Stanford test
file) keeps its test (and val) images where they are; val is carved from each brand's
training images when the source has no val folder. A duplicate group that straddles
the training side and a held-out split is leakage: its training-side copies are removed
(or kept with keep_leaked) and reported.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

HELD_OUT = ("test", "val")  # filled in this order, so test is never starved by val


@dataclass(frozen=True)
class Leak:
    item: int  # index of the training-side copy
    duplicate_of: list[int]  # its copies in the held-out split
    removed: bool  # False when keep_leaked left it in train


@dataclass
class SplitPlan:
    splits: list[str | None]  # per item: "train"/"val"/"test"; None = removed as leakage
    leaks: list[Leak] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def assign_splits(
    brands: list[str],
    given_splits: list[str | None],
    groups: list[list[int]],
    val_frac: float,
    test_frac: float,
    seed: int,
    keep_leaked: bool = False,
) -> SplitPlan:
    units = _units(len(brands), groups)
    if any(split is not None for split in given_splits):
        return _keep_given_splits(brands, given_splits, units, val_frac, seed, keep_leaked)
    plan = SplitPlan(splits=[None] * len(brands))
    _deal_by_brand(plan, brands, units, {"test": test_frac, "val": val_frac}, seed)
    return plan


def _units(count: int, groups: list[list[int]]) -> list[list[int]]:
    in_group = {index for group in groups for index in group}
    return sorted([sorted(group) for group in groups] + [[index] for index in range(count) if index not in in_group])


def _deal_by_brand(plan: SplitPlan, brands: list[str], units: list[list[int]], fractions: dict[str, float], seed: int) -> None:
    by_brand: dict[str, list[list[int]]] = {}
    for unit in units:
        # A group whose copies carry different brands goes with its first member's brand.
        by_brand.setdefault(brands[unit[0]], []).append(unit)
    for brand in sorted(by_brand):
        brand_units = by_brand[brand]
        random.Random(f"{seed}/{brand}").shuffle(brand_units)
        for unit, split in zip(brand_units, _deal(brand, brand_units, fractions, plan.warnings)):
            for index in unit:
                plan.splits[index] = split


def _deal(brand: str, units: list[list[int]], fractions: dict[str, float], warnings: list[str]) -> list[str]:
    """The split of each unit, in order."""
    held_out = [name for name in HELD_OUT if fractions.get(name, 0) > 0]
    size = sum(len(unit) for unit in units)
    if len(units) < 1 + len(held_out):
        order = ["train", *held_out]
        dealt = order[: len(units)]
        counts = ", ".join(f"{dealt.count(name)} {name}" for name in order)
        warnings.append(f"brand {brand!r} has {size} image(s), too few to stratify over {'/'.join(order)}: {counts} (one each to train, then test, then val)")
        return dealt
    targets = {name: max(1, round(size * fractions[name])) for name in held_out}
    while sum(targets.values()) > size - 1:  # train always keeps at least one image
        largest = max(targets, key=lambda name: targets[name])
        targets[largest] -= 1
    filled = dict.fromkeys(held_out, 0)
    dealt = []
    for position, unit in enumerate(units):
        units_left = len(units) - position
        open_splits = [name for name in held_out if filled[name] < targets[name]]
        # Never hand the last unit to a held-out split: train must not end up empty.
        split = open_splits[0] if open_splits and units_left > 1 else "train"
        if split != "train":
            filled[split] += len(unit)
        dealt.append(split)
    return dealt


def _keep_given_splits(
    brands: list[str],
    given_splits: list[str | None],
    units: list[list[int]],
    val_frac: float,
    seed: int,
    keep_leaked: bool,
) -> SplitPlan:
    given = [split or "train" for split in given_splits]
    plan = SplitPlan(splits=list(given))
    training_side = []
    for unit in units:
        held_out = _held_out_split(unit, given)
        leaked = [i for i in unit if held_out is not None and given[i] != held_out]
        for index in leaked:
            plan.leaks.append(Leak(item=index, duplicate_of=[i for i in unit if given[i] == held_out], removed=not keep_leaked))
            if not keep_leaked:
                plan.splits[index] = None
        remaining = [i for i in unit if plan.splits[i] == "train"]
        if remaining:
            training_side.append(remaining)
    if "val" not in given and val_frac > 0:
        # Carve val from the training side only; the given test split is untouched.
        _deal_by_brand(plan, brands, training_side, {"val": val_frac}, seed)
    for brand in sorted(set(brands)):
        present = {plan.splits[i] for i, b in enumerate(brands) if b == brand}
        for split in ("train", "test"):
            if split not in present:
                plan.warnings.append(f"brand {brand!r} has no {split} images in the source's own split")
    return plan


def _held_out_split(unit: list[int], given: list[str]) -> str | None:
    """The held-out split a straddling group belongs to (test wins over val); None if it does not straddle."""
    splits = {given[i] for i in unit}
    for name in HELD_OUT:
        if name in splits and len(splits) > 1:
            return name
    return None
