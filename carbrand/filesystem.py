"""Generic file-system helpers: atomic writes, the run directory's writability probe and the low-disk warning.

Everything carbrand writes for others to read (checkpoints, exports, the prepared
dataset, evaluation outputs) goes through these, so a crash or a full disk leaves either
the old file or the new one, never a half.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from carbrand.errors import CarbrandError, first_line

FULL_DISK_BYTES = 1 << 20  # less free than this after a failed write: the disk is what failed it


def io_reason(error: BaseException) -> str:
    """'No space left on device', not 'Error while serializing: I/O error: No space left on device (os error 28)'."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return re.sub(r"^.*I/O error: (.*?)( \(os error \d+\))?$", r"\1", first_line(error))


def write_failure_reason(error: BaseException, folder: Path) -> str:
    """io_reason, except that torch.save reports a full disk as 'unexpected pos N vs M': then name the full disk."""
    if not isinstance(error, OSError):
        try:
            if shutil.disk_usage(folder).free < FULL_DISK_BYTES:
                return "No space left on device"
        except OSError:
            pass
    return io_reason(error)


def write_directory_atomically(final: Path, write_into: Callable[[Path], None]) -> Path:
    """Call write_into(tmp_dir), fsync the files, then rename tmp_dir to `final` (replacing it).

    A disk error (full, read-only, quota, file too large) becomes one line naming the directory.
    On any exception, that one or another (a bug, KeyboardInterrupt), the temporary is removed
    and the previous `final`, if any, is left as it was.
    """
    temporary = final.parent / f".tmp-{final.name}-{os.getpid()}"
    retired = final.parent / f".old-{final.name}-{os.getpid()}"
    restore_interrupted_swap(final)  # else a dead writer's `.old-` stays beside the new `final` for ever
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir()
        write_into(temporary)
        for child in temporary.iterdir():
            with child.open("rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            # rename() cannot replace a non-empty directory: move the old one aside first.
            os.rename(final, retired)
            os.rename(temporary, final)
            shutil.rmtree(retired)
        else:
            os.rename(temporary, final)
    except BaseException as error:
        reason = write_failure_reason(error, final.parent)  # before the cleanup frees the space again
        shutil.rmtree(temporary, ignore_errors=True)
        if retired.exists() and not final.exists():
            os.rename(retired, final)
        if isinstance(error, (OSError, SafetensorError, RuntimeError)):  # safetensors and torch.save wrap I/O errors
            raise CarbrandError(f"could not write {final} ({reason}); the previous copy, if any, is intact") from None
        raise
    return final


# A swap is two renames microseconds apart. `final` missing while an `.old-FINAL-PID` copy has been
# beside it for longer than this means its writer died between the two (kill -9, a node failure).
ABANDONED_SWAP_S = 1.0


def restore_interrupted_swap(final: Path) -> bool:
    """Put back `final` from the `.old-` copy a writer killed mid-swap left behind; True if `final` exists now.

    The `.old-` copy is restored, not the `.tmp-` one beside it: the old one was a complete `final`
    renamed whole, while a `.tmp-` may have been half deleted by the dead writer's own cleanup.
    Restoring is a rename, so two processes doing it at once cannot tear anything: one wins, the
    other finds `final` there. A live writer paused longer than ABANDONED_SWAP_S inside its swap
    would then fail its second rename with one line (write_directory_atomically), never tear it.
    """
    if final.exists():
        return True
    retired = _retired_copies(final)
    if not retired:
        return False
    newest = max(retired, key=_changed_at)
    wait = ABANDONED_SWAP_S - (time.time() - _changed_at(newest))
    if wait > 0:  # maybe a live swap: give it time to finish
        time.sleep(wait)
        if final.exists():
            return True
    try:
        os.rename(newest, final)
    except OSError:  # restored or swapped by someone else meanwhile, or a reader without write access
        return final.exists()
    print(f"carbrand: warning: {final} was missing; restored it from {newest.name}, left by a process killed while "
          f"replacing it", file=sys.stderr, flush=True)
    return True


def _retired_copies(final: Path) -> list[Path]:
    try:
        return [child for child in final.parent.iterdir() if child.name.startswith(f".old-{final.name}-")]
    except OSError:
        return []


def _changed_at(path: Path) -> float:
    """When it was renamed aside: a rename sets the moved folder's ctime, and nothing writes into it after."""
    try:
        return path.stat().st_ctime
    except FileNotFoundError:
        return 0.0


def write_text_atomically(path: Path, text: str) -> None:
    """Write `path` under a temporary name, fsync, then rename: readers see the old file or the new one."""
    write_bytes_atomically(path, text.encode("utf-8"))


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Write `path` under a temporary name, fsync, then rename: readers see the old file or the new one."""
    temporary = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def check_run_dir_writable(run_dir: Path) -> None:
    """Fail now, not after hours of training, if checkpoints cannot be written (create, fsync, remove a file)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        with probe.open("w") as handle:
            handle.write("ok")
            handle.flush()
            os.fsync(handle.fileno())  # some filesystems (quota, NFS) only refuse at flush time
        probe.unlink()
    except OSError as error:
        raise CarbrandError(f"run directory {run_dir} is not writable ({error.strerror or error}); "
                            f"set output.dir to a writable directory") from None


class DirectoryReplaced(Exception):
    """The directory was replaced while it was being read (write_directory_atomically ran meanwhile)."""


READ_ATTEMPTS = 4
SWAP_WAIT_S = 0.02


def read_directory_consistently(directory: Path, names: tuple[str, ...]) -> dict[str, bytes | None]:
    """The named files of one version of `directory` (None for a file it lacks), even while it is being replaced.

    write_directory_atomically replaces a directory by renaming the old one aside and the new one
    in, then deleting the old one. A reader that opened files by path could get some from the old
    version and some from the new, or find one gone. Here every file is opened through one handle
    on the directory, all before any is read: they belong to one version, and stay readable after
    it is deleted. If that version was deleted before all were open, or the directory is missing
    while a swap is under way (a `.old-`/`.tmp-` sibling exists), the read starts again (a few
    times, a few milliseconds apart); missing through all of them, it is restored from the `.old-`
    copy of a writer that died mid-swap (restore_interrupted_swap). A missing directory without
    a swap raises FileNotFoundError.
    """
    for attempt in range(READ_ATTEMPTS):
        last = attempt == READ_ATTEMPTS - 1
        try:
            return _read_one_version(directory, names)
        except FileNotFoundError:
            if not _swap_under_way(directory):
                raise
            if last:  # missing through every attempt: a swap whose writer died between its two renames
                if not restore_interrupted_swap(directory):
                    raise
                return _read_one_version(directory, names)
        except DirectoryReplaced:
            if last:
                raise FileNotFoundError(f"{directory} was replaced {READ_ATTEMPTS} times while it was read") from None
        time.sleep(SWAP_WAIT_S)
    raise AssertionError("unreachable")


def _read_one_version(directory: Path, names: tuple[str, ...]) -> dict[str, bytes | None]:
    handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    files: dict[str, int | None] = {}
    try:
        for name in names:
            try:
                files[name] = os.open(name, os.O_RDONLY, dir_fd=handle)
            except FileNotFoundError:
                files[name] = None
        if any(fd is None for fd in files.values()) and _replaced(directory, handle):
            raise DirectoryReplaced(directory)  # deleted under us, not an incomplete directory
        contents = {}
        for name, fd in files.items():
            if fd is None:
                contents[name] = None
                continue
            with os.fdopen(fd, "rb") as stream:
                files[name] = None  # closed by the `with`
                contents[name] = stream.read()
        return contents
    finally:
        for fd in files.values():
            if fd is not None:
                os.close(fd)
        os.close(handle)


def _replaced(directory: Path, handle: int) -> bool:
    try:
        return os.stat(directory).st_ino != os.fstat(handle).st_ino or os.fstat(handle).st_nlink == 0
    except FileNotFoundError:
        return True


def _swap_under_way(directory: Path) -> bool:
    prefixes = (f".old-{directory.name}-", f".tmp-{directory.name}-")
    try:
        return any(child.name.startswith(prefixes) for child in directory.parent.iterdir())
    except OSError:
        return False


# Free space before each checkpoint: a warning while there is still time to act, not a failed save hours later.
# A checkpoint is written whole before the oldest one is deleted, and best/ may be rewritten next to it, so a
# save needs about twice the size of the last checkpoint. When the run directory's file system has less free
# than that, rank 0 says so in one line naming both figures (at every checkpoint while it lasts). If the save
# then fails all the same, the atomic write above leaves the previous checkpoint complete and loadable.
CHECKPOINT_SPACE_FACTOR = 2


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file() and not path.is_symlink())


def payload_bytes(value: Any) -> int:
    """The tensor bytes inside nested dicts and lists: a first checkpoint's size, before any was written."""
    if hasattr(value, "element_size"):  # a tensor (duck-typed: this module does not import torch)
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(payload_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(payload_bytes(item) for item in value)
    return 0


def human(size: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def warn_if_short_of_space(run_dir: Path, last_checkpoint: Path | None, estimate: Any) -> None:
    """One warning line when free space < twice the last checkpoint (or the `estimate` payload's size)."""
    checkpoint_bytes = directory_bytes(last_checkpoint) if last_checkpoint is not None else payload_bytes(estimate)
    needed = CHECKPOINT_SPACE_FACTOR * checkpoint_bytes
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        print(f"carbrand: warning: {run_dir} has {free} bytes free ({human(free)}), less than the {needed} bytes "
              f"({human(needed)}) a checkpoint needs (twice the last one, {human(checkpoint_bytes)}); free some space "
              f"or this run stops at a failed save (the previous checkpoint stays loadable)", file=sys.stderr, flush=True)
