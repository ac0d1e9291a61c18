"""Find out what a source directory is and list its images as (path, brand, given split).

Three kinds of source:

    imagefolder       root/<brand>/**/*.jpg                   no split given
    imagefolder       root/{train,val,test}/<brand>/**/*.jpg  split given by the folders
    stanford-cars     the devkit .mat files (see carbrand.prepare.stanford_cars)

`discover` dispatches on the format; the image-folder discovery lives here. Files with an
unknown extension and hidden files (.DS_Store) are listed as skipped, never silently
dropped; files are not opened here (verification decodes them).

Symbolic links are followed, files and folders alike: a dataset is often a tree of links to
photos kept elsewhere. A link to nothing, a link loop, a folder reached a second time (a folder
link back up the tree) and anything that is not a regular file (a device, a pipe) are skipped
with that reason; a link to a file that is not an image is rejected by verification like any
other. An image reached through a link that leads outside the root keeps where it leads
(SourceItem.linked_to): manifest.json records it, and only that target passes the loaders'
root check (carbrand/data/manifest.py, RootGuard).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from carbrand.errors import DataError, UsageError
from carbrand.prepare.formats import AUTO, IMAGE_EXTENSIONS, IMAGEFOLDER, STANFORD_CARS, Source, SourceItem, check_format
from carbrand.prepare.stanford_cars import discover_stanford_cars, find_devkit

SPLIT_FOLDERS = ("train", "val", "test")
# Folders that are never a dataset: scanning them reads the whole machine (/), hangs on device files
# (/dev/zero named *.jpg), or walks kernel trees that never end (/proc, /sys).
SYSTEM_ROOTS = (Path("/"), Path("/bin"), Path("/boot"), Path("/etc"), Path("/lib"), Path("/sbin"), Path("/usr"),
                Path("/var"), Path("/run"), Path("/tmp"))
PSEUDO_FILE_SYSTEMS = (Path("/proc"), Path("/sys"), Path("/dev"))
# A source's top level holds brand folders (or train/val/test): Stanford Cars' 196 car models are
# 49 brands. Far more entries than this is a mistyped path (a photo dump, a home directory).
MAX_TOP_LEVEL_ENTRIES = 10_000


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def detect_format(source: Path) -> str:
    if find_devkit(source) is not None:
        return STANFORD_CARS
    return IMAGEFOLDER


def discover(source: Path, format: str, images: Path | None, exclude: Path | None) -> Source:
    """List the source's images; `exclude` (the output directory) is never scanned."""
    check_format(format)
    refuse_absurd_root(source)
    if not source.exists():
        raise DataError(f"source not found: {source}")
    if not source.is_dir():
        raise DataError(f"source must be a directory: {source}")
    if format == AUTO:
        format = detect_format(source)
    if format == STANFORD_CARS:
        return discover_stanford_cars(source, images)
    if images is not None:
        raise UsageError("--images is only for --format stanford-cars (an image folder holds its own images)")
    return discover_imagefolder(source, exclude)


def refuse_absurd_root(source: Path) -> None:
    """A UsageError naming `source` when it cannot be a dataset, decided before anything under it is listed."""
    real = Path(os.path.realpath(source))  # /home/me/../.. is / too
    why = None
    if real in SYSTEM_ROOTS:
        why = "is a system folder"
    elif any(real == folder or real.is_relative_to(folder) for folder in PSEUDO_FILE_SYSTEMS):
        why = "is under /proc, /sys or /dev"
    elif real == Path(os.path.realpath(Path.home())):
        why = "is your home directory"
    elif _more_entries_than(real, MAX_TOP_LEVEL_ENTRIES):
        why = f"has more than {MAX_TOP_LEVEL_ENTRIES} entries at its top level"
    if why:
        raise UsageError(f"source {source} {why}: not scanned; a source is the folder that holds the brand folders "
                         f"(or train/val/test), or the Stanford Cars devkit")


def _more_entries_than(folder: Path, limit: int) -> bool:
    """Counts the top level only, stopping at limit + 1: a huge folder is not read to the end."""
    try:
        with os.scandir(folder) as entries:
            return any(count > limit for count, _ in enumerate(entries, start=1))
    except OSError:  # missing or unreadable: discover names that in its own words
        return False


def discover_imagefolder(root: Path, exclude: Path | None = None) -> Source:
    top_folders = sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p) and p != exclude)
    split_names = {p.name.lower() for p in top_folders}
    # A tree is "already split" when every top folder is a split name and train is among them.
    if top_folders and split_names <= set(SPLIT_FOLDERS) and "train" in split_names:
        items, skipped = [], []
        for split_folder in top_folders:
            found, ignored = _list_brand_folders(root, split_folder, split_folder.name.lower(), exclude)
            items += found
            skipped += ignored
        skipped += _loose_files(root, root)
        return Source(format=IMAGEFOLDER, root=root, items=items, skipped=skipped, layout="split")
    items, skipped = _list_brand_folders(root, root, None, exclude)
    return Source(format=IMAGEFOLDER, root=root, items=items, skipped=skipped, layout="flat")


def _list_brand_folders(root: Path, parent: Path, split: str | None, exclude: Path | None) -> tuple[list[SourceItem], list[dict[str, str]]]:
    items: list[SourceItem] = []
    skipped = _loose_files(root, parent)
    real_root = Path(os.path.realpath(root))
    for brand_folder in sorted(p for p in parent.iterdir() if p.is_dir() and not _hidden(p) and p != exclude):
        files, loops = _walk(brand_folder, exclude)
        skipped += [{"path": p.relative_to(root).as_posix(), "reason": reason} for p, reason in loops]
        for path, real in files:
            relative = path.relative_to(root).as_posix()
            reason = _not_a_regular_file(path)
            if reason:
                skipped.append({"path": relative, "reason": reason})
            elif any(part.startswith(".") for part in path.relative_to(brand_folder).parts):
                skipped.append({"path": relative, "reason": "hidden file"})
            elif not is_image_name(path):
                skipped.append({"path": relative, "reason": f"not an image extension ({', '.join(IMAGE_EXTENSIONS)})"})
            else:
                real = Path(os.path.realpath(path)) if real is None else real
                items.append(SourceItem(path=path, brand=brand_folder.name, given_split=split,
                                        linked_to=None if real.is_relative_to(real_root) else real))
    return items, skipped


def _walk(folder: Path, exclude: Path | None) -> tuple[list[tuple[Path, Path | None]], list[tuple[Path, str]]]:
    """Every non-folder entry under `folder`, folder links followed, sorted, each with where it really is (None for a
    file link, resolved by the caller); and the folders not followed, with why: most often a link that reaches a
    folder already listed (a loop back up the tree, or a second way into one folder)."""
    files: list[tuple[Path, Path | None]] = []
    loops: list[tuple[Path, str]] = []  # (folder, why it was not followed)
    seen: dict[tuple[int, int], Path] = {}
    for current, folders, names in os.walk(folder, followlinks=True):
        current = Path(current)
        status = os.stat(current)
        seen.setdefault((status.st_dev, status.st_ino), current)
        real_folder = Path(os.path.realpath(current))  # one resolution per folder, not per image
        kept = []
        for name in sorted(folders):
            path = current / name
            if path == exclude:
                continue
            try:
                status = os.stat(path)
            except OSError as error:  # gone or unreadable since it was listed
                loops.append((path, f"unreadable: {error.strerror or error}"))
                continue
            first = seen.setdefault((status.st_dev, status.st_ino), path)
            if first != path:
                loops.append((path, f"symbolic link loop: leads to a folder already listed ({first})"))
            else:
                kept.append(name)
        folders[:] = kept  # os.walk descends only into these
        files += [(current / name, None if (current / name).is_symlink() else real_folder / name) for name in names]
    return sorted(files), sorted(loops)


def _not_a_regular_file(path: Path) -> str | None:
    """Why `path` (a link followed) cannot be read as a photo; None for a regular file."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symbolic link loop"
        if error.errno == errno.ENOENT and path.is_symlink():
            return f"dangling symbolic link (to {os.readlink(path)}, which does not exist)"
        return f"unreadable: {error.strerror or error}"
    if not stat.S_ISREG(mode):
        return "not a regular file (a device, pipe or socket)"
    return None


def _loose_files(root: Path, folder: Path) -> list[dict[str, str]]:
    """Files lying next to the brand folders have no brand: report them, do not guess one (nor drop a broken link)."""
    return [
        {"path": p.relative_to(root).as_posix(), "reason": _not_a_regular_file(p) or "not inside a brand folder"}
        for p in sorted(folder.iterdir())
        if not p.is_dir()
    ]


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")
