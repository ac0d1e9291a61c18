"""One budget for the request bodies a server process holds at once, across all its requests.

The upload limit bounds one request; this bounds them together: a request holds the bytes of
its body from the moment they are announced (Content-Length) or arrive (chunked) until it is
answered, and a request that would take the total past the budget is refused with 503 and
Retry-After instead of being buffered: before its body is read when Content-Length announces
it. Requests run on one event loop thread per process, so the counts need no lock.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

from carbrand.serve.settings import RETRY_AFTER_S
from carbrand.serve.uploads import RequestError


class UploadBudget:
    def __init__(self, limit_bytes: int):
        self.limit_bytes, self.held_bytes = limit_bytes, 0

    @contextlib.contextmanager
    def reservation(self) -> Iterator[Reservation]:
        """A request's share, given back whatever way the request ends."""
        reservation = Reservation(self)
        try:
            yield reservation
        finally:
            self.held_bytes -= reservation.held_bytes


class Reservation:
    def __init__(self, budget: UploadBudget):
        self.budget, self.held_bytes = budget, 0

    def cover(self, total_bytes: int) -> None:
        """Hold at least `total_bytes` for this request, or refuse it (503) when the budget has no room."""
        extra = total_bytes - self.held_bytes
        if extra <= 0:
            return
        if self.budget.held_bytes + extra > self.budget.limit_bytes:
            raise RequestError(503, "too_many_uploads", f"uploads in progress hold {self.budget.held_bytes} bytes; "
                               f"{extra} more would pass the limit of {self.budget.limit_bytes}; retry shortly",
                               retry_after_s=RETRY_AFTER_S)
        self.budget.held_bytes += extra
        self.held_bytes += extra


async def covered_as_received(chunks: AsyncIterator[bytes], reservation: Reservation) -> AsyncIterator[bytes]:
    """The body's chunks, each covered by the reservation before it is passed on (a body without Content-Length)."""
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        reservation.cover(received)
        yield chunk
