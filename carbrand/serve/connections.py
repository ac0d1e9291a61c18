"""uvicorn's HTTP/1.1 protocol (h11) with a cap on open connections and a deadline for each request to arrive.

uvicorn alone times nothing out until a first response has been sent (its keep-alive timer
starts only then): a client that sends its headers or body a byte a second holds its connection
and its upload buffer for ever (measured: 20 such clients were all still connected after 30 s).
Its `limit_concurrency` answers in plain text, without Retry-After, and only once the request's
headers have arrived, which a slow client never completes. So each connection here:

- is refused at once when the process already holds `max_connections`: a 503 JSON error with
  Retry-After, written before reading anything, then the connection is closed after a short
  linger (reading and discarding what the client sends meanwhile, so that it reads the 503
  instead of a reset);
- must keep its request, headers and body, arriving: it has `client_timeout_s`, and each byte
  received adds 1 / `min_upload_bytes_per_s` s, never to more than `client_timeout_s` ahead of
  now. A photo sent at the minimum rate or faster always arrives; a byte a second is cut off
  after about `client_timeout_s`, and so is an upload that stalls that long, however much it
  sent before (time cannot be banked to hold a large share of the upload budget). Past its
  deadline a request is answered 408 (when no answer has started) and closed, which frees its
  connection slot and, through the app's disconnect, its share of the upload budget.

The time starts when the connection opens, or at the first byte of each later request; it stops
once the whole request has arrived (inference time is not the client's), and it is extended
while uvicorn itself has paused reading (the app is behind, not the client).
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from carbrand.serve.settings import RETRY_AFTER_S, ConnectionLimits

REFUSED_LINGER_S = 1.0  # a refused connection is read and discarded this long, so its 503 is not lost to a reset
RECEIVING = (h11.IDLE, h11.SEND_BODY)  # the client's side while a request of its is still arriving


def error_response(status: int, reason: str, code: str, message: str, retry_after_s: int | None = None) -> bytes:
    """A whole HTTP/1.1 response with the service's JSON error body, closing the connection."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
               "connection: close"] + ([f"retry-after: {retry_after_s}"] if retry_after_s is not None else [])
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


class LimitedH11Protocol(H11Protocol):
    """Given to uvicorn as its `http` protocol (functools.partial with the limits); one instance per connection."""

    def __init__(self, *args, limits: ConnectionLimits, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.refused = False
        self.deadline = 0.0  # loop time by which the request being received must have arrived
        self.deadline_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._start_deadline()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # read and dropped until the linger ends
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.conn.their_state in RECEIVING:
            if self.deadline_timer is None:  # the first byte of a later request on a kept-alive connection
                self._start_deadline()
            if self.limits.min_upload_bytes_per_s > 0:  # credit for what arrived, never banked past one timeout
                earned = self.deadline + len(data) / self.limits.min_upload_bytes_per_s
                self.deadline = min(earned, self.loop.time() + self.limits.client_timeout_s)
        else:
            self._stop_deadline()  # the whole request is in: the rest of its time is the server's

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        if not self.refused:
            super().connection_lost(exc)

    def _refuse(self, transport: asyncio.Transport) -> None:
        self.refused, self.transport = True, transport
        message = f"the service holds {self.limits.max_connections} connections, its limit; retry shortly"
        transport.write(error_response(503, "Service Unavailable", "too_many_connections", message, RETRY_AFTER_S))
        self.deadline_timer = self.loop.call_later(REFUSED_LINGER_S, transport.close)

    def _start_deadline(self) -> None:
        self.deadline = self.loop.time() + self.limits.client_timeout_s
        self.deadline_timer = self.loop.call_later(self.limits.client_timeout_s, self._check_deadline)

    def _stop_deadline(self) -> None:
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
            self.deadline_timer = None

    def _check_deadline(self) -> None:
        if self.flow is not None and self.flow.read_paused:  # uvicorn stopped reading: the app is behind, not the client
            self.deadline = max(self.deadline, self.loop.time() + self.limits.client_timeout_s)
        remaining = self.deadline - self.loop.time()
        if remaining > 0:  # bytes received since the timer was set moved the deadline on
            self.deadline_timer = self.loop.call_later(remaining, self._check_deadline)
        else:
            self.deadline_timer = None
            self._cut_off()

    def _cut_off(self) -> None:
        """408 and close: a request still unanswered (none started) is told why; the app sees a disconnect."""
        if self.transport.is_closing():
            return
        answering = self.conn.their_state is h11.SEND_BODY and self.cycle is not None and self.cycle.response_started
        if self.conn.their_state is h11.SEND_BODY and self.cycle is not None:
            self.cycle.disconnected = True  # nothing more goes out on this connection: the app's receive() ends
            self.cycle.message_event.set()
        if not answering:
            message = f"the request fell {self.limits.client_timeout_s:g} s behind " \
                      f"{self.limits.min_upload_bytes_per_s} bytes a second"
            self.transport.write(error_response(408, "Request Timeout", "request_timeout", message))
        self.transport.close()
