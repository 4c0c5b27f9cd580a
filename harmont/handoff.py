"""One HTTP exchange finished in an event loop: the request was read elsewhere, the answer goes out from here.

harmont.worker reads every request on a thread, as a sync gunicorn worker
does; a request that would hold its thread for long (a live log stream, a
claim that waits for a job) is handed to the worker's event loop with its
socket. `serve` runs an ASGI application for that one request over the socket:
the body it was given is the request's, a client that closes the connection is
an `http.disconnect`, and the answer is framed here (a Content-Length it set,
else chunked) and closes the connection, so nothing more is read from it.
Writes wait while the client is slow to read (the transport's flow control),
so a viewer who stops reading doesn't make the server buffer its stream.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

log = logging.getLogger("harmont.handoff")

Message = dict[str, Any]
App = Callable[[dict[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
               Awaitable[None]]


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def status_line(status: int, http_version: str) -> bytes:
    return f"HTTP/{http_version} {status} {reason(status)}\r\n".encode("latin-1")


class Exchange(asyncio.Protocol):
    """The connection of one handed-off request, as the receive and send callables of ASGI."""

    def __init__(self, body: bytes, http_version: str) -> None:
        self.body = body
        self.http_version = http_version
        self.transport: asyncio.Transport | None = None
        self.gone = asyncio.Event()  # the client closed its end (or the connection broke)
        self.writable = asyncio.Event()
        self.writable.set()
        self.body_given = False
        self.started = False  # the status line went out
        self.finished = False
        self.chunked = False
        self.head: bytes | None = None  # waits for the first body message, to go out in one write

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        """Whatever the client sends after its request is not read: the answer ends the connection."""

    def eof_received(self) -> bool:
        self.gone.set()
        return False  # close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone.set()
        self.writable.set()  # a writer waiting for room learns the client is gone

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # ------------------------------------------------------------------ ASGI

    async def receive(self) -> Message:
        if not self.body_given:
            self.body_given = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.finished or self.gone.is_set():
            return  # the client left: what the app still says goes nowhere
        kind = message["type"]
        if kind == "http.response.start":
            self._start(message["status"], message.get("headers", []))
        elif kind == "http.response.body":
            if self.head is None and not self.started:
                raise RuntimeError("response body before response start")
            self._write_body(message.get("body", b""), more=message.get("more_body", False))
            if not self.writable.is_set():
                await self.writable.wait()

    def _start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self.head is not None or self.started:
            raise RuntimeError("response started twice")
        names = {name.lower() for name, _ in headers}
        # HTTP/1.0 knows no chunks: there the end of the connection ends the body.
        self.chunked = b"content-length" not in names and self.http_version != "1.0"
        lines = [status_line(status, self.http_version)]
        lines += [name + b": " + value + b"\r\n" for name, value in headers
                  if name.lower() not in (b"connection", b"transfer-encoding")]
        if self.chunked:
            lines.append(b"transfer-encoding: chunked\r\n")
        lines.append(b"connection: close\r\n\r\n")
        self.head = b"".join(lines)

    def _write_body(self, data: bytes, *, more: bool) -> None:
        assert self.transport is not None
        out = [self.head] if self.head is not None else []
        self.head, self.started = None, True
        if self.chunked:
            if data:
                out += [f"{len(data):x}\r\n".encode(), data, b"\r\n"]
            if not more:
                out.append(b"0\r\n\r\n")
        elif data:
            out.append(data)
        if out:
            self.transport.write(b"".join(out))
        if not more:
            self.close()

    def close(self) -> None:
        self.finished = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def fail(self) -> None:
        """The app raised: a 500 if nothing went out yet, else the connection just ends (a cut body)."""
        if not self.started and not self.gone.is_set() and self.transport is not None:
            self.head = None
            self._start(500, [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21")])
            self._write_body(b"Internal Server Error", more=False)
        self.close()


async def serve(sock: socket.socket, scope: dict[str, Any], body: bytes, app: App) -> None:
    """Answer the request of `scope` (already read from `sock`) with `app`, then close `sock`."""
    loop = asyncio.get_running_loop()
    exchange = Exchange(body, scope.get("http_version", "1.1"))
    try:
        await loop.connect_accepted_socket(lambda: exchange, sock)
    except OSError:
        sock.close()
        return
    try:
        await app(scope, exchange.receive, exchange.send)
    except Exception:  # noqa: BLE001 - one request's failure must not reach the loop
        log.exception("error answering %s %s", scope.get("method"), scope.get("path"))
        exchange.fail()
    finally:
        exchange.close()
