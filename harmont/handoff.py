"""One HTTP exchange finished in an event loop: the request was read elsewhere, the answer goes out from here.

harmont.worker reads every request on a thread, as a sync gunicorn worker
does; a request that would hold its thread for long (a live log stream, a
claim that waits for a job) is handed to the worker's event loop with its
socket. `serve` runs an ASGI application for that one request over the socket:
the body it was given is the request's, a client that closes the connection is
an `http.disconnect`, and the answer is framed here (a Content-Length it set,
else chunked). Writes wait while the client is slow to read, so a viewer who
stops reading doesn't make the server buffer its stream.

The socket is used directly (non-blocking sends, and a reader that only peeks
for the client's end), never read past the request: so an answer with a length
(a held claim's) can leave the connection open, and `serve` says so, for the
worker to take it back and read the client's next request as usual. A stream
(chunked) ends the connection.
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


class Exchange:
    """The connection of one handed-off request, as the receive and send callables of ASGI."""

    def __init__(self, sock: socket.socket, body: bytes, http_version: str, *, keep_alive: bool) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.body = body
        self.http_version = http_version
        self.keep_alive = keep_alive  # the client allows it (HTTP/1.1, no `Connection: close`)
        self.gone = asyncio.Event()  # the client closed its end (or the connection broke)
        self.body_given = False
        self.started = False  # the status line went out
        self.finished = False  # the whole answer went out
        self.chunked = False
        self.head: bytes | None = None  # waits for the first body message, to go out in one write
        self.watching = False

    # ------------------------------------------------------------------ the client's end

    def watch(self) -> None:
        """Notice the client closing its end, without reading what it may send next."""
        self.watching = True
        self.loop.add_reader(self.sock.fileno(), self._readable)

    def unwatch(self) -> None:
        if self.watching:
            self.watching = False
            self.loop.remove_reader(self.sock.fileno())

    def _readable(self) -> None:
        try:
            peeked = self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            peeked = b""
        self.unwatch()  # either way, nothing more to learn here
        if not peeked:
            self.gone.set()
        else:
            self.keep_alive = False  # it sent more before the answer: don't read on after it

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
            await self._write_body(message.get("body", b""), more=message.get("more_body", False))

    def _start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self.head is not None or self.started:
            raise RuntimeError("response started twice")
        names = {name.lower() for name, _ in headers}
        sized = b"content-length" in names or status in (204, 304)
        # HTTP/1.0 knows no chunks: there the end of the connection ends the body.
        self.chunked = not sized and self.http_version != "1.0"
        self.keep_alive = self.keep_alive and sized
        lines = [status_line(status, self.http_version)]
        lines += [name + b": " + value + b"\r\n" for name, value in headers
                  if name.lower() not in (b"connection", b"transfer-encoding")]
        if self.chunked:
            lines.append(b"transfer-encoding: chunked\r\n")
        lines.append(b"\r\n" if self.keep_alive else b"connection: close\r\n\r\n")
        self.head = b"".join(lines)

    async def _write_body(self, data: bytes, *, more: bool) -> None:
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
            try:
                await self.loop.sock_sendall(self.sock, b"".join(out))
            except OSError:
                self.gone.set()
                return
        if not more:
            self.finished = True

    async def fail(self) -> None:
        """The app raised: a 500 if nothing went out yet, else the connection just ends (a cut body)."""
        self.keep_alive = False
        if not self.started and not self.gone.is_set():
            self.head = None
            self._start(500, [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21")])
            await self._write_body(b"Internal Server Error", more=False)


async def serve(sock: socket.socket, scope: dict[str, Any], body: bytes, app: App) -> bool:
    """Answer the request of `scope` (already read from `sock`) with `app`.

    True: the answer went out whole and the connection may carry the client's next request
    (the caller takes `sock` back); False: `sock` is closed.
    """
    headers = dict(scope.get("headers", []))
    http_version = scope.get("http_version", "1.1")
    exchange = Exchange(sock, body, http_version, keep_alive=http_version == "1.1" and b"close" not in (
        headers.get(b"connection", b"").lower()))
    exchange.watch()
    try:
        await app(scope, exchange.receive, exchange.send)
    except Exception:  # noqa: BLE001 - one request's failure must not reach the loop
        log.exception("error answering %s %s", scope.get("method"), scope.get("path"))
        await exchange.fail()
    finally:
        exchange.unwatch()
    if exchange.finished and exchange.keep_alive and not exchange.gone.is_set():
        return True
    sock.close()
    return False
