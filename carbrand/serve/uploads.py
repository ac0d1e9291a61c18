"""Read a multipart upload into memory, never past the upload limit, never onto disk.

Starlette's own form parser spools files over 1 MB to a temporary file; this one streams the
request body through python-multipart's push parser and keeps each part's bytes in memory,
refusing the request as soon as the body passes the limit (or at once, from Content-Length).
Every refusal is a `RequestError`: an HTTP status, a short code and a message naming the problem.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header

IMAGE_FIELD = "images"
# What a browser or curl may declare for a photo; the content itself is what decides (decoding checks it).
ACCEPTED_PART_TYPES = ("image/", "application/octet-stream")


class RequestError(Exception):
    """A request the service refuses: answered with `status` and {"error": {"code", "message"}}."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after_s = retry_after_s  # a 503's Retry-After: when trying again is worth it


@dataclass
class Upload:
    filename: str
    content_type: str
    data: bytearray = field(default_factory=bytearray)


@dataclass
class _PartInProgress:
    headers: dict[str, str] = field(default_factory=dict)
    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    upload: Upload | None = None  # None: a field other than `images`, read past and dropped


def multipart_boundary(content_type: str | None) -> bytes:
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        shown = content_type or "none"
        raise RequestError(415, "wrong_content_type",
                           f"Content-Type must be multipart/form-data with the photos in field '{IMAGE_FIELD}'; got {shown}")
    if not options.get(b"boundary"):
        raise RequestError(400, "malformed_multipart", "multipart/form-data without a boundary")
    return options[b"boundary"]


def check_declared_length(content_length: str | None, limit_bytes: int) -> None:
    """Refuse from the header, before reading a byte, a body that announces it is too large."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit_bytes:
        raise RequestError(413, "upload_too_large", f"the upload is {int(content_length)} bytes, over the limit of {limit_bytes} bytes")


async def read_uploads(chunks: AsyncIterator[bytes], content_type: str | None, limit_bytes: int, max_images: int) -> list[Upload]:
    """The files of field `images`, in order; RequestError for anything else than a well-formed, small enough upload."""
    boundary = multipart_boundary(content_type)
    state = _ParserState(max_images)
    parser = MultipartParser(boundary, state.callbacks())
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        if received > limit_bytes:  # stop reading here: the rest of the body is never held
            raise RequestError(413, "upload_too_large", f"the upload is over the limit of {limit_bytes} bytes")
        try:
            parser.write(chunk)
        except RequestError:
            raise
        except Exception as error:  # python-multipart's parse errors
            raise RequestError(400, "malformed_multipart", f"the multipart body cannot be parsed ({error})") from None
    if not state.finished:
        raise RequestError(400, "malformed_multipart", "the multipart body ends before its closing boundary")
    if not state.uploads:
        raise RequestError(400, "missing_field", f"no file in field '{IMAGE_FIELD}': send the photos as {IMAGE_FIELD}=@photo.jpg")
    return state.uploads


class _ParserState:
    """python-multipart's callbacks, collecting the parts of field `images`."""

    def __init__(self, max_images: int):
        self.max_images = max_images
        self.uploads: list[Upload] = []
        self.part = _PartInProgress()
        self.finished = False

    def callbacks(self) -> dict:
        return {"on_part_begin": self.part_begin, "on_header_field": self.header_field, "on_header_value": self.header_value,
                "on_header_end": self.header_end, "on_headers_finished": self.headers_finished,
                "on_part_data": self.part_data, "on_end": self.end}

    def part_begin(self) -> None:
        self.part = _PartInProgress()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.part.header_field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self.part.header_value += data[start:end]

    def header_end(self) -> None:
        name = self.part.header_field.decode("latin-1").strip().lower()
        self.part.headers[name] = self.part.header_value.decode("utf-8", "replace")
        self.part.header_field, self.part.header_value = bytearray(), bytearray()

    def headers_finished(self) -> None:
        _, options = parse_options_header(self.part.headers.get("content-disposition", ""))
        if options.get(b"name", b"").decode("utf-8", "replace") != IMAGE_FIELD:
            return
        if b"filename" not in options:
            raise RequestError(400, "not_a_file", f"field '{IMAGE_FIELD}' must hold files (filename=...), not text")
        filename = options[b"filename"].decode("utf-8", "replace") or f"image {len(self.uploads) + 1}"
        content_type = self.part.headers.get("content-type", "application/octet-stream").strip().lower()
        if not content_type.startswith(ACCEPTED_PART_TYPES):
            raise RequestError(415, "wrong_content_type", f"{filename}: Content-Type {content_type} is not an image type")
        if len(self.uploads) == self.max_images:
            raise RequestError(413, "too_many_images", f"more than {self.max_images} images in one request")
        self.part.upload = Upload(filename, content_type)
        self.uploads.append(self.part.upload)

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self.part.upload is not None:
            self.part.upload.data += data[start:end]

    def end(self) -> None:
        self.finished = True
