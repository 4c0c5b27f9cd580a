"""`builds.outbound.post` against a real local HTTP server: answers, redirects, silence, refusals."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from builds import outbound


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.seen.append((self.path, dict(self.headers), body))  # type: ignore[attr-defined]
        if self.path == "/slow":
            time.sleep(1.5)
        code = {"/fail": 500, "/moved": 302}.get(self.path, 204 if self.path == "/empty" else 200)
        answer = b"x" * 5000 if self.path == "/fail" else b'{"ok": true}'
        self.send_response(code)
        if code == 302:
            self.send_header("Location", "/elsewhere")
        if code != 204:
            self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        if code != 204:
            self.wfile.write(answer)


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url(server: ThreadingHTTPServer, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def test_a_2xx_answer_is_ok_and_the_body_and_headers_arrive(server):
    answer = outbound.post(url(server, "/in?x=1"), headers={"webhook-id": "msg_1"}, body=b'{"a":1}', timeout=5)

    assert (answer.ok, answer.status_code, answer.excerpt, answer.error) == (True, 200, '{"ok": true}', "")
    path, headers, body = server.seen[0]
    assert (path, headers["webhook-id"], body) == ("/in?x=1", "msg_1", b'{"a":1}')
    assert outbound.post(url(server, "/empty"), headers={}, body=b"{}", timeout=5).ok


def test_an_error_answer_keeps_an_excerpt(server):
    answer = outbound.post(url(server, "/fail"), headers={}, body=b"{}", timeout=5)

    assert (answer.ok, answer.status_code, len(answer.excerpt)) == (False, 500, outbound.EXCERPT_CHARS)


def test_a_redirect_is_not_followed(server):
    answer = outbound.post(url(server, "/moved"), headers={}, body=b"{}", timeout=5)

    assert (answer.ok, answer.status_code) == (False, 302)
    assert [path for path, _, _ in server.seen] == ["/moved"]


def test_silence_past_the_timeout_is_a_failed_attempt(server):
    answer = outbound.post(url(server, "/slow"), headers={}, body=b"{}", timeout=0.3)

    assert (answer.ok, answer.status_code) == (False, None)
    assert answer.error == "no answer within 0.3 s" and answer.duration_ms < 1400


def test_a_refused_connection_and_a_bad_url_are_failed_attempts():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    refused = outbound.post(f"http://127.0.0.1:{port}/", headers={}, body=b"{}", timeout=2)
    assert (refused.ok, refused.status_code) == (False, None) and "ConnectionRefused" in refused.error

    assert outbound.post("ftp://example.test/", headers={}, body=b"", timeout=2).error.startswith("not an http(s)")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "169.254.169.254", "[::1]"])
def test_public_only_refuses_what_only_the_server_can_reach(host):
    answer = outbound.post(f"http://{host}:9/in", headers={}, body=b"{}", timeout=2, public_only=True)

    assert (answer.ok, answer.status_code) == (False, None)
    assert answer.error.startswith("refused: ") and "not public" in answer.error


def test_public_only_connects_to_the_address_it_checked(server, monkeypatch):
    checked = []
    monkeypatch.setattr(outbound, "_public_address", lambda host, port: checked.append(host) or "127.0.0.1")
    port = server.server_address[1]

    answer = outbound.post(f"http://receiver.example.test:{port}/in", headers={}, body=b"{}", timeout=5,
                           public_only=True)

    assert answer.ok and checked == ["receiver.example.test"]
    assert server.seen[0][1]["Host"] == f"receiver.example.test:{port}"
