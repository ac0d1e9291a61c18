"""A small HTTP client for `carbrand serve` (standard library only): multipart uploads, JSON answers.

Used by `carbrand bench serve` and the service's tests; one `ServiceClient` holds one
keep-alive connection, as a real client would, and reconnects when the server closed it.
"""

from __future__ import annotations

import http.client
import json
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass(frozen=True)
class FilePart:
    filename: str
    data: bytes
    content_type: str = "image/jpeg"
    field: str = "images"


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case

    def json(self) -> dict:
        return json.loads(self.body)


def multipart_body(parts: Iterable[FilePart], text_fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """(body, Content-Type header) of a multipart/form-data request."""
    boundary = f"carbrand-{uuid.uuid4().hex}"
    chunks = []
    for name, value in (text_fields or {}).items():
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for part in parts:
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{part.field}"; filename="{part.filename}"\r\n'
                      f"Content-Type: {part.content_type}\r\n\r\n".encode())
        chunks.append(part.data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def in_chunks(body: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """The body as a stream: sent with Transfer-Encoding: chunked, no Content-Length for the server to check first."""
    for start in range(0, len(body), size):
        yield body[start:start + size]


class ServiceClient:
    def __init__(self, url: str, timeout_s: float = 60.0):
        address = urlsplit(url)
        self.host, self.port, self.timeout_s = address.hostname, address.port or 80, timeout_s
        self.connection: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def request(self, method: str, path: str, body=None, headers: dict[str, str] | None = None, chunked: bool = False) -> Answer:
        """One request; a kept-alive connection that the server has closed meanwhile is reopened once."""
        for attempt in (1, 2):
            reused = self.connection is not None
            if not reused:
                self.connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            try:
                self.connection.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
                response = self.connection.getresponse()
                answer = Answer(response.status, response.read(), {name.lower(): value for name, value in response.getheaders()})
                if response.will_close:
                    self.close()
                return answer
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                self.close()
                if not reused or attempt == 2 or chunked:  # a fresh connection failing is a real failure
                    raise
        raise AssertionError("unreachable")

    def get(self, path: str) -> Answer:
        return self.request("GET", path)

    def predict(self, parts: list[FilePart], topk: int | None = None, chunked: bool = False, explain: bool = False) -> Answer:
        body, content_type = multipart_body(parts)
        query = ([f"topk={topk}"] if topk is not None else []) + (["explain=1"] if explain else [])
        path = "/v1/predict" + ("?" + "&".join(query) if query else "")
        return self.request("POST", path, in_chunks(body) if chunked else body, {"Content-Type": content_type}, chunked=chunked)
