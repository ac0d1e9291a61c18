"""A stand-in W&B server on 127.0.0.1 that accepts a run, then goes away: for the W&B-dies-mid-run test.

    server = FakeWandbServer.start()       # WANDB_BASE_URL=server.url
    server.wait_for_history()              # the run was created and its first metrics arrived
    server.close()                         # the listening socket and every open connection close

It answers the few GraphQL operations wandb 0.31 (wandb-core) sends to create a run
(UpsertBucket, CreateRunFiles, and {} for anything else), accepts file uploads and the
file_stream posts that carry the run's history, and counts what it got. After close(),
connections are refused, as with a server that is down or a network that dropped.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    operations: list[str] = field(default_factory=list)
    history_lines: int = 0


def graphql_answer(operation: str, variables: dict, base_url: str) -> dict:
    if operation == "UpsertBucket":
        project = variables.get("project") or "uncategorized"
        entity = variables.get("entity") or "carbrand-test"
        return {"upsertBucket": {"inserted": True, "bucket": {
            "id": "UnVuOjE=", "name": variables.get("name") or "run", "displayName": variables.get("displayName") or "run",
            "description": "", "config": "{}", "sweepName": None, "historyLineCount": 0,
            "project": {"id": "UHJvamVjdDox", "name": project, "entity": {"id": "RW50aXR5OjE=", "name": entity}}}}}
    if operation == "CreateRunFiles":
        return {"createRunFiles": {"runID": "UnVuOjE=", "uploadHeaders": [],
                                   "files": [{"name": name, "uploadUrl": f"{base_url}/upload/{name}"}
                                             for name in variables.get("files", [])]}}
    return {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args) -> None:  # quiet
        pass

    def body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else b""
        return gzip.decompress(data) if self.headers.get("Content-Encoding") == "gzip" else data

    def reply(self, answer: dict) -> None:
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        data, received = self.body(), self.server.received
        if self.path.startswith("/graphql"):
            request = json.loads(data or b"{}")
            operation = request.get("operationName") or ""
            received.operations.append(operation)
            self.reply({"data": graphql_answer(operation, request.get("variables") or {}, self.server.base_url)})
        elif self.path.endswith("/file_stream"):
            files = json.loads(data or b"{}").get("files", {})
            received.history_lines += len(files.get("wandb-history.jsonl", {}).get("content", []))
            self.reply({"exitcode": None, "limits": {}})
        else:  # telemetry and anything else
            self.reply({})

    def do_PUT(self) -> None:  # file uploads
        self.body()
        self.reply({})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    received: Received
    base_url: str


@dataclass
class FakeWandbServer:
    httpd: _Server
    thread: threading.Thread
    connections: list[socket.socket] = field(default_factory=list)

    @classmethod
    def start(cls) -> FakeWandbServer:
        httpd = _Server(("127.0.0.1", 0), Handler)
        httpd.received = Received()
        httpd.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
        server = cls(httpd, threading.Thread(target=httpd.serve_forever, daemon=True))
        original = httpd.get_request

        def remember(*args):  # every accepted connection, so that close() can cut them all
            connection, address = original(*args)
            server.connections.append(connection)
            return connection, address

        httpd.get_request = remember
        server.thread.start()
        return server

    @property
    def url(self) -> str:
        return self.httpd.base_url

    @property
    def received(self) -> Received:
        return self.httpd.received

    def wait_for_history(self, lines: int = 1, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.received.history_lines < lines:
            if time.monotonic() > deadline:
                raise AssertionError(f"the fake W&B server got {self.received.history_lines} history lines in {timeout} s "
                                     f"(operations: {self.received.operations})")
            time.sleep(0.05)

    def close(self) -> None:
        """Stop listening and cut every connection: from now on the server is simply not there."""
        self.httpd.shutdown()
        self.httpd.server_close()
        for connection in self.connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()
