"""The server served for real, and an SSE client that reads as the bytes arrive.

`asgi_server` serves `harmont.asgi:application` with uvicorn in a thread of the test
process, one server per test module: `/v0/...` reaches Django's ASGI handler,
claims go through builds.claim_waits, everything else the WSGI app through a2wsgi.
`live_asgi` is that server for one test. `gunicorn_server` is what production runs
(harmont/gunicorn_conf.py: harmont.worker's workers), in a process of its own: it
sees the test's database, not the test's settings. Settings changed with the
`settings` fixture and functions patched with `monkeypatch` reach the server too.
Tests using it need a transactional database (the server's threads must see what the
test commits); on SQLite the module runs on a file copy of the test database
(`tests.e2e.e2e_database`), because every thread must have a connection of its own.

`EventStream` is a plain `http.client` request whose body a reader thread parses
line by line into events, each stamped with the time it arrived, so tests can
assert what came, in which order, and how soon.

The fixtures are loaded for every module by tests/conftest.py (`pytest_plugins`).
"""

from __future__ import annotations

import gc
import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from django.db import connections

from tests.e2e import PROJECT_ROOT, worker_environment

EOF = object()  # queued by the reader when the server ended the response


@dataclass
class Event:
    """One server-sent event (`event` is "comment" for a `:` line); `at` is time.monotonic() on receipt."""

    event: str
    data: Any = None
    id: int | None = None
    lines: list[str] = field(default_factory=list)
    at: float = 0.0


class EventStream:
    """GET an SSE URL; on 200 a reader thread turns the body into `Event`s as lines arrive."""

    def __init__(self, host: str, port: int, path: str, headers: dict[str, str] | None = None) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=30)
        self.conn.connect()
        self.sock = self.conn.sock  # kept: shutdown() is what wakes a reader blocked in recv()
        self.conn.request("GET", path, headers={"Accept": "text/event-stream", **(headers or {})})
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.headers = self.response.headers
        self.events: queue.Queue[Event | object] = queue.Queue()
        self.ended = False
        self.body = b""
        self.reader: threading.Thread | None = None
        if self.status == 200:
            self.reader = threading.Thread(target=self._read, name=f"sse {path[:40]}", daemon=True)
            self.reader.start()
        else:
            self.body = self.response.read()

    def json(self) -> Any:
        return json.loads(self.body)

    def _read(self) -> None:
        lines: list[str] = []
        try:
            while True:
                raw = self.response.readline()
                if not raw:
                    break
                line = raw.decode().rstrip("\r\n")
                if line.startswith(":"):
                    self.events.put(Event("comment", line[1:].strip(), lines=[line], at=time.monotonic()))
                elif line:
                    lines.append(line)
                elif lines:
                    self.events.put(parse_event(lines))
                    lines = []
        except (OSError, ValueError, http.client.HTTPException):
            pass  # closed by close(), or the connection dropped: either way the stream is over
        finally:
            self.events.put(EOF)

    def next(self, timeout: float = 5) -> Event:
        """The next event; fails if none comes within `timeout` s or the stream ended."""
        try:
            item = self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event within {timeout} s") from None
        if item is EOF:
            self.ended = True
            raise AssertionError("the stream ended")
        assert isinstance(item, Event)
        return item

    def next_data_event(self, timeout: float = 5) -> Event:
        """The next event that is not a keep-alive comment."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.next(max(deadline - time.monotonic(), 0.01))
            if event.event != "comment":
                return event

    def chunks(self, count: int, timeout: float = 5) -> list[Event]:
        """The next `count` events, each of which must be a `chunk`."""
        received = [self.next_data_event(timeout) for _ in range(count)]
        assert [event.event for event in received] == ["chunk"] * count, [e.lines for e in received]
        return received

    def assert_silent(self, seconds: float) -> None:
        """Nothing but keep-alives arrives for `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self.events.get(timeout=left)
            except queue.Empty:
                return
            assert isinstance(item, Event) and item.event == "comment", getattr(item, "lines", "the stream ended")

    def wait_closed(self, timeout: float = 2) -> float:
        """Wait for the server to end the response (nothing else may come first); returns when."""
        try:
            item = self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the server did not end the stream within {timeout} s") from None
        assert item is EOF, getattr(item, "lines", item)
        self.ended = True
        return time.monotonic()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self.reader is not None:
            self.reader.join(timeout=5)  # before closing what the reader may still be using
        self.response.close()
        self.conn.close()


def parse_event(lines: list[str]) -> Event:
    fields: dict[str, list[str]] = {}
    for line in lines:
        name, _, value = line.partition(":")
        fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
    data = "\n".join(fields.get("data", []))
    event_id = fields.get("id", [None])[-1]
    return Event(
        event=fields.get("event", ["message"])[-1],
        data=json.loads(data) if data else None,
        id=int(event_id) if event_id is not None else None,
        lines=lines,
        at=time.monotonic(),
    )


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class LiveServer:
    host: str
    port: int
    streams: list[EventStream] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stream(self, path: str, headers: dict[str, str] | None = None) -> EventStream:
        stream = EventStream(self.host, self.port, path, headers)
        self.streams.append(stream)
        return stream

    def request(self, method: str, path: str, *, body: Any = None, headers: dict[str, str] | None = None,
                timeout: float = 10) -> Response:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            all_headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers={**all_headers, **(headers or {})})
            response = conn.getresponse()
            return Response(response.status, response.headers, response.read())
        finally:
            conn.close()


@pytest.fixture(scope="module")
def asgi_server(e2e_database: None) -> Iterator[tuple[str, int]]:
    """`harmont.asgi:application` under uvicorn on a free port, for the module: (host, port).

    One server (and so one event loop, one log hub) serves all the module's tests, as one
    worker process serves all its clients; `live_asgi` gives each test its own client side.
    """
    from harmont.asgi import application

    # Connections opened by the server's threads are closed at the end of each request
    # (Django's request_finished), not kept for CONN_MAX_AGE: otherwise they would
    # outlive the module and PostgreSQL could not drop the test database.
    settings_dict = connections["default"].settings_dict
    max_age = settings_dict.get("CONN_MAX_AGE", 0)
    settings_dict["CONN_MAX_AGE"] = 0

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # As gunicorn sets it on its listening sockets (accepted connections inherit it): without it a
    # keep-alive client waits out Nagle's algorithm against delayed ACKs, ~40 ms a request.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(application, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield "127.0.0.1", sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        # The log hub polled on the loop's executor threads, now gone: their connections
        # are garbage in reference cycles, and collecting them closes them.
        gc.collect()
        settings_dict["CONN_MAX_AGE"] = max_age


def start_gunicorn(env: dict[str, str], log: Path, *, workers: int = 1) -> tuple[subprocess.Popen, int]:
    """gunicorn as production runs it (harmont/gunicorn_conf.py) on a free port, answering /healthz."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:harmont.gunicorn_conf", "harmont.wsgi:application",
             "--bind", f"127.0.0.1:{port}", "--workers", str(workers)],
            cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return process, port
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_gunicorn(process)
                raise RuntimeError(log.read_text()[-3000:]) from None
            time.sleep(0.2)


def stop_gunicorn(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def gunicorn_server(e2e_database: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """harmont/gunicorn_conf.py's server (one worker) on the test database, for the module: (host, port)."""
    from django.conf import settings

    work = tmp_path_factory.mktemp("gunicorn")
    env = {**worker_environment(settings), "HARMONT_MEDIA_ROOT": str(work / "media"),
           "HARMONT_ALLOWED_HOSTS": "127.0.0.1"}
    process, port = start_gunicorn(env, work / "gunicorn.log")
    try:
        yield "127.0.0.1", port
    finally:
        stop_gunicorn(process)
        print((work / "gunicorn.log").read_text()[-5000:])


def serving(address: tuple[str, int]) -> Iterator[LiveServer]:
    """A module's server, for one test; the streams the test opened are closed after it."""
    live = LiveServer(*address)
    try:
        yield live
    finally:
        for stream in live.streams:
            stream.close()


@pytest.fixture
def live_asgi(asgi_server: tuple[str, int], transactional_db: None) -> Iterator[LiveServer]:
    yield from serving(asgi_server)


@pytest.fixture
def live_gunicorn(gunicorn_server: tuple[str, int], transactional_db: None) -> Iterator[LiveServer]:
    yield from serving(gunicorn_server)
