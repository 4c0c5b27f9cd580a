"""One HTTP POST to a receiver outside the server (GitHub's API, a webhook endpoint), and what came back.

Plain http.client, not urllib: a redirect is an answer like any other non-2xx
(a receiver that moved must be registered again; following it would send a
signed body or a token somewhere nobody registered), and nothing reads a
proxy or credentials from the environment.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

# What is kept of a receiver's answer: enough to see why it refused.
EXCERPT_CHARS = 1000
_READ_BYTES = 64 * 1024


@dataclass(frozen=True)
class Answer:
    status_code: int | None  # None: no HTTP answer at all (`error` says why)
    excerpt: str
    error: str
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def post(url: str, *, headers: dict[str, str], body: bytes, timeout: float, public_only: bool = False) -> Answer:
    """POST `body` to `url`; never raises for what the network or the receiver does.

    `timeout` bounds the connect and each read; the whole attempt is also cut
    off once it has taken that long (a receiver trickling its answer).
    `public_only`: refuse a host that resolves to any address that is not a
    public one (loopback, private networks, link-local such as a cloud's
    metadata service), and connect to the address that was checked, so a
    second DNS answer can't point the request elsewhere.
    """
    started = time.monotonic()

    def answer(status: int | None, excerpt: str = "", error: str = "") -> Answer:
        return Answer(status, excerpt[:EXCERPT_CHARS], error[:500], int((time.monotonic() - started) * 1000))

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return answer(None, error=f"not an http(s) URL: {url[:200]}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                                 context=ssl.create_default_context())
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    if public_only:
        try:
            address = _public_address(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        except OSError as exc:
            return answer(None, error=f"{type(exc).__name__}: {exc}")
        if address is None:
            return answer(None, error=f"refused: {parts.hostname} resolves to an address that is not public "
                                      "(HARMONT_WEBHOOK_ALLOW_PRIVATE_ADDRESSES allows it)")
        # http.client opens its socket through this attribute; TLS still checks the host name.
        connection._create_connection = (  # type: ignore[attr-defined]
            lambda where, *args: socket.create_connection((address, where[1]), *args))
    try:
        connection.request("POST", target, body=body, headers={**headers, "Content-Length": str(len(body))})
        response = connection.getresponse()
        data = b""
        while len(data) < _READ_BYTES and time.monotonic() - started < timeout:
            piece = response.read1(_READ_BYTES - len(data))
            if not piece:
                break
            data += piece
        return answer(response.status, data.decode("utf-8", "replace"))
    except (socket.timeout, TimeoutError):
        return answer(None, error=f"no answer within {timeout:g} s")
    except (OSError, http.client.HTTPException) as exc:
        return answer(None, error=f"{type(exc).__name__}: {exc}")
    finally:
        connection.close()


def _public_address(host: str, port: int) -> str | None:
    """The first address `host` resolves to, or None when any of them is not a public one."""
    addresses = [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_global for a in addresses):
        return None
    return addresses[0]
