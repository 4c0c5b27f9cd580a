"""End to end: harmont.worker, what production serves (gunicorn with harmont/gunicorn_conf.py).

REST requests are answered on the worker's threads (keep-alive included); live log
streams and held claims are handed to its event loop with their sockets and hold
no thread: a worker with 8 threads keeps 30 of them open and still answers the
API at once. A stream handed off is framed as HTTP/1.1 chunks (close-delimited
for an HTTP/1.0 client) and ends cleanly after `done`; a viewer who leaves is
forgotten. (Held claims through this worker: tests/test_claim_waits_e2e.py;
its drain on SIGTERM: tests/test_drain_e2e.py.)
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import Any

import pytest

from builds import services
from builds.models import Job, JobState
from organizations import services as org_services
from tests.helpers import builds_url, make_build, register, two_step_ir
from tests.live import LiveServer
from tests.test_log_stream import chunk, history_of, logs_path, start_jobs, token_for, until_done, watch, write

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

THREADS = 8  # harmont/gunicorn_conf.py's default (HARMONT_THREADS)


@pytest.fixture
def live(live_gunicorn: LiveServer, e2e_settings: Any) -> LiveServer:
    return live_gunicorn


@pytest.fixture
def running(build) -> tuple[Job, str]:
    return start_jobs(build)["a"]


def test_a_live_log_stream_goes_out_from_the_event_loop_and_ends_after_done(live, build, running):
    job, _ = running
    write(job, [1, 2])
    events = watch(live, job)
    assert events.headers["Content-Type"].startswith("text/event-stream")
    assert events.headers["Transfer-Encoding"] == "chunked" and events.headers["Connection"] == "close"
    assert history_of(events) == [chunk(job, 1), chunk(job, 2)]

    write(job, [3, 4, 5])
    assert [event.data for event in events.chunks(3)] == [chunk(job, 3), chunk(job, 4), chunk(job, 5)]
    services.report_finish(job=job, exit_code=0)
    assert until_done(events) == []  # and then the response ended


def test_an_http_1_0_viewer_gets_the_stream_delimited_by_the_end_of_the_connection(live, build, running):
    job, _ = running
    write(job, [1])
    with socket.create_connection((live.host, live.port), timeout=10) as sock:
        sock.sendall(f"GET {logs_path(job, token_for(job.build))} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        received = b""
        while b"event: history" not in received:
            received += sock.recv(65536)
        services.report_finish(job=job, exit_code=0)
        while data := sock.recv(65536):
            received += data
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 ") and b"transfer-encoding" not in head.lower()
    assert body.startswith(b"id: 1\nevent: history\n") and body.rstrip().endswith(b"event: done\ndata: {}")


def test_streams_and_held_claims_hold_no_thread(live, build, running, agent_token, api, pipeline):
    job, _ = running
    streams = [watch(live, job) for _ in range(15)]
    for events in streams:
        assert history_of(events) == []
    sessions = [register(agent_token.raw).json()["session_token"] for _ in range(15)]
    answers: list[tuple[int, dict[str, Any]]] = []

    def hold(token: str) -> None:
        conn = http.client.HTTPConnection(live.host, live.port, timeout=60)
        conn.request("POST", "/api/v0/agent/claim", body=json.dumps({"wait": 20}),
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        response = conn.getresponse()
        answers.append((response.status, json.loads(response.read() or b"{}")))

    claims = [threading.Thread(target=hold, args=(token,), daemon=True) for token in sessions]
    for thread in claims:
        thread.start()
    time.sleep(1.5)
    assert answers == []  # all 15 held, beside 15 open streams: 30 requests on 8 threads

    started = time.monotonic()
    response = live.request("GET", builds_url(pipeline, "/1"), headers={"Authorization": f"Bearer {api.raw_token}"})
    assert response.status == 200 and response.json()["number"] == 1
    assert time.monotonic() - started < 2

    # A job scheduled now goes to one of the held claims, and the streams still get what is written.
    second = make_build(pipeline, pipeline_ir=two_step_ir())
    deadline = time.monotonic() + 10
    while not answers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert answers and answers[0][0] == 200 and answers[0][1]["job"]["id"] == str(
        Job.objects.get(build=second, step_key="a").pk)
    write(job, [1])
    assert all(events.chunks(1)[0].data == chunk(job, 1) for events in streams)

    # Revoking the token ends the other 14 at once.
    org_services.revoke_agent_token(token=agent_token.token)
    for thread in claims:
        thread.join(10)
    assert sorted(status for status, _ in answers) == [200] + [401] * 14


def test_rest_requests_keep_their_connection_alive(live, api, pipeline, build):
    conn = http.client.HTTPConnection(live.host, live.port, timeout=10)
    conn.request("GET", builds_url(pipeline, "/1"), headers={"Authorization": f"Bearer {api.raw_token}"})
    first = conn.getresponse()
    assert first.status == 200 and json.loads(first.read())["number"] == 1
    sock = conn.sock
    conn.request("GET", builds_url(pipeline), headers={"Authorization": f"Bearer {api.raw_token}"})
    second = conn.getresponse()
    assert second.status == 200 and [b["number"] for b in json.loads(second.read())["data"]] == [1]
    assert conn.sock is sock  # the same connection
    conn.close()


def test_a_viewer_who_leaves_is_forgotten_and_the_next_one_is_served(live, build, running):
    job, _ = running
    write(job, [1])
    first = watch(live, job)
    assert history_of(first) == [chunk(job, 1)]
    first.close()
    write(job, [2])
    second = watch(live, job)
    assert history_of(second) == [chunk(job, 1), chunk(job, 2)]
    services.report_finish(job=job, exit_code=0)
    assert until_done(second) == []


def test_a_held_claim_leaves_its_connection_open_for_the_next_request(live, agent_token, pipeline):
    token = register(agent_token.raw).json()["session_token"]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection(live.host, live.port, timeout=10)
    conn.request("POST", "/api/v0/agent/claim", body=json.dumps({"wait": 1}), headers=headers)
    held = conn.getresponse()
    assert held.status == 204 and float(held.getheader("Harmont-Claim-Wait")) >= 1
    assert held.getheader("Connection") is None and held.read() == b""
    sock = conn.sock
    make_build(pipeline, pipeline_ir=two_step_ir())
    conn.request("POST", "/api/v0/agent/claim", body=json.dumps({"wait": 5}), headers=headers)
    claimed = conn.getresponse()
    assert claimed.status == 200 and json.loads(claimed.read())["job"]["step_key"] == "a"
    assert conn.sock is sock  # the same connection, taken back by the worker after the held answer
    conn.request("GET", "/api/v0/ping")
    assert conn.getresponse().status == 200 and conn.sock is sock
    conn.close()


def test_a_claim_without_wait_is_answered_on_its_thread_at_once(live, agent_token: org_services.IssuedAgentToken,
                                                               pipeline):
    token = register(agent_token.raw).json()["session_token"]
    headers = {"Authorization": f"Bearer {token}"}
    started = time.monotonic()
    empty = live.request("POST", "/api/v0/agent/claim", body={}, headers=headers)
    assert empty.status == 204 and "Harmont-Claim-Wait" not in empty.headers
    assert time.monotonic() - started < 2
    make_build(pipeline, pipeline_ir=two_step_ir())
    claimed = live.request("POST", "/api/v0/agent/claim", body={"wait": 5}, headers=headers)
    assert claimed.status == 200 and claimed.json()["job"]["step_key"] == "a"
    assert Job.objects.get(pk=claimed.json()["job"]["id"]).state == JobState.ASSIGNED
