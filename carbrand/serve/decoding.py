"""An uploaded file's bytes -> an upright RGB photo, in memory, through the same decoding as every other path.

Decoding goes through carbrand.data.images.load_rgb, so the service refuses exactly what
prepare and predict refuse: over the export's pixel limit (data.max_pixels, the one prepare
applied to its training data; checked from the header, before any pixel is decoded), truncated
data, anything Pillow cannot identify. Each refusal is a RequestError naming the file.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from carbrand.data.images import load_rgb
from carbrand.errors import DataError, first_line
from carbrand.serve.uploads import RequestError, Upload


class NamedBytes(io.BytesIO):
    """In-memory file whose str() is the uploaded file's name: load_rgb's errors name their `path`."""

    def __init__(self, data: bytes, filename: str):
        super().__init__(data)
        self.filename = filename

    def __str__(self) -> str:
        return self.filename


def decode_photo(upload: Upload, max_pixels: int = 0) -> Image.Image:
    """The upload as an upright RGB photo, or a 4xx RequestError; `max_pixels` is the export's data.max_pixels."""
    name = upload.filename
    if not upload.data:
        raise RequestError(422, "empty_file", f"{name}: empty file (0 bytes)")
    try:
        return load_rgb(NamedBytes(bytes(upload.data), name), max_pixels)
    except DataError as error:  # images.py refuses over the pixel limit, before decoding
        raise RequestError(413, "too_many_pixels", first_line(error)) from None
    except UnidentifiedImageError:
        raise RequestError(422, "not_an_image", f"{name}: not an image (Pillow cannot identify the content)") from None
    except Exception as error:  # truncated or corrupt data
        raise RequestError(422, "cannot_decode", f"{name}: cannot decode: {type(error).__name__}: {first_line(error)}") from None


def decode_photos(uploads: list[Upload], max_pixels: int = 0) -> list[Image.Image]:
    return [decode_photo(upload, max_pixels) for upload in uploads]
