"""Write small real image files -- good, odd and broken -- for the prepare tests."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def photo(seed: int, size: tuple[int, int] = (120, 90), mode: str = "RGB") -> Image.Image:
    """Smooth random content: every seed gives a different perceptual hash (flat colours would not)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.BILINEAR)
    return image.convert(mode) if mode != "RGB" else image


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (120, 90), mode: str = "RGB", **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(seed, size, mode).save(path, format="JPEG", quality=90, **save_args)
    return path


def write_png_named_jpg(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(seed).save(path, format="PNG")
    return path


def write_exif_rotated(path: Path, seed: int, stored_size: tuple[int, int] = (200, 100), orientation: int = 6) -> Path:
    """Stored landscape with an EXIF Orientation tag that a viewer turns into portrait."""
    image = photo(seed, stored_size)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=90, exif=exif.tobytes())
    return path


def write_zero_bytes(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_truncated_jpeg(path: Path, seed: int, keep: float = 0.5) -> Path:
    buffer = io.BytesIO()
    photo(seed, (160, 120)).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def write_text(path: Path, text: str = "not a picture\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_huge_header_png(path: Path, width: int = 10_000, height: int = 10_000) -> Path:
    """A valid PNG header claiming width x height pixels over a tiny body: a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    body = zlib.compress(b"\x00" * 1024)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def write_brand_tree(root: Path, images_per_brand: dict[str, int], first_seed: int = 0) -> list[Path]:
    """root/<brand>/<brand>_<n>.jpg with distinct content for every file."""
    paths, seed = [], first_seed
    for brand, count in images_per_brand.items():
        for number in range(count):
            paths.append(write_jpeg(root / brand / f"{brand}_{number:02d}.jpg", seed))
            seed += 1
    return paths
