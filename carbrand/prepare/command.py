"""Verify a source's images and write a prepared dataset (classes.json, train/val/test.csv, manifest.json).

    carbrand prepare data/cars --out prepared/cars                      # root/<brand>/*.jpg, fresh 80/10/10 split
    carbrand prepare ../shared/data/cars5 --out prepared/cars5          # root/train|test/<brand>: test kept, val carved from train
    carbrand prepare devkit/ --images stanford_cars/ --out prepared/sc  # Stanford Cars, 196 models -> 49 makes
    carbrand prepare devkit/ --images stanford_cars/ --out prepared/sc --crop-boxes   # crops under OUT/crops/

Every image is decoded once, in parallel; rejected files (empty, truncated, not an image,
too small, too many pixels, unreadable) are listed with their reason in manifest.json and
never reach training. Exact and near duplicates stay in one split; copies of a test image
found in train are removed from train (--keep-leaked keeps them) and listed. With
--crop-boxes the bounding-box crops are written to OUT/crops/ and the CSVs point there,
because loaders read files, not boxes.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carbrand.car_models import CarModel
from carbrand.data.images import PILLOW_PIXEL_LIMIT
from carbrand.data.manifest import SPLITS, Sample
from carbrand.errors import DataError, UsageError
from carbrand.prepare.duplicates import DEFAULT_NEAR_DUPLICATE_DISTANCE, duplicate_groups
from carbrand.prepare.formats import AUTO, FORMATS, IMAGE_EXTENSIONS, STANFORD_CARS, Source, SourceItem, check_format
from carbrand.prepare.manifest_writer import write_prepared
from carbrand.prepare.sources import discover
from carbrand.prepare.splits import Leak, SplitPlan, assign_splits
from carbrand.prepare.verify import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, ImageCheck, Limits, VerifyTask, default_workers, verify_images
from carbrand.prepare.verify_cache import CACHE_FILE, VerifyCache

DEFAULT_VAL_FRAC = 0.1
DEFAULT_TEST_FRAC = 0.1  # only for sources without their own test split
CROPS_FOLDER = "crops"


@dataclass(frozen=True)
class PrepareOptions:
    format: str = AUTO  # one of formats.FORMATS: auto | imagefolder | stanford-cars
    images: Path | None = None  # Stanford Cars: folder holding cars_train/ and cars_test/
    val_frac: float = DEFAULT_VAL_FRAC  # of each brand (fresh split) or of its training images (given split)
    test_frac: float | None = None  # None: DEFAULT_TEST_FRAC, ignored when the source gives a test split
    seed: int = 0
    workers: int | None = None  # None: all cores
    min_side: int = DEFAULT_MIN_SIDE
    max_pixels: int = DEFAULT_MAX_PIXELS
    near_duplicate_distance: int = DEFAULT_NEAR_DUPLICATE_DISTANCE  # perceptual-hash bits; -1 turns near duplicates off
    keep_leaked: bool = False  # keep training copies of held-out images (reported either way)
    crop_boxes: bool = False  # Stanford Cars: train on the annotated bounding boxes
    quiet: bool = False  # no progress bar, no table
    verify_cache: bool = True  # reuse OUT/verify_cache.jsonl: a rerun reads only new or changed files


@dataclass
class PrepareSummary:
    out_dir: Path
    root: Path  # the CSV paths are relative to this
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split -> brand -> images
    rejected: list[dict[str, str]]
    skipped: list[dict[str, str]]
    duplicates: list[list[str]]
    leakage_removed: list[dict[str, Any]]
    warnings: list[str]
    images_per_second: float
    manifest: dict[str, Any] = field(default_factory=dict)
    read: list[Path] = field(default_factory=list)  # images read this run; the others came from the verification cache

    def total(self, split: str) -> int:
        return sum(self.counts.get(split, {}).values())


def prepare_dataset(source: str | Path, out: str | Path, options: PrepareOptions | None = None, **overrides: Any) -> PrepareSummary:
    """Prepare SOURCE into OUT; keyword overrides are PrepareOptions fields (e.g. seed=1, quiet=True)."""
    options = _validated(dataclasses.replace(options or PrepareOptions(), **overrides))
    started = time.perf_counter()
    source, out = Path(source).resolve(), Path(out).resolve()
    if out == source:
        raise UsageError(f"--out {out} is the source folder itself: choose a separate output folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")

    found = discover(source, options.format, options.images, exclude=out)
    if options.crop_boxes and found.format != STANFORD_CARS:
        raise UsageError("--crop-boxes needs bounding boxes: only --format stanford-cars has them")
    if not found.items:
        raise DataError(f"no images under {source} (looked for {', '.join(IMAGE_EXTENSIONS)} inside brand folders; {len(found.skipped)} other file(s) skipped)")
    scanned = time.perf_counter()
    # From here on files may be written (crops): a failed run must not leave an older manifest that looks
    # valid next to them. A bad source or option (above) leaves OUT untouched.
    (out / "manifest.json").unlink(missing_ok=True)

    tasks = [_task(item, found, out, options.crop_boxes) for item in found.items]
    cache = VerifyCache(out / CACHE_FILE) if options.verify_cache else None
    try:
        verified = verify_images(tasks, Limits(options.min_side, options.max_pixels), options.workers, not options.quiet, cache)
    finally:
        if cache is not None:
            cache.close()
    accepted = [i for i, check in enumerate(verified.checks) if check.accepted]
    rejected = sorted(
        ({"path": _relative(found, check.path), "reason": check.reason + _link_note(item)}
         for check, item in zip(verified.checks, found.items) if not check.accepted),
        key=lambda entry: entry["path"],
    )
    if not accepted:
        raise DataError(f"all {len(tasks)} images under {source} were rejected (first: {rejected[0]['path']}: {rejected[0]['reason']})")

    checks = [verified.checks[i] for i in accepted]
    items = [found.items[i] for i in accepted]
    duplicates_started = time.perf_counter()
    groups = duplicate_groups([c.sha1 for c in checks], [c.phash for c in checks], options.near_duplicate_distance)
    duplicates_seconds = time.perf_counter() - duplicates_started

    classes = sorted({item.brand for item in items})
    warnings = _lost_brand_warnings(found, classes)
    if len(classes) < 2:
        raise DataError(f"{source}: only one brand ({classes[0]!r}) has usable images; a classifier needs at least two")
    given_split = any(item.given_split for item in items)
    test_frac = _test_frac(options, given_split, warnings)
    plan = assign_splits([item.brand for item in items], [item.given_split for item in items], groups, options.val_frac, test_frac, options.seed, options.keep_leaked)
    warnings += plan.warnings
    for warning in warnings:
        print(f"carbrand prepare: warning: {warning}", file=sys.stderr)

    root = out / CROPS_FOLDER if options.crop_boxes else found.root
    car_models = _car_models(items)
    splits = _samples(items, tasks, accepted, plan, classes, car_models, options.crop_boxes)
    counts = {name: {brand: 0 for brand in classes} | Counter(s.brand for s in splits[name]) for name in SPLITS}
    leaks = [_leak_entry(found, checks, leak) for leak in plan.leaks]
    summary = PrepareSummary(
        out_dir=out,
        root=root,
        classes=classes,
        counts=counts,
        rejected=rejected,
        skipped=found.skipped,
        duplicates=[[_relative(found, checks[i].path) for i in group] for group in groups],
        leakage_removed=[] if options.keep_leaked else leaks,
        warnings=warnings,
        images_per_second=verified.images_per_second,
        read=verified.read,
    )
    timings = {"scan_s": scanned - started, "verify_s": verified.seconds, "duplicates_s": duplicates_seconds, "total_s": time.perf_counter() - started}
    summary.manifest = _manifest(summary, options, found, source, checks, given_split, test_frac, leaks, timings)
    summary.manifest["linked"] = _linked(found, [item for item, split in zip(items, plan.splits) if split], options.crop_boxes)
    write_prepared(out, root, classes, splits, summary.manifest, car_models)
    if cache is not None:
        cache.compact()
    if not options.quiet:
        _print_report(summary, len(tasks), verified.seconds)
    return summary


def _manifest(
    summary: PrepareSummary,
    options: PrepareOptions,
    found: Source,
    source: Path,
    checks: list[ImageCheck],
    given_split: bool,
    test_frac: float,
    leaks: list[dict[str, Any]],
    timings: dict[str, float],
) -> dict[str, Any]:
    """What manifest.json records besides format_version and root (write_prepared adds those)."""
    return {
        "source": str(source),
        "format": found.format,
        "layout": found.layout,
        "source_root": str(found.root),  # rejected/skipped/duplicate paths are relative to this
        "seed": options.seed,
        "val_frac": options.val_frac,
        "test_frac": None if given_split else test_frac,
        "split_rule": "test kept as given by the source; val carved from train" if given_split else "fresh stratified split",
        "counts": summary.counts,
        "totals": {name: summary.total(name) for name in SPLITS},
        "rejected": summary.rejected,
        "skipped": summary.skipped,
        "duplicates": summary.duplicates,
        "leakage_removed": summary.leakage_removed,
        "leakage_kept": leaks if options.keep_leaked else [],
        "min_side": options.min_side,
        "max_pixels": options.max_pixels,
        "near_duplicate_distance": options.near_duplicate_distance,
        "crop_boxes": options.crop_boxes,
        "image_sizes": _size_stats(found, checks),
        "warnings": summary.warnings,
        "workers": options.workers or default_workers(),
        "images_per_second": round(summary.images_per_second, 1),
        "verify_cache": {"read": len(summary.read), "reused": len(checks) + len(summary.rejected) - len(summary.read)},
        "timings": {name: round(seconds, 3) for name, seconds in timings.items()},
    }


def _validated(options: PrepareOptions) -> PrepareOptions:
    for name in ("val_frac", "test_frac"):
        value = getattr(options, name)
        if value is not None and not 0 <= value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value} must be in [0, 1)")
    if options.val_frac + (options.test_frac or 0) >= 1:
        raise UsageError(f"--val-frac {options.val_frac} + --test-frac {options.test_frac} must leave something for train (sum < 1)")
    check_format(options.format)
    if options.workers is not None and options.workers < 1:
        raise UsageError(f"--workers {options.workers} must be at least 1")
    if options.min_side < 1 or options.max_pixels < 1:
        raise UsageError(f"--min-side {options.min_side} and --max-pixels {options.max_pixels} must be positive")
    if options.max_pixels > PILLOW_PIXEL_LIMIT:
        raise UsageError(f"--max-pixels {options.max_pixels} is above {PILLOW_PIXEL_LIMIT}, where Pillow itself refuses "
                         f"to decode (a decompression-bomb guard): no reader could open such an image")
    if not -1 <= options.near_duplicate_distance <= 64:
        raise UsageError(f"--near-duplicate-distance {options.near_duplicate_distance} must be in -1..64 (bits of a 64-bit hash; -1 = off)")
    return options


def _test_frac(options: PrepareOptions, given_split: bool, warnings: list[str]) -> float:
    if not given_split:
        return DEFAULT_TEST_FRAC if options.test_frac is None else options.test_frac
    if options.test_frac is not None:
        warnings.append(f"--test-frac {options.test_frac} ignored: the source already gives a test split")
    return 0.0


def _task(item: SourceItem, found: Source, out: Path, crop_boxes: bool) -> VerifyTask:
    if not crop_boxes:
        return VerifyTask(path=item.path)
    crop_path = (out / CROPS_FOLDER / item.path.relative_to(found.root)).with_suffix(".jpg")
    return VerifyTask(path=item.path, crop_box=item.box, crop_path=crop_path)


def _link_note(item: SourceItem) -> str:
    return f" (a symbolic link to {item.linked_to})" if item.linked_to else ""


def _linked(found: Source, items: list[SourceItem], crop_boxes: bool) -> dict[str, str]:
    """CSV path -> where its link leads outside the root: the only targets the loaders' root check lets through."""
    if crop_boxes:  # the CSVs name the crops, regular files written under OUT/crops/
        return {}
    return {_relative(found, item.path): str(item.linked_to) for item in items if item.linked_to}


def _relative(found: Source, path: Path) -> str:
    return path.relative_to(found.root).as_posix()


def _lost_brand_warnings(found: Source, classes: list[str]) -> list[str]:
    lost = sorted({item.brand for item in found.items} - set(classes))
    return [f"brand {brand!r} dropped: every one of its images was rejected" for brand in lost]


def _samples(items: list[SourceItem], tasks: list[VerifyTask], accepted: list[int], plan: SplitPlan, classes: list[str],
             car_models: list[CarModel] | None, crop_boxes: bool) -> dict[str, list[Sample]]:
    label = {brand: index for index, brand in enumerate(classes)}
    car_model_index = {m.name: index for index, m in enumerate(car_models or [])}
    splits: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for local, (item, split) in enumerate(zip(items, plan.splits)):
        if split is None:
            continue
        path = tasks[accepted[local]].crop_path if crop_boxes else item.path
        splits[split].append(Sample(path=path, label=label[item.brand], brand=item.brand,
                                    car_model=car_model_index.get(item.car_model)))
    for samples in splits.values():
        samples.sort(key=lambda sample: (sample.label, sample.path))
    return splits


def _car_models(items: list[SourceItem]) -> list[CarModel] | None:
    """The car models of the kept images, sorted by name (Stanford Cars); None for a source without them."""
    if not any(item.car_model for item in items):
        return None
    brands = {item.car_model: item.brand for item in items}
    return [CarModel(name=name, brand=brands[name]) for name in sorted(brands)]


def _leak_entry(found: Source, checks: list[ImageCheck], leak: Leak) -> dict[str, Any]:
    return {
        "path": _relative(found, checks[leak.item].path),
        "duplicate_of": [_relative(found, checks[i].path) for i in leak.duplicate_of],
    }


def _size_stats(found: Source, checks: list[ImageCheck]) -> dict[str, Any]:
    smallest = min(checks, key=lambda check: min(check.width, check.height))
    return {
        "min_short_side": min(smallest.width, smallest.height),
        "smallest": _relative(found, smallest.path),
        "median_width": statistics.median(check.width for check in checks),
        "median_height": statistics.median(check.height for check in checks),
    }


def _print_report(summary: PrepareSummary, verified_count: int, verify_seconds: float) -> None:
    width = max(len("total"), *(len(brand) for brand in summary.classes))
    header = f"{'brand':<{width}}  " + "  ".join(f"{name:>6}" for name in (*SPLITS, "all"))
    print(header)
    print("-" * len(header))
    for brand in summary.classes:
        row = [summary.counts[name][brand] for name in SPLITS]
        print(f"{brand:<{width}}  " + "  ".join(f"{n:>6}" for n in (*row, sum(row))))
    totals = [summary.total(name) for name in SPLITS]
    print("-" * len(header))
    print(f"{'total':<{width}}  " + "  ".join(f"{n:>6}" for n in (*totals, sum(totals))))
    duplicated = sum(len(group) for group in summary.duplicates)
    print(f"rejected: {len(summary.rejected)}   skipped (not images): {len(summary.skipped)}   "
          f"duplicate groups: {len(summary.duplicates)} ({duplicated} images)   leakage removed from train: {len(summary.leakage_removed)}")
    reused = f" ({verified_count - len(summary.read)} unchanged, from the verification cache)" if len(summary.read) < verified_count else ""
    print(f"verified {verified_count} images in {verify_seconds:.2f} s{reused}: {summary.images_per_second:.0f} images/s read")
    print(f"wrote {summary.out_dir} (details in manifest.json)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", type=Path, help="image-folder tree (root/<brand>/ or root/train|val|test/<brand>/) or Stanford Cars devkit folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder for classes.json, the split CSVs and manifest.json")
    # No argparse `choices`: formats.check_format is the one check, here as for prepare_dataset's callers.
    parser.add_argument("--format", metavar="{" + ",".join(FORMATS) + "}", default=AUTO, help="source kind (default: auto = devkit if cars_meta.mat is there, else image folder)")
    parser.add_argument("--images", type=Path, default=None, help="Stanford Cars: folder with cars_train/ and cars_test/ (default: next to the devkit)")
    parser.add_argument("--val-frac", type=float, default=DEFAULT_VAL_FRAC, help=f"validation fraction per brand (default: {DEFAULT_VAL_FRAC}; of the training images when the source is already split)")
    parser.add_argument("--test-frac", type=float, default=None, help=f"test fraction per brand (default: {DEFAULT_TEST_FRAC}; ignored when the source gives a test split)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default: 0)")
    parser.add_argument("--workers", type=int, default=None, help="verification processes (default: all cores)")
    parser.add_argument("--min-side", type=int, default=DEFAULT_MIN_SIDE, help=f"reject images whose short side is below this many pixels (default: {DEFAULT_MIN_SIDE})")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help=f"reject images with more pixels, e.g. decompression bombs (default: {DEFAULT_MAX_PIXELS}); "
                             f"recorded in manifest.json, training, evaluate, predict and serve apply the same limit")
    parser.add_argument("--near-duplicate-distance", type=int, default=DEFAULT_NEAR_DUPLICATE_DISTANCE, help=f"max perceptual-hash distance in bits for near duplicates (default: {DEFAULT_NEAR_DUPLICATE_DISTANCE}; -1 = exact duplicates only)")
    parser.add_argument("--keep-leaked", action="store_true", help="keep training copies of test/val images (default: remove them; listed either way)")
    parser.add_argument("--crop-boxes", action="store_true", help="Stanford Cars: crop to the annotated bounding box (crops written to OUT/crops/)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary table")
    parser.add_argument("--no-verify-cache", dest="verify_cache", action="store_false",
                        help=f"read every image again (default: reuse OUT/{CACHE_FILE} for files whose path, size and mtime are unchanged)")


def run(args: argparse.Namespace) -> int:
    options = PrepareOptions(
        format=args.format,
        images=args.images,
        val_frac=args.val_frac,
        test_frac=args.test_frac,
        seed=args.seed,
        workers=args.workers,
        min_side=args.min_side,
        max_pixels=args.max_pixels,
        near_duplicate_distance=args.near_duplicate_distance,
        keep_leaked=args.keep_leaked,
        crop_boxes=args.crop_boxes,
        quiet=args.quiet,
        verify_cache=args.verify_cache,
    )
    prepare_dataset(args.source, args.out, options)
    return 0
