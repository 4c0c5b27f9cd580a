"""End to end: gunicorn as production runs it (harmont/gunicorn_conf.py, harmont.worker) drains on SIGTERM.

A held claim is answered (204, saying it was held) and an open log stream ends with a
`retry:` hint at once, and gunicorn exits well within its drain time. Before that,
`/metrics` (from whichever of its two workers answers) counts the claim and the
stream, wherever they are held: the workers' gauges add up.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builds.models import JobState
from harmont.logtokens import mint_log_token
from tests.e2e import worker_environment
from tests.live import start_gunicorn, stop_gunicorn
from tests.helpers import make_build, register, two_step_ir

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

DRAIN_SECONDS = 20
METRICS_TOKEN = "drain-test-metrics"


@pytest.fixture
def gunicorn(e2e_database: None, transactional_db: None, e2e_settings: Any, tmp_path: Path) -> Iterator[Any]:
    env = {**worker_environment(e2e_settings), "HARMONT_DRAIN_SECONDS": str(DRAIN_SECONDS),
           "HARMONT_METRICS_DIR": str(tmp_path / "metrics"), "HARMONT_METRICS_TOKEN": METRICS_TOKEN,
           "HARMONT_ALLOWED_HOSTS": "127.0.0.1"}
    log = tmp_path / "gunicorn.log"
    process, port = start_gunicorn(env, log, workers=2)
    process.port = port  # type: ignore[attr-defined]
    try:
        yield process
    finally:
        stop_gunicorn(process)
        print(log.read_text()[-5000:])


def held_claim(port: int, token: str, answers: list) -> threading.Thread:
    def run() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/api/v0/agent/claim", body=json.dumps({"wait": 30}),
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        response = conn.getresponse()
        answers.append((response.status, response.getheader("Harmont-Claim-Wait"), time.monotonic()))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_sigterm_answers_held_claims_ends_streams_with_a_retry_hint_and_exits(gunicorn, agent_token, pipeline):
    port = gunicorn.port
    session = register(agent_token.raw).json()["session_token"]
    build = make_build(pipeline, pipeline_ir=two_step_ir())
    # Job `a` is taken (so the held claim below finds nothing) and running; its log is watched.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/api/v0/agent/claim", body="{}",
                 headers={"Authorization": f"Bearer {session}", "Content-Type": "application/json"})
    claimed = json.loads(conn.getresponse().read())
    job_id, job_token = claimed["job"]["id"], claimed["job_token"]
    conn.request("POST", f"/api/v0/agent/jobs/{job_id}/start", body="{}",
                 headers={"Authorization": f"Bearer {job_token}", "Content-Type": "application/json"})
    assert conn.getresponse().read() and build.jobs.get(pk=job_id).state == JobState.RUNNING
    stream = socket.create_connection(("127.0.0.1", port), timeout=30)
    log_token = mint_log_token(build_id=build.pk).token
    stream.sendall(f"GET /v0/jobs/{job_id}/logs?token={log_token} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   "Accept: text/event-stream\r\n\r\n".encode())
    assert b"200" in stream.recv(1024).split(b"\r\n", 1)[0]
    answers: list = []
    claim = held_claim(port, session, answers)
    time.sleep(1.0)
    assert answers == []  # held

    metrics = urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={
        "Authorization": f"Bearer {METRICS_TOKEN}"}), timeout=10).read().decode()
    assert "harmont_claims_held 1.0" in metrics
    assert "harmont_log_streams_open 1.0" in metrics

    stopped_at = time.monotonic()
    os.killpg(gunicorn.pid, signal.SIGTERM)

    claim.join(10)
    assert answers and answers[0][0] == 204 and answers[0][1] is not None
    assert answers[0][2] - stopped_at < 5
    rest = b""
    while True:
        data = stream.recv(65536)
        if not data:
            break
        rest += data
    assert b"retry: 1000" in rest and b"event: done" not in rest
    assert time.monotonic() - stopped_at < 10
    assert gunicorn.wait(timeout=DRAIN_SECONDS) == 0
    assert time.monotonic() - stopped_at < DRAIN_SECONDS / 2
