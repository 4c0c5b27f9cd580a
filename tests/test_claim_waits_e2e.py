"""End to end: claims held until a job comes, by both servers that hold them.

Each test runs against what production serves (gunicorn with harmont.worker, in
a process of its own) and against harmont.asgi under uvicorn.

Raw HTTP clients hold claims and see them answered by a job scheduled later, by
their wait running out, by the agent's token being revoked or the agent
disconnected; a client that leaves takes no job with it. Real agents long-poll by
default: one with a 30 s poll interval still starts a new job at once, and stops
at once when told to while its claim is held. On PostgreSQL the server hears of
jobs through LISTEN/NOTIFY, on SQLite through its poll; the module runs on both.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from builds import claim_resumes
from builds.models import Agent, Job, JobState
from harmont.tokens import hash_secret
from organizations import services as org_services
from organizations.models import AgentToken
from pipelines.models import Pipeline
from tests.e2e import Agents, database_quiet, finished, job_log, jobs_by_key, wait_for
from tests.helpers import is_postgres, make_build, register, two_step_ir

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# Far below every wait asked here: an answer this soon was woken, not timed out.
PROMPT_SECONDS = 5.0
RESUME = "Harmont-Claim-Resume"


@pytest.fixture(params=["worker", "asgi"])
def server(request: pytest.FixtureRequest, e2e_settings: Any) -> tuple[str, int]:
    return request.getfixturevalue("gunicorn_server" if request.param == "worker" else "asgi_server")


@pytest.fixture
def agent_session(agent_token: org_services.IssuedAgentToken) -> dict[str, str]:
    body = register(agent_token.raw).json()
    return {"token": body["session_token"], "agent_id": body["agent"]["id"]}


class HeldClaim(threading.Thread):
    """`POST /api/v0/agent/claim` with `wait`, on a thread: `.status`, `.headers`, `.body`, `.elapsed`."""

    def __init__(self, server: tuple[str, int], token: str, *, wait: float, query: bool = False,
                 resume: str | None = None) -> None:
        super().__init__(daemon=True)
        self.server, self.token, self.wait, self.query, self.resume = server, token, wait, query, resume
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = b""
        self.elapsed = 0.0
        self.start()
        time.sleep(0.3)  # the first attempt has found nothing and the claim is held

    def run(self) -> None:
        conn = http.client.HTTPConnection(*self.server, timeout=60)
        started = time.monotonic()
        path = f"/api/v0/agent/claim?wait={self.wait}" if self.query else "/api/v0/agent/claim"
        body = None if self.query else json.dumps({"wait": self.wait, "claim_key": "held-claim-key-1"})
        conn.request("POST", path, body=body, headers={"Authorization": f"Bearer {self.token}",
                                                       "Content-Type": "application/json", "X-Request-Id": "held-1",
                                                       **({RESUME: self.resume} if self.resume else {})})
        response = conn.getresponse()
        self.body = response.read()
        self.elapsed = time.monotonic() - started
        self.status, self.headers = response.status, {k.lower(): v for k, v in response.getheaders()}
        conn.close()

    def answer(self, timeout: float = 40) -> HeldClaim:
        self.join(timeout)
        assert not self.is_alive(), "the held claim was never answered"
        return self


def test_a_held_claim_is_answered_with_a_job_scheduled_while_it_waits(server, agent_session, pipeline):
    held = HeldClaim(server, agent_session["token"], wait=25)
    assert held.is_alive()

    build = make_build(pipeline, pipeline_ir=two_step_ir())

    held.answer()
    assert held.status == 200, held.body[:300]
    assert held.elapsed < PROMPT_SECONDS
    job = json.loads(held.body)["job"]
    assert (job["build_id"], job["step_key"]) == (str(build.pk), "a")
    assert 0 < float(held.headers["harmont-claim-wait"]) < PROMPT_SECONDS
    assert held.headers["x-request-id"] == "held-1"
    assert "x-harmont-claim-hold" not in held.headers
    assert Job.objects.get(pk=job["id"]).state == JobState.ASSIGNED


def test_a_held_claim_of_another_queue_is_not_woken_by_the_job(server, agent_token, pipeline):
    arm = register(agent_token.raw, tags={"queue": "arm64"}).json()["session_token"]
    default = register(agent_token.raw).json()["session_token"]
    other = HeldClaim(server, arm, wait=3)
    held = HeldClaim(server, default, wait=25)

    make_build(pipeline, pipeline_ir=two_step_ir())

    assert held.answer().status == 200 and held.elapsed < PROMPT_SECONDS
    assert other.answer().status == 204 and other.elapsed >= 3


def test_a_held_claim_whose_wait_runs_out_is_204_saying_how_long_it_was_held(server, agent_session, pipeline):
    held = HeldClaim(server, agent_session["token"], wait=1.5, query=True).answer()

    assert held.status == 204
    assert 1.5 <= held.elapsed < PROMPT_SECONDS
    assert 1.5 <= float(held.headers["harmont-claim-wait"]) < PROMPT_SECONDS


def test_revoking_the_agent_token_ends_a_held_claim_with_401(server, agent_session, agent_token, pipeline):
    held = HeldClaim(server, agent_session["token"], wait=25)

    org_services.revoke_agent_token(token=agent_token.token)

    assert held.answer().status == 401 and held.elapsed < PROMPT_SECONDS
    assert json.loads(held.body)["error"]["code"] == "unauthorized"


def test_disconnecting_the_agent_ends_its_held_claim_with_401(server, agent_session, pipeline):
    held = HeldClaim(server, agent_session["token"], wait=25)
    conn = http.client.HTTPConnection(*server, timeout=10)
    conn.request("POST", "/api/v0/agent/disconnect", body="{}",
                 headers={"Authorization": f"Bearer {agent_session['token']}", "Content-Type": "application/json"})
    assert conn.getresponse().status == 204

    assert held.answer().status == 401 and held.elapsed < PROMPT_SECONDS


def test_a_client_that_leaves_a_held_claim_takes_no_job(server, agent_session, pipeline):
    sock = socket.create_connection(server, timeout=10)
    body = json.dumps({"wait": 25}).encode()
    sock.sendall(b"POST /api/v0/agent/claim HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {agent_session['token']}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                 + body)
    time.sleep(0.3)
    sock.close()
    time.sleep(0.3)

    build = make_build(pipeline, pipeline_ir=two_step_ir())
    time.sleep(1.0)  # more than the server needs to hear of the job and wake whom it holds

    assert Job.objects.get(build=build, step_key="a").state == JobState.SCHEDULED
    # And the next claim takes it, at once.
    assert HeldClaim(server, agent_session["token"], wait=25).answer().status == 200


# ------------------------------------------------------------------ resumed claims (builds.claim_resumes)


def resume_key(server: tuple[str, int], token: str) -> str:
    """The key of a held claim that ran out (PostgreSQL: the server hears every notice, so it issues one)."""
    held = HeldClaim(server, token, wait=0.5).answer()
    assert held.status == 204
    if not is_postgres():
        assert RESUME.lower() not in held.headers  # SQLite's hub polls: it can't vouch for the gap
        pytest.skip("keys are issued on PostgreSQL only")
    return held.headers[RESUME.lower()]


def test_a_claim_with_the_last_ones_key_is_held_without_an_attempt_and_its_agent_still_seen(
        server, agent_session, agent_token, pipeline):
    key = resume_key(server, agent_session["token"])
    # Unannounced (no service, no notice), so only an attempt could see it: the resumed claim makes none.
    AgentToken.objects.filter(pk=agent_token.token.pk).update(revoked_at=timezone.now())
    Agent.objects.filter(pk=agent_session["agent_id"]).update(last_seen_at=timezone.now() - timedelta(hours=1))

    resumed = HeldClaim(server, agent_session["token"], wait=1, resume=key).answer()

    assert resumed.status == 204 and resumed.elapsed >= 1
    assert resumed.headers["x-request-id"] == "held-1" and "x-harmont-claim-hold" not in resumed.headers
    assert resumed.headers[RESUME.lower()] not in ("", key)
    # Its last-seen time is written as an attempt would have, in the next batch.
    wait_for(lambda: Agent.objects.get(pk=agent_session["agent_id"]).last_seen_at > timezone.now() - timedelta(
        minutes=1), 10, what="the resumed agent's last-seen time")
    # A key is good once: its retry is attempted, and the attempt sees the revocation.
    assert HeldClaim(server, agent_session["token"], wait=1, resume=key).answer().status == 401


def test_a_resumed_claim_is_answered_with_a_job_scheduled_while_it_waits(server, agent_session, pipeline):
    key = resume_key(server, agent_session["token"])
    held = HeldClaim(server, agent_session["token"], wait=25, resume=key)

    build = make_build(pipeline, pipeline_ir=two_step_ir())

    assert held.answer().status == 200 and held.elapsed < PROMPT_SECONDS
    job = json.loads(held.body)["job"]
    assert (job["build_id"], job["step_key"]) == (str(build.pk), "a")
    assert RESUME.lower() not in held.headers


def test_a_job_scheduled_between_two_claims_is_taken_by_the_resumed_one(server, agent_session, pipeline):
    key = resume_key(server, agent_session["token"])
    build = make_build(pipeline, pipeline_ir=two_step_ir())  # after the 204, before the next claim

    held = HeldClaim(server, agent_session["token"], wait=25, resume=key).answer()

    assert held.status == 200 and held.elapsed < PROMPT_SECONDS
    assert json.loads(held.body)["job"]["build_id"] == str(build.pk)


def test_revoking_the_token_ends_a_resumed_claim_with_401(server, agent_session, agent_token, pipeline):
    key = resume_key(server, agent_session["token"])
    held = HeldClaim(server, agent_session["token"], wait=25, resume=key)

    org_services.revoke_agent_token(token=agent_token.token)

    assert held.answer().status == 401 and held.elapsed < PROMPT_SECONDS


def test_another_agents_session_with_a_key_is_attempted_as_itself(server, agent_session, agent_token, pipeline):
    key = resume_key(server, agent_session["token"])
    other = register(agent_token.raw, tags={"queue": "arm64"}).json()["session_token"]
    Agent.objects.filter(session_hash=hash_secret(other)).update(stopped_at=timezone.now())  # unannounced

    assert HeldClaim(server, other, wait=1, resume=key).answer().status == 401


def test_a_key_presented_after_the_gap_is_attempted(server, agent_session, agent_token, pipeline):
    key = resume_key(server, agent_session["token"])
    AgentToken.objects.filter(pk=agent_token.token.pk).update(revoked_at=timezone.now())
    time.sleep(claim_resumes.GAP_SECONDS + 0.5)  # news of a gap this long may be forgotten

    assert HeldClaim(server, agent_session["token"], wait=1, resume=key).answer().status == 401


# ------------------------------------------------------------------ real agents


@pytest.fixture
def asgi_agents(server: tuple[str, int], transactional_db: None, agent_token: org_services.IssuedAgentToken,
                tmp_path: Path, pipeline: Pipeline) -> Iterator[Agents]:
    """Agents against the ASGI entry point (tests.e2e's `agents` talk to Django's WSGI test server)."""
    pipeline.repository = ""
    pipeline.save(update_fields=["repository"])
    host, port = server
    pool = Agents(server=f"http://{host}:{port}", token=agent_token.raw, base=tmp_path / "agents")
    pool.base.mkdir()
    try:
        yield pool
    finally:
        pool.close()
        if connection.vendor == "postgresql":
            # A resumed claim's last-seen time is written up to SEEN_FLUSH_SECONDS after it
            # (builds.claim_resumes), by this process's server: once that has passed, the killed
            # agents leave nothing to write that could race the teardown's TRUNCATE for locks.
            time.sleep(claim_resumes.SEEN_FLUSH_SECONDS + 0.5)
        database_quiet()


def test_an_idle_agent_long_polls_so_a_new_job_starts_at_once_whatever_its_poll_interval(asgi_agents, pipeline):
    agent = asgi_agents.start("waiting", poll_interval=30)
    wait_for(lambda: agent_registered("waiting"), 20, what="the agent to register")
    time.sleep(0.5)  # its first claim found nothing and is held

    started = time.monotonic()
    build = make_build(pipeline, pipeline_ir=two_step_ir())
    wait_for(lambda: finished(build), 20, what="the build to finish")

    assert build.state == "passed", {k: job_log(j) for k, j in jobs_by_key(build).items()}
    # A polling agent would have waited out its 30 s interval before the first job.
    assert time.monotonic() - started < 15
    assert agent.process.poll() is None


def test_an_agent_stopped_while_its_claim_is_held_exits_at_once(asgi_agents, pipeline):
    agent = asgi_agents.start("stopping", poll_interval=30, options=("--claim-wait", "30"))
    wait_for(lambda: agent_registered("stopping"), 20, what="the agent to register")
    time.sleep(0.5)

    started = time.monotonic()
    agent.send(signal.SIGTERM)

    assert agent.wait(timeout=15) == 0, agent.output()
    assert time.monotonic() - started < PROMPT_SECONDS
    # It took nothing on its way out.
    build = make_build(pipeline, pipeline_ir=two_step_ir())
    assert Job.objects.get(build=build, step_key="a").state == JobState.SCHEDULED


def agent_registered(name: str) -> bool:
    return Agent.objects.filter(name=name).exists()


def test_an_idle_agent_sends_each_claims_resume_key_back_with_the_next(asgi_agents, request, pipeline):
    from harmont import metrics

    if request.node.callspec.params["server"] != "asgi" or not is_postgres():
        pytest.skip("counted in this process: the ASGI server of this module, on PostgreSQL (keys need notices)")
    before = metrics.CLAIMS_RESUMED._value.get()
    agent = asgi_agents.start("resuming", poll_interval=30, options=("--claim-wait", "0.5"))
    wait_for(lambda: agent_registered("resuming"), 20, what="the agent to register")

    wait_for(lambda: metrics.CLAIMS_RESUMED._value.get() >= before + 3, 20, what="three resumed claims")
    # And a job still starts at once.
    build = make_build(pipeline, pipeline_ir=two_step_ir())
    wait_for(lambda: finished(build), 20, what="the build to finish")
    assert build.state == "passed" and agent.process.poll() is None
