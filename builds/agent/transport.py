"""The agent's HTTP client: JSON over keep-alive connections, retried with backoff."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import random
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("harmont.agent")

VERSION = "1.0"


class AgentError(Exception):
    """The server refused a request in a way retrying will not fix."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class Unauthorized(AgentError):
    """The agent token was revoked (or the job credential is no longer valid)."""


# The longest wait between two tries: after an outage (the server restarting, its database away)
# the agent gets through at most this long after the server answers again.
MAX_BACKOFF_SECONDS = 5.0


class Transport:
    """Small JSON-over-HTTP client: one keep-alive connection per thread, retries with capped backoff.

    After any failed try (a 5xx answer, a reset, a timeout) the connection is dropped and the next
    try opens a new one: the server closes idle connections after a few seconds, so one kept
    through a backoff sleep is usually dead by the time it is used again.
    """

    def __init__(self, server: str, *, timeout: float = 30.0, max_backoff: float = MAX_BACKOFF_SECONDS) -> None:
        parts = urllib.parse.urlsplit(server.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"server must be an http(s) URL, got {server!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        self.base_path = parts.path
        self.timeout = timeout
        self.max_backoff = max_backoff
        self._local = threading.local()
        self.stop_retrying = threading.Event()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            conn = cls(self.host, self.port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def request(self, method: str, path: str, *, token: str, body: Any = None, raw: bytes | Any = None,
                content_type: str = "application/json", retry: bool = True, headers: dict[str, str] | None = None,
                attempts: int | None = None) -> tuple[int, bytes]:
        """Send until the server gives a non-5xx answer (or retrying is stopped); returns (status, body).

        `raw` may be a file-like object (sent as it is read, from the start on every
        attempt; give its Content-Length in `headers`). `attempts` bounds the tries:
        the last one's 5xx answer is returned, its network error raised.
        """
        payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Authorization": f"Bearer {token}", "User-Agent": f"harmont-agent/{VERSION}", **(headers or {})}
        if payload is not None:
            headers["Content-Type"] = content_type
        delay = 0.5
        attempt = 0
        while True:
            attempt += 1
            last = not retry or (attempts is not None and attempt >= attempts)
            try:
                if hasattr(payload, "seek"):
                    payload.seek(0)
                conn = self._connection()
                conn.request(method, self.base_path + path, body=payload, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self._local.headers = response.headers
                if response.status < 500 or last:
                    if response.will_close or response.status >= 500:
                        self._drop_connection()
                    return response.status, data
                self._drop_connection()
                log.warning("%s %s: server error %s; retrying in %.1fs", method, path, response.status, delay)
            except (OSError, http.client.HTTPException) as exc:
                self._drop_connection()
                if last:
                    raise
                log.warning("%s %s: %s; retrying in %.1fs", method, path, exc, delay)
            if self.stop_retrying.is_set():
                raise AgentError(0, "gave up: agent is stopping")
            # Jittered so a fleet coming back does not retry in step; never past the cap.
            time.sleep(min(delay + random.uniform(0, delay / 2), self.max_backoff))
            delay = min(delay * 2, self.max_backoff)

    def last_header(self, name: str) -> str | None:
        """A header of the last answer `request` got on this thread (it returns only status and body)."""
        headers = getattr(self._local, "headers", None)
        return None if headers is None else headers.get(name)

    def json(self, method: str, path: str, *, token: str, body: Any = None, ok: tuple[int, ...] = (200,)) -> Any:
        status, data = self.request(method, path, token=token, body=body)
        parsed = json.loads(data) if data else None
        if status == 401:
            raise Unauthorized(status, parsed)
        if status not in ok:
            raise AgentError(status, parsed)
        return parsed

    def download(self, path: str, *, token: str) -> bytes:
        status, data = self.request("GET", path, token=token)
        if status == 401:
            raise Unauthorized(status, data[:200])
        if status != 200:
            raise AgentError(status, data[:200])
        return data

    @contextlib.contextmanager
    def stream(self, method: str, path: str, *, token: str) -> Iterator[http.client.HTTPResponse]:
        """One request whose 200 answer the caller reads as it arrives (a large download), on a connection of
        its own, closed at the end; tried once, since only the caller knows how to start over.

        Any other answer raises AgentError (Unauthorized for 401) with its first bytes.
        """
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, self.base_path + path, headers={
                "Authorization": f"Bearer {token}", "User-Agent": f"harmont-agent/{VERSION}"})
            response = conn.getresponse()
            if response.status != 200:
                body = response.read(2000)
                raise (Unauthorized if response.status == 401 else AgentError)(response.status, body[:200])
            yield response
        finally:
            conn.close()
