"""The gunicorn worker production runs (`worker_class` of harmont/gunicorn_conf.py): REST on threads,
long waits in an event loop.

A sync WSGI stack on threads is the fastest way to serve the REST API and the
pages (no ASGI bridge on every request), but a thread per live log stream or
per agent waiting for a job doesn't scale to a thousand of them. This worker is
gunicorn's threaded worker (`--threads` of them read and answer requests), with
one event loop on a thread of its own beside them. Two kinds of request are
handed to the loop, socket and all, once read (harmont.handoff):

- a live log stream (`GET /v0/...`): Django's ASGI handler serves it there,
  each open stream a coroutine;
- a claim that asked to wait and found nothing on its first attempt (made on
  the request's thread, like any request): the loop holds it
  (builds.claim_waits.hold_claim) and runs each later attempt on the threads.

Everything else never leaves its thread. An answer with a length (a held
claim's) leaves the connection open, and the worker takes it back among its
kept-alive connections for the client's next request; a stream ends its
connection. A handed-off connection counts among the worker's connections
meanwhile, so a stopping worker
lets it finish within the graceful timeout; SIGTERM also answers the held
claims and ends the streams with a reconnect hint at once (harmont.asgi.drain).
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any
from urllib.parse import unquote

from gunicorn.workers.gthread import TConn, ThreadWorker

from harmont import handoff

STREAM_PREFIX = "/v0/"


class HandOff(Exception):
    """Raised from the WSGI side while a request is answered: finish it in the event loop with `app`."""

    def __init__(self, app: handoff.App, body: bytes = b"") -> None:
        super().__init__("handed off to the event loop")
        self.app = app
        self.body = body


def scope_for(req: Any, conn: Any) -> dict[str, Any]:
    """The ASGI scope of a request gunicorn parsed (`req`) on connection `conn`."""
    raw_path = (req.path or "/").encode("latin-1")
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": f"{req.version[0]}.{req.version[1]}", "method": req.method, "scheme": req.scheme,
        "path": unquote(req.path or "/", encoding="latin-1"), "raw_path": raw_path,
        "query_string": (req.query or "").encode("latin-1"), "root_path": "",
        "headers": [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in req.headers],
        "client": tuple(conn.client[:2]) if isinstance(conn.client, tuple) else None,
        "server": tuple(conn.server[:2]) if isinstance(conn.server, tuple) else None,
    }


class LoopRequests:
    """The WSGI application of the threads, wrapped: the requests that go to the loop are picked here."""

    def __init__(self, app: Callable[..., Any], worker: Worker) -> None:
        self.app = app
        self.worker = worker
        from builds import claim_waits
        from harmont import asgi

        self.claim_waits = claim_waits
        self.asgi_app = asgi.application

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD")
        if method == "GET" and path.startswith(STREAM_PREFIX):
            raise HandOff(self.asgi_app)
        if method == "POST" and path == self.claim_waits.CLAIM_PATH:
            return self.claim(environ, start_response)
        return self.app(environ, start_response)

    def claim(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        claim_waits = self.claim_waits
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= claim_waits.MAX_BODY_BYTES or environ.get("HTTP_TRANSFER_ENCODING"):
            return self.app(environ, start_response)  # not a claim worth holding: as any request
        body = environ["wsgi.input"].read(length) if length else b""
        environ = claim_waits.attempt_environ(environ)
        if environ.get(claim_waits.claim_resumes.RESUME_META):
            raise HandOff(self.hold(environ, body), body)  # the loop may hold it without an attempt
        started = time.monotonic()
        answer = claim_waits.attempt_wsgi(self.app, environ, body)
        if answer.status == 204 and answer.header(claim_waits.HOLD_HEADER) is not None:
            raise HandOff(self.hold(environ, body, answer, started), body)
        headers = [(key.decode("latin-1"), value.decode("latin-1")) for key, value in answer.headers]
        start_response(f"{answer.status} {handoff.reason(answer.status)}", headers)
        return [answer.body]

    def hold(self, environ: dict[str, Any], body: bytes, first: Any = None, started: float | None = None
             ) -> handoff.App:
        """The claim in the loop: held after `first`, the answer of its first attempt (begun at `started`),
        or, without one, resumed or attempted there (claim_waits.resume_or_hold)."""
        worker, claim_waits = self.worker, self.claim_waits

        def header(name: str) -> str | None:
            return environ.get("HTTP_" + name.upper().replace("-", "_"))

        async def held(scope: dict[str, Any], receive: Any, send: Any) -> None:
            loop = asyncio.get_running_loop()

            async def try_claim() -> Any:
                return await loop.run_in_executor(worker.tpool, claim_waits.attempt_wsgi, self.app, environ, body)

            if first is None:
                await claim_waits.resume_or_hold(try_claim, receive, send, header=header, body=body,
                                                 query=environ.get("QUERY_STRING", ""),
                                                 request_id=environ["HTTP_X_REQUEST_ID"])
            else:
                await claim_waits.hold_claim(try_claim, receive, send, first=first, started=started,
                                             session_hash=claim_waits.claim_resumes.session_hash(header))

        return held


class Worker(ThreadWorker):
    """gunicorn's threaded worker with an event loop for the requests that wait (see the module)."""

    loop: asyncio.AbstractEventLoop
    loop_thread: threading.Thread

    def init_process(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop_thread = threading.Thread(target=self._run_loop, name="harmont-event-loop", daemon=True)
        self.loop_thread.start()
        super().init_process()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def load_wsgi(self) -> None:
        if self.cfg.is_ssl:
            # A TLS socket can't be handed to the loop as it is: terminate TLS in front (the proxy).
            raise RuntimeError("harmont.worker.Worker serves plain HTTP; terminate TLS at the load balancer")
        super().load_wsgi()
        self.wsgi = LoopRequests(self.wsgi, self)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.alive:
            from harmont.asgi import drain

            self.loop.call_soon_threadsafe(drain)
        super().handle_exit(sig, frame)

    def handle_request(self, req: Any, conn: Any) -> bool:
        try:
            return super().handle_request(req, conn)
        except HandOff as handed:
            self._hand_off(req, conn, handed)
            return False

    def _hand_off(self, req: Any, conn: Any, handed: HandOff) -> None:
        scope = scope_for(req, conn)
        conn.handed_off = True  # finish_request leaves it to the loop (and its count to _handed_back)
        sock = socket.socket(fileno=conn.sock.detach())
        sock.setblocking(False)
        future = asyncio.run_coroutine_threadsafe(handoff.serve(sock, scope, handed.body, handed.app), self.loop)
        future.add_done_callback(lambda done: self.method_queue.defer(self._handed_back, done, sock, conn))

    def _handed_back(self, future: Any, sock: socket.socket, conn: Any) -> None:
        """A handed-off request was answered (on the worker's main thread, like finish_request): a connection
        left open waits for the client's next request among the kept-alive ones."""
        if future.cancelled() or future.exception() is not None:
            self.log.error("handed-off request failed: %r", None if future.cancelled() else future.exception())
            sock.close()
        elif future.result() and self.alive:
            kept = TConn(self.cfg, sock, conn.client, conn.server)  # a new parser for the next request
            kept.set_timeout()
            self.keepalived_conns.append(kept)
            self.poller.register(kept.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, kept))
            return  # still one of the worker's connections
        elif future.result():
            sock.close()  # stopping: no next request here
        self.nr_conns -= 1

    def finish_request(self, conn: Any, fs: Any) -> None:
        if getattr(conn, "handed_off", False):
            return
        super().finish_request(conn, fs)
