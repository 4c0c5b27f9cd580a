"""A stand-in for GitHub's API, and for an organization's webhook receiver: an HTTP server in a thread
of the test process that records every request and answers as a test tells it to.

By default every request gets 201 with a small JSON body (what GitHub answers a new commit
status). `fail_next(n)` answers the next `n` requests with 500; `down()` makes it unreachable
until `up()`: answering 503, closing the connection without an answer (the receiver saw the
request, the sender got nothing back), or refusing connections (nothing listens on the port).

Loaded for every module through tests/e2e.py's `pytest_plugins`: the fixtures `fake_github`
and `webhook_receiver` are one server each, closed at teardown.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, TypeVar

import pytest

T = TypeVar("T")
DownMode = Literal["503", "close", "refuse"]


@dataclass(frozen=True)
class Request:
    """One request as it arrived: `at` is time.monotonic() on receipt, `answered` the status sent
    back (None: the connection was closed without an answer)."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    at: float
    answered: int | None

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def ok(self) -> bool:
        return self.answered is not None and 200 <= self.answered < 300


class FakeReceiver:
    """The server and what it recorded; safe to read from the test while its threads answer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._failures: list[int] = []  # statuses for the next requests, first first
        self._down: DownMode | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self._listen()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---------------------------------------------------------------- what it answers

    def fail_next(self, count: int, status: int = 500) -> None:
        """Answer the next `count` requests with `status` (then 201 again)."""
        with self._lock:
            self._failures = [status] * count

    def down(self, mode: DownMode = "503") -> None:
        """Be unreachable until `up()`: `503` answers 503, `close` drops the connection unanswered,
        `refuse` stops listening (connections are refused)."""
        with self._lock:
            self._down = mode
        if mode == "refuse":
            self._stop()

    def up(self) -> None:
        with self._lock:
            was, self._down = self._down, None
        if was == "refuse":
            self._listen(self.port)

    def _answer_for(self) -> int | None:
        with self._lock:
            if self._down == "503":
                return 503
            if self._down == "close":
                return None
            return self._failures.pop(0) if self._failures else 201

    def _record(self, request: Request) -> int:
        with self._lock:
            self._requests.append(request)
            return len(self._requests)

    # ---------------------------------------------------------------- what it recorded

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def wait_for(self, predicate: Callable[[list[Request]], T], timeout: float, *, what: str = "") -> T:
        """Poll `predicate(requests)` until it returns something truthy (returned) or `timeout` s pass."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self.requests)
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(f"gave up after {timeout} s waiting for {what or predicate}; "
                                     f"received {[(r.method, r.path, r.answered) for r in self.requests]}")
            time.sleep(0.05)

    # ---------------------------------------------------------------- the server

    def _listen(self, port: int = 0) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                at = time.monotonic()
                status = receiver._answer_for()
                number = receiver._record(Request(self.command, self.path, {k.lower(): v for k, v in
                                                                            self.headers.items()},
                                                  body, at, status))
                if status is None:
                    self.close_connection = True
                    return
                answer = json.dumps({"id": number} if status < 300 else {"message": "Server Error"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the requests are recorded; stderr stays for failures

        # Binding the same port again after `refuse` needs SO_REUSEADDR, which HTTPServer sets.
        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  name=f"fake receiver :{self.port}", daemon=True)
        thread.start()
        self._server, self._thread = server, thread

    def _stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def close(self) -> None:
        self._stop()


@pytest.fixture
def fake_github() -> Iterator[FakeReceiver]:
    """GitHub's API for commit statuses; point HARMONT_GITHUB_API_URL (settings.GITHUB_API_URL) at `.url`."""
    receiver = FakeReceiver()
    try:
        yield receiver
    finally:
        receiver.close()


@pytest.fixture
def webhook_receiver() -> Iterator[FakeReceiver]:
    """An organization's outbound webhook endpoint: register `.url` (plus any path) as a WebhookEndpoint."""
    receiver = FakeReceiver()
    try:
        yield receiver
    finally:
        receiver.close()
