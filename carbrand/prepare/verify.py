"""Decode every image once, in parallel, and say whether training may use it.

Each worker reads the file's bytes (sha1 for exact duplicates), decodes the whole image
with Pillow in strict mode (a truncated JPEG is an error, not a grey bottom half),
applies the EXIF orientation (the size recorded is the size a viewer shows), and
computes a 64-bit perceptual hash for near-duplicate search. With a crop box (Stanford
Cars) it also writes the crop, so the image is still decoded only once.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import io
import os
import signal
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import imagehash
from PIL import Image, ImageFile, UnidentifiedImageError
from tqdm import tqdm

from carbrand.data.images import over_pixel_limit, upright_rgb
from carbrand.data.preprocessing import MAX_PIXELS as DEFAULT_MAX_PIXELS  # the default; manifest.json records the one used
from carbrand.prepare.verify_cache import CacheKey, VerifyCache, cache_key, crop_file_size

# px. Real photos are small more often than expected: 65 of the 8,144 Stanford Cars training photos have
# a short side under 64 (e.g. 112x43), 1 under 32. They are labelled, valid, and the random-resized crop
# upsamples them anyway, so only icon-sized images are refused: below 32 px (CIFAR's size, and
# ResNet's total stride) a photo holds too little of the car to learn a make from.
DEFAULT_MIN_SIDE = 32
EXIF_ORIENTATION = 0x0112
ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # these swap width and height


@dataclass(frozen=True)
class Limits:
    min_side: int = DEFAULT_MIN_SIDE  # reject images whose shorter side is below this
    max_pixels: int = DEFAULT_MAX_PIXELS  # reject images with more pixels (decompression bombs)


@dataclass(frozen=True)
class VerifyTask:
    path: Path
    crop_box: tuple[int, int, int, int] | None = None  # 1-based inclusive x1, y1, x2, y2
    crop_path: Path | None = None  # where the crop is written (JPEG)


@dataclass(frozen=True)
class ImageCheck:
    path: Path
    accepted: bool
    reason: str = ""  # why it was rejected; empty when accepted
    width: int = 0  # after EXIF orientation (and cropping, when cropped)
    height: int = 0
    sha1: str = ""
    phash: int = 0  # 64-bit perceptual hash of the whole oriented image


def check_image(task: VerifyTask, limits: Limits) -> ImageCheck:
    try:
        data = task.path.read_bytes()
    except OSError as error:
        return _reject(task, f"unreadable: {error.strerror or error}")
    if not data:
        return _reject(task, "empty file (0 bytes)")
    sha1 = hashlib.sha1(data).hexdigest()
    try:
        return _decode(task, data, sha1, limits)
    except Exception as error:  # any decoder failure means training would fail on this file too
        return _reject(task, f"cannot decode: {type(error).__name__}: {error}", sha1)


def _decode(task: VerifyTask, data: bytes, sha1: str, limits: Limits) -> ImageCheck:
    # Strict decoding (Pillow's default, asserted because another module may have relaxed it
    # in this worker's parent): a cut-off JPEG must be rejected, not padded with grey.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with warnings.catch_warnings():
        # Our own max_pixels check below replaces Pillow's warning; its hard error still applies.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            return _reject(task, "not an image (Pillow cannot identify the content)", sha1)
        except Image.DecompressionBombError as error:
            return _reject(task, f"too many pixels (decompression bomb): {error}", sha1)
        problem = over_pixel_limit(image.width, image.height, limits.max_pixels)
        if problem:  # the loaders' own words: prepare rejects exactly what they would refuse
            return _reject(task, f"too many pixels: {problem}", sha1)
        try:
            image.load()  # the full decode; header-only checks miss truncated files
        except OSError as error:
            reason = "truncated image" if "truncated" in str(error).lower() else f"cannot decode: {error}"
            return _reject(task, reason, sha1)
    oriented = upright_rgb(image)  # what the loaders will see: a file that cannot become RGB is rejected here
    width, height = oriented.size
    if min(width, height) < limits.min_side:
        return _reject(task, f"too small: {width}x{height}, short side below min_side {limits.min_side}", sha1)
    phash = int(str(imagehash.phash(oriented)), 16)
    if task.crop_box is not None:
        region = crop_region(image.size, task.crop_box)
        if isinstance(region, str):
            return _reject(task, region, sha1)
        width, height = _write_crop(image, region, task)
        if min(width, height) < limits.min_side:
            return _reject(task, f"crop too small: {width}x{height}, short side below min_side {limits.min_side}", sha1)
    return ImageCheck(path=task.path, accepted=True, width=width, height=height, sha1=sha1, phash=phash)


def crop_region(size: tuple[int, int], box: tuple[int, int, int, int]) -> tuple[int, int, int, int] | str:
    """The pixels (left, top, right, bottom) a 1-based inclusive box selects in a stored image of `size`, or why none.

    Boxes may overrun the image by a pixel (the devkit has such boxes: kept, clipped). A file the
    size of its box that the box does not fit is a copy already cropped to the box (copies of
    Stanford Cars published that way exist): it is used whole. A box mostly outside the image
    belongs to another copy of the photo: rejected, never a crop of the wrong pixels.
    """
    width, height = size
    x1, y1, x2, y2 = box
    overruns = x2 > width + 1 or y2 > height + 1
    if overruns and (width, height) in ((x2 - x1, y2 - y1), (x2 - x1 + 1, y2 - y1 + 1)):
        return 0, 0, width, height
    left, top, right, bottom = max(0, x1 - 1), max(0, y1 - 1), min(width, x2), min(height, y2)
    inside = max(0, right - left) * max(0, bottom - top)
    if 2 * inside < (x2 - x1 + 1) * (y2 - y1 + 1):
        return f"bounding box {x1},{y1},{x2},{y2} lies mostly outside the {width}x{height} image (an annotation for another copy of this photo?)"
    return left, top, right, bottom


def _write_crop(image, region: tuple[int, int, int, int], task: VerifyTask) -> tuple[int, int]:
    # Boxes were drawn on the stored pixels, so crop before applying the EXIF orientation.
    crop = upright_rgb(image.crop(region))
    task.crop_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = task.crop_path.with_name(task.crop_path.name + f".{os.getpid()}.tmp")
    crop.save(temporary, format="JPEG", quality=95)
    os.replace(temporary, task.crop_path)
    return crop.size


def _reject(task: VerifyTask, reason: str, sha1: str = "") -> ImageCheck:
    return ImageCheck(path=task.path, accepted=False, reason=reason, sha1=sha1)


@dataclass
class VerifyResult:
    checks: list[ImageCheck]  # in the order of the tasks
    seconds: float
    read: list[Path] = field(default_factory=list)  # files verified by reading them (the others came from the cache)

    @property
    def images_per_second(self) -> float:
        """Files read and checked per second (cache hits excluded)."""
        return len(self.read) / self.seconds if self.seconds > 0 else 0.0


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """Worker initializer. A prepare killed with SIGKILL runs no clean-up, and a forked worker holds its own copy
    of the task pipe, so it would wait for work forever: ask Linux to kill it when its parent dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the request was in place
        os._exit(1)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def verify_images(tasks: list[VerifyTask], limits: Limits, workers: int | None = None, progress: bool = True,
                  cache: VerifyCache | None = None) -> VerifyResult:
    """Check every task across `workers` processes, with a progress bar on stderr; `cache` skips unchanged files."""
    start = time.perf_counter()
    keys = [_key(task, limits) if cache is not None else None for task in tasks]
    checks: list[ImageCheck | None] = [_from_cache(cache, key, task) for task, key in zip(tasks, keys)]
    todo = [index for index, check in enumerate(checks) if check is None]
    workers = max(1, min(workers or default_workers(), len(todo) or 1))
    # Chunks amortise the inter-process traffic but stay small enough to balance the load and to
    # record progress in the cache often.
    chunksize = max(1, min(16, len(todo) // (workers * 8)))
    check = partial(check_image, limits=limits)
    with tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="verify", unit="img", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        # Always worker processes, even for one: they own Pillow's strict-decoding switch, so
        # the calling process's Pillow settings are never changed.
        with ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
            for index, result in zip(todo, pool.map(check, [tasks[i] for i in todo], chunksize=chunksize)):
                checks[index] = result
                _remember(cache, keys[index], tasks[index], result)
                bar.update(1)
    return VerifyResult(checks=checks, seconds=time.perf_counter() - start, read=[tasks[i].path for i in todo])


def _key(task: VerifyTask, limits: Limits) -> CacheKey | None:
    return cache_key(task.path, limits.min_side, limits.max_pixels, task.crop_box, task.crop_path)


def _from_cache(cache: VerifyCache | None, key: CacheKey | None, task: VerifyTask) -> ImageCheck | None:
    recorded = cache.lookup(key) if cache is not None else None
    if recorded is None:
        return None
    return ImageCheck(**{**recorded, "path": task.path})


def _remember(cache: VerifyCache | None, key: CacheKey | None, task: VerifyTask, result: ImageCheck) -> None:
    # A file that could not be read may be readable next time (permissions, a network mount): not cached.
    if cache is None or key is None or result.reason.startswith("unreadable"):
        return
    key = dataclasses.replace(key, crop_size=crop_file_size(task.crop_path))  # the crop just written
    cache.record(key, {**dataclasses.asdict(result), "path": str(result.path)})
