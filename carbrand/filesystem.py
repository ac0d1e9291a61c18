"""Generic file-system helpers: atomic writes and the run directory's writability probe.

Everything carbrand writes for others to read (checkpoints, exports, the prepared
dataset, evaluation outputs) goes through these, so a crash or a full disk leaves either
the old file or the new one, never a half.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

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


def write_text_atomically(path: Path, text: str) -> None:
    """Write `path` under a temporary name, fsync, then rename: readers see the old file or the new one."""
    temporary = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with temporary.open("w", encoding="utf-8", newline="") as handle:
            handle.write(text)
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
