"""Grad-CAM overlay files for a list of photos (carbrand explain, carbrand predict --explain).

One PNG per photo, OUT/<name>.gradcam.png; a photo that cannot be read is an error entry naming
it, and the others still get their overlays.
"""

from __future__ import annotations

from pathlib import Path

from carbrand.errors import CarbrandError, UsageError, first_line


def overlay_names(paths: list[Path]) -> list[str]:
    """<stem>.gradcam.png, made unique: two photos called front.jpg in different folders must not overwrite each other."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        names.append(f"{path.stem}.gradcam.png" if count == 1 else f"{path.stem}-{count}.gradcam.png")
    return names


def write_overlays(predictor, paths: list[Path], out: Path, brand: str | None = None) -> tuple[list[str | None], list[dict[str, str]]]:
    """(overlay path or None per photo, errors as {path, error}); a failing photo never stops the others."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CarbrandError(f"cannot create --out {out} ({type(error).__name__}: {error.strerror or error})") from None
    written, errors = [], []
    for path, name in zip(paths, overlay_names(paths)):
        try:
            predictor.write_overlay(path, out / name, brand)
            written.append(str(out / name))
        except UsageError:
            raise
        except Exception as error:  # a DataError names the file already; anything else gets it added
            reason = first_line(error).removeprefix(f"{path}: ")
            errors.append({"path": str(path), "error": reason})
            written.append(None)
    return written, errors
