"""The agent HTTP API (/api/v0/agent/...) and the services behind it, without agent processes.

Three credentials, each good for its own routes only: the organization's agent
token (hma_) registers, the agent's session (hms_) claims, the job credential
(hmj_) reports on its one job and downloads that job's inputs.
"""

from __future__ import annotations

import base64
import hashlib
import io
import threading
import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from builds import services as build_services
from builds.models import Agent, Build, BuildState, Job, JobState, LogChunk
from builds import selectors
from builds.selectors import MAX_CLAIM_WAIT_SECONDS
from builds.agent.logs import MAX_BATCH_CHARS, STDOUT, LogShipper
from builds.agent.spec import JobSpec
from builds.agent.transport import AgentError
from harmont.errors import ApiError
from harmont.timestamps import ns_from_datetime
from harmont.tokens import hash_secret
from harmont.logtokens import mint_log_token
from organizations import services as org_services
from organizations.models import AgentToken, ApiToken
from tests.dsl import hm
from tests.helpers import (
    AGENT,
    AGENT_T0,
    assert_error,
    bearer,
    build_at,
    chunk,
    claim,
    finish,
    is_postgres,
    iso,
    job_states,
    job_url,
    make_agent,
    make_build,
    parallel_ir,
    race,
    register,
    start,
    tarball,
)

J = JobState
SPEC_KEYS = {"id", "build_id", "build_number", "pipeline_slug", "step_key", "name", "command", "env",
             "timeout_seconds", "image", "source", "parent_workspace_path", "upload_workspace",
             "parent_snapshot", "snapshot_upload", "cancel_grace_seconds", "render", "mask", "start_with_finish"}
T0 = AGENT_T0  # in the past: "now" is always later; `chunk` stamps its lines from here too


# ===================================================================== helpers


def source_url(build_id: Any) -> str:
    return f"/api/v0/internal/builds/{build_id}/source.tar.gz"


def send_logs(job_client: APIClient, job_id: Any, chunks: list[dict[str, Any]]):
    return job_client.post(job_url(job_id, "logs"), {"chunks": chunks}, format="json")


def ended(state: str) -> dict[str, Any]:
    """The answer for a job that is over: whatever the agent still runs for it must stop."""
    return {"state": state, "cancel": True, "timeout": False}


def stored_log(job_id: Any) -> list[tuple[int, int, str]]:
    return list(LogChunk.objects.filter(job_id=job_id).order_by("seq").values_list("seq", "stream_kind", "content"))


def job_of(build: Build, key: str) -> Job:
    """The step's first job (a lost agent's job is retried: its new attempt comes after it)."""
    return Job.objects.filter(build=build, step_key=key).order_by("attempt").first()


# ===================================================================== credential isolation


AGENT_ROUTES = [
    ("post", f"{AGENT}/register"), ("post", f"{AGENT}/disconnect"), ("post", f"{AGENT}/claim"),
    ("post", "start"), ("post", "heartbeat"), ("post", "logs"), ("post", "finish"), ("put", "workspace"),
    ("get", "parent-workspace"), ("put", "snapshot"), ("get", "parent-snapshot"), ("get", "source"),
]


def call_route(client: APIClient, method: str, route: str, job: Job):
    if route == "source":
        path = source_url(job.build_id)
    elif route.startswith("/"):
        path = route
    else:
        path = job_url(job.pk, route)
    if route == "workspace":
        return client.put(path, b"\x1f\x8b archive", content_type="application/gzip")
    if route == "snapshot":
        return client.put(path, b"image archive", content_type="application/x-tar")
    if method == "get":
        return client.get(path)
    return getattr(client, method)(path, {}, format="json")


@pytest.mark.django_db
@pytest.mark.parametrize("method,route", AGENT_ROUTES)
def test_rest_credentials_and_log_tokens_are_401_on_every_agent_route(api, owner, session, build, method, route):
    _, job_client = claim(session)
    job = job_of(build, "a")
    before = Job.objects.values_list("state", "last_heartbeat_at").get(pk=job.pk)
    session_token = org_services.issue_session_token(user=owner).raw
    log_token = mint_log_token(build_id=build.pk).token

    for raw in (api.raw_token, session_token, log_token):
        assert_error(call_route(bearer(raw), method, route, job), 401, "unauthorized")

    assert Job.objects.values_list("state", "last_heartbeat_at").get(pk=job.pk) == before
    assert Agent.objects.count() == 1
    assert not LogChunk.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("method,route", AGENT_ROUTES)
def test_no_credential_is_401_on_every_agent_route(anon, session, build, method, route):
    claim(session)
    assert_error(call_route(anon, method, route, job_of(build, "a")), 401, "unauthorized")


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/api/v0/user", "/api/v0/organizations", "/api/v0/organizations/acme-corp/agents"])
def test_agent_credentials_are_401_on_rest_routes(agent_token, session, build, path):
    _, job_client = claim(session)
    for raw in (agent_token.raw, session.raw_token, job_client.raw_token):
        assert_error(bearer(raw).get(path), 401, "unauthorized")


@pytest.mark.django_db
def test_agent_token_can_only_register(agent_token, build):
    client = bearer(agent_token.raw)
    job = job_of(build, "a")
    assert_error(client.post(f"{AGENT}/claim"), 401, "unauthorized")
    assert_error(client.post(job_url(job.pk, "start")), 401, "unauthorized")
    assert_error(client.post(f"{AGENT}/disconnect"), 401, "unauthorized")
    assert_error(client.get(source_url(build.pk)), 401, "unauthorized")
    job.refresh_from_db()
    assert job.state == J.SCHEDULED


@pytest.mark.django_db
def test_agent_session_can_not_report_on_jobs(session, build):
    spec, _ = claim(session)

    assert_error(session.post(job_url(spec["id"], "start")), 401, "unauthorized")
    assert_error(finish(session, spec["id"], exit_code=0), 401, "unauthorized")
    assert_error(session.post(f"{AGENT}/register", {"name": "again"}, format="json"), 401, "unauthorized")

    job = job_of(build, "a")
    assert (job.state, job.started_at, job.exit_code) == (J.ASSIGNED, None, None)
    assert Agent.objects.count() == 1


@pytest.mark.django_db
def test_job_credential_is_no_good_for_claim_or_register(session, pipeline):
    make_build(pipeline)
    make_build(pipeline)
    spec, job_client = claim(session)

    assert_error(job_client.post(f"{AGENT}/claim"), 401, "unauthorized")
    assert_error(job_client.post(f"{AGENT}/register", {"name": "x"}, format="json"), 401, "unauthorized")
    assert_error(job_client.post(f"{AGENT}/disconnect"), 401, "unauthorized")
    assert Job.objects.filter(state=J.ASSIGNED).count() == 1
    assert Agent.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize("method,route", [("post", "start"), ("post", "heartbeat"), ("post", "logs"),
                                          ("post", "finish"), ("put", "workspace"), ("get", "parent-workspace")])
def test_job_credential_of_job_a_is_refused_for_job_b(session, pipeline, method, route):
    make_build(pipeline)
    make_build(pipeline)
    spec_a, client_a = claim(session)
    spec_b, _ = claim(session)
    job_b = Job.objects.get(pk=spec_b["id"])
    before = Job.objects.values_list("state", "last_heartbeat_at", "workspace_archive").get(pk=job_b.pk)

    assert_error(call_route(client_a, method, route, job_b), 404, "job_not_found")

    assert Job.objects.values_list("state", "last_heartbeat_at", "workspace_archive").get(pk=job_b.pk) == before
    assert not LogChunk.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("header", ["Bearer hma_unknown-token-value-0123456789", "Bearer hms_unknown-0123456789",
                                    "Bearer hmj_unknown-0123456789", "Basic hma_abc", "Bearer", "hma_abc",
                                    "Bearer hma_" + "x" * 300])
def test_unknown_or_malformed_agent_credentials_are_401(build, header):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    assert_error(client.post(f"{AGENT}/register", {"name": "x"}, format="json"), 401, "unauthorized")
    assert_error(client.post(f"{AGENT}/claim"), 401, "unauthorized")
    assert_error(client.post(job_url(job_of(build, "a").pk, "heartbeat"), {}, format="json"), 401, "unauthorized")
    assert not Agent.objects.exists()


# ===================================================================== register


@pytest.mark.django_db
def test_register_returns_201_with_agent_and_session_token(agent_token, org):
    response = register(agent_token.raw, name="runner-7", hostname="ci-7.local", version="0.3.1", os="linux")

    assert response.status_code == 201, response.content
    body = response.json()
    agent = Agent.objects.get()
    assert body == {
        "agent": {"id": str(agent.id), "name": "runner-7", "hostname": "ci-7.local", "version": "0.3.1",
                  "os": "linux", "tags": {}, "created_at": iso(agent.created_at),
                  "last_seen_at": iso(agent.last_seen_at)},
        "session_token": body["session_token"],
    }
    assert body["session_token"].startswith("hms_") and len(body["session_token"]) == 4 + 43
    assert agent.session_hash == hashlib.sha256(body["session_token"].encode()).hexdigest()
    assert (agent.organization, agent.token, agent.stopped_at) == (org, agent_token.token, None)
    agent_token.token.refresh_from_db()
    assert agent_token.token.last_used_at == agent.created_at


@pytest.mark.django_db
def test_register_twice_gives_two_agents_with_their_own_sessions(agent_token):
    first = register(agent_token.raw).json()
    second = register(agent_token.raw).json()
    assert first["agent"]["id"] != second["agent"]["id"]
    assert first["session_token"] != second["session_token"]
    assert bearer(first["session_token"]).post(f"{AGENT}/claim").status_code == 204


@pytest.mark.django_db
@pytest.mark.parametrize("body,field", [
    ({}, "name"), ({"name": ""}, "name"), ({"name": None}, "name"), ({"name": "x" * 256}, "name"),
    ({"name": "ok", "version": "v" * 51}, "version"), ({"name": "ok", "hostname": ["a"]}, "hostname"),
    ({"name": "a\x00b"}, "name"),
])
def test_register_with_bad_body_is_422_and_writes_nothing(agent_token, body, field):
    response = bearer(agent_token.raw).post(f"{AGENT}/register", body, format="json")

    error = assert_error(response, 422, "validation_failed")
    assert set(error["fields"]) == {field}
    assert not Agent.objects.exists()
    agent_token.token.refresh_from_db()
    assert agent_token.token.last_used_at is None


@pytest.mark.django_db
def test_register_with_a_non_object_body_is_400(agent_token):
    assert_error(bearer(agent_token.raw).post(f"{AGENT}/register", ["runner"], format="json"), 400, "invalid_request")
    response = bearer(agent_token.raw).post(f"{AGENT}/register", "{not json", content_type="application/json")
    assert_error(response, 400, "invalid_json")
    assert not Agent.objects.exists()


@pytest.mark.django_db
def test_disconnect_stops_the_session(session):
    response = session.post(f"{AGENT}/disconnect")

    assert response.status_code == 204
    session.agent.refresh_from_db()
    assert session.agent.stopped_at is not None
    assert_error(session.post(f"{AGENT}/claim"), 401, "unauthorized")


# ===================================================================== claim


@pytest.mark.django_db
def test_claim_returns_the_full_job_spec_and_a_job_credential(session, pipeline, settings):
    build = make_build(pipeline, env={"DEPLOY_ENV": "staging", "TERM": "xterm"})

    response = session.post(f"{AGENT}/claim")

    assert response.status_code == 200, response.content
    body = response.json()
    a = job_of(build, "a")
    assert set(body) == {"job", "job_token"}
    assert body["job"] == {
        "id": str(a.id), "build_id": str(build.id), "build_number": 1, "pipeline_slug": "web-ci",
        "step_key": "a", "name": "a", "command": "echo a",
        "env": {"DEBIAN_FRONTEND": "noninteractive", "TERM": "xterm", "DEPLOY_ENV": "staging",
                "CI": "true", "HARMONT": "true", "HARMONT_BUILD_ID": str(build.id), "HARMONT_BUILD_NUMBER": "1",
                "HARMONT_PIPELINE_SLUG": "web-ci", "HARMONT_BRANCH": "main", "HARMONT_COMMIT": "abc123",
                "HARMONT_STEP_KEY": "a", "HARMONT_PULL_REQUEST_FORK": "false"},
        "timeout_seconds": settings.DEFAULT_JOB_TIMEOUT_SECONDS, "image": "ubuntu:24.04",
        # No upload and no source_url: the agent clones the pipeline's repository at the commit.
        "source": {"kind": "git", "url": "https://github.com/acme/web.git", "commit": "abc123", "branch": "main",
                   "path": None, "sha256": None},
        "parent_workspace_path": None, "upload_workspace": True, "parent_snapshot": None,
        "snapshot_upload": {"path": f"{AGENT}/jobs/{a.id}/snapshot", "max_bytes": settings.SNAPSHOT_MAX_BYTES},
        "cancel_grace_seconds": settings.AGENT_CANCEL_GRACE_SECONDS, "render": None,
        "mask": [],  # no secrets (tests/test_secrets_api.py)
        "start_with_finish": True,
    }
    token = body["job_token"]
    assert token.startswith("hmj_") and len(token) == 4 + 43
    assert a.credential_hash == hashlib.sha256(token.encode()).hexdigest()


@pytest.mark.django_db
def test_claim_assigns_the_job_and_the_build_runs(session, build):
    # Last seen a while ago: the claim refreshes it (within AGENT_SEEN_RESOLUTION it may not).
    Agent.objects.filter(pk=session.agent.pk).update(last_seen_at=timezone.now() - timedelta(minutes=1))
    before = timezone.now()
    spec, _ = claim(session)

    a, b = job_of(build, "a"), job_of(build, "b")
    assert spec["id"] == str(a.id)
    assert (a.state, a.agent_id) == (J.ASSIGNED, session.agent.id)
    assert a.assigned_at >= before and a.last_heartbeat_at == a.assigned_at
    assert a.started_at is None
    assert b.state == J.PENDING and b.agent_id is None
    build.refresh_from_db()
    assert build.state == BuildState.RUNNING
    session.agent.refresh_from_db()
    assert session.agent.last_seen_at >= before


@pytest.mark.django_db
def test_claim_with_nothing_scheduled_is_204(session, build):
    claim(session)

    # `b` is pending behind `a`: not claimable.
    response = session.post(f"{AGENT}/claim")

    assert response.status_code == 204
    assert response.content == b""
    assert job_of(build, "b").state == J.PENDING


@pytest.mark.django_db
def test_claim_takes_the_oldest_scheduled_job(session, pipeline):
    newer = build_at(pipeline, T0 + timedelta(minutes=5))   # number 1, scheduled later
    older = build_at(pipeline, T0)                          # number 2, scheduled first

    first, _ = claim(session)
    second, _ = claim(session)

    assert (first["build_id"], first["build_number"]) == (str(older.id), 2)
    assert (second["build_id"], second["build_number"]) == (str(newer.id), 1)
    assert session.post(f"{AGENT}/claim").status_code == 204


@pytest.mark.django_db
def test_claim_never_takes_another_orgs_job(session, build, other_pipeline):
    theirs = build_at(other_pipeline, T0 - timedelta(days=1))  # older than ours

    spec, _ = claim(session)

    assert spec["build_id"] == str(build.id)
    assert session.post(f"{AGENT}/claim").status_code == 204
    assert job_of(theirs, "a").state == J.SCHEDULED
    assert job_of(theirs, "a").agent_id is None


@pytest.mark.django_db
def test_claim_does_not_take_canceled_jobs(session, build):
    build_services.cancel_build(build=build)
    assert session.post(f"{AGENT}/claim").status_code == 204


@pytest.mark.django_db
def test_spec_of_a_builds_in_child_points_at_its_parents_workspace(session, running, build):
    spec_a, client_a = running
    assert finish(client_a, spec_a["id"], exit_code=0).status_code == 200

    spec_b, _ = claim(session)

    assert spec_b["step_key"] == "b"
    assert spec_b["parent_workspace_path"] == f"{AGENT}/jobs/{spec_b['id']}/parent-workspace"
    assert spec_b["upload_workspace"] is False
    assert spec_b["source"] is None
    assert spec_b["image"] is None
    assert spec_b["env"]["HARMONT_STEP_KEY"] == "b"


@pytest.mark.django_db
def test_source_only_for_jobs_that_start_from_the_source(session, pipeline, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path
    # `root` and `after` (depends_on only: a fresh workspace) need the source; `child` starts from root's files.
    root = hm.sh("make", key="root")
    ir = hm.pipeline([root.sh("make test", key="child"), hm.wait(), hm.sh("make deploy", key="after")])
    build = make_build(pipeline, pipeline_ir=ir, source_b64=base64.b64encode(tarball({"f": b"1"})).decode())
    path = {"kind": "archive", "path": source_url(build.id), "url": None, "sha256": None, "commit": None,
            "branch": None}

    root_spec, root_client = claim(session)
    assert (root_spec["step_key"], root_spec["source"], root_spec["upload_workspace"]) == ("root", path, True)
    start(root_client, root_spec["id"])
    finish(root_client, root_spec["id"], exit_code=0)
    child_spec, child_client = claim(session)
    assert (child_spec["step_key"], child_spec["source"]) == ("child", None)
    assert child_spec["parent_workspace_path"] is not None
    start(child_client, child_spec["id"])
    finish(child_client, child_spec["id"], exit_code=0)
    after_spec, _ = claim(session)
    assert (after_spec["step_key"], after_spec["source"], after_spec["parent_workspace_path"]) == (
        "after", path, None)


@pytest.mark.django_db
def test_sequential_claims_by_several_agents_take_each_job_once_oldest_first(org, pipeline):
    builds = [build_at(pipeline, T0 + timedelta(minutes=i), pipeline_ir=parallel_ir(4, prefix=f"b{i}-"))
              for i in range(3)]
    agents = [make_agent(org, name=f"runner-{i}") for i in range(3)]
    expected = [job.pk for job in Job.objects.filter(build__in=builds).order_by("scheduled_at", "position")]

    claimed: list[tuple[Any, Any]] = []
    for turn in range(len(expected)):
        agent = agents[turn % 3]
        result = build_services.claim_job(agent=agent)
        assert result is not None
        claimed.append((result.job.pk, agent.pk))

    assert [job_id for job_id, _ in claimed] == expected
    assert all(build_services.claim_job(agent=agent) is None for agent in agents)
    assert dict(Job.objects.filter(build__in=builds).values_list("id", "agent_id")) == dict(claimed)
    assert set(Job.objects.filter(build__in=builds).values_list("state", flat=True)) == {J.ASSIGNED}
    credentials = Job.objects.filter(build__in=builds).values_list("credential_hash", flat=True)
    assert len(set(credentials)) == len(expected) and None not in credentials


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_racing_agents_claim_every_job_exactly_once(org, pipeline):
    if not is_postgres():
        pytest.skip("claim races need PostgreSQL row locks (SKIP LOCKED); SQLite serialises all writers")
    builds = [build_at(pipeline, T0 + timedelta(seconds=i), pipeline_ir=parallel_ir(50, prefix=f"b{i}-"))
              for i in range(4)]
    assert Job.objects.filter(state=J.SCHEDULED).count() == 200
    agents = [make_agent(org, name=f"racer-{i}") for i in range(4)]
    claimed: dict[Any, list[Any]] = {agent.pk: [] for agent in agents}

    def run(i: int) -> None:
        agent = agents[i]
        while (result := build_services.claim_job(agent=agent)) is not None:
            claimed[agent.pk].append(result.job.pk)

    race(len(agents), run)  # no claimer hangs or raises

    all_claims = [job_id for ids in claimed.values() for job_id in ids]
    duplicates = [job_id for job_id, n in Counter(all_claims).items() if n > 1]
    assert not duplicates
    assert sorted(all_claims) == sorted(Job.objects.filter(build__in=builds).values_list("id", flat=True))
    assert not Job.objects.filter(state=J.SCHEDULED).exists()
    # The database agrees with what each agent was told.
    owners = dict(Job.objects.values_list("id", "agent_id"))
    assert all(owners[job_id] == agent_id for agent_id, ids in claimed.items() for job_id in ids)
    assert set(Build.objects.filter(pk__in=[b.pk for b in builds]).values_list("state", flat=True)) == {
        BuildState.RUNNING}


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_claim_racing_a_cancel_of_the_same_build_does_not_deadlock(org, build, monkeypatch):
    if not is_postgres():
        pytest.skip("lock ordering needs PostgreSQL row locks; SQLite serialises all writers")
    from builds import states

    agent = make_agent(org)
    claim_reached_rollup, cancel_done = threading.Event(), threading.Event()
    real_mark = states.mark_build_running
    claimer: dict[str, Any] = {}
    errors: list[tuple[str, BaseException]] = []

    def roll_up_after_the_cancel(*args: Any, **kwargs: Any) -> None:
        # The claimer rolls its build up only once the cancel is through (or gave up waiting):
        # a claim that still held its job's row lock here would block the cancel, then deadlock with it.
        if threading.current_thread() is claimer["thread"]:
            claim_reached_rollup.set()
            cancel_done.wait(timeout=5)
        return real_mark(*args, **kwargs)

    monkeypatch.setattr(states, "mark_build_running", roll_up_after_the_cancel)

    def do_claim() -> None:
        try:
            claimer["result"] = build_services.claim_job(agent=agent)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(("claim", exc))
        finally:
            connection.close()

    def do_cancel() -> None:
        try:
            assert claim_reached_rollup.wait(timeout=10)
            build_services.cancel_build(build=Build.objects.get(pk=build.pk))
            cancel_done.set()
        except BaseException as exc:  # noqa: BLE001
            errors.append(("cancel", exc))
        finally:
            connection.close()

    claimer["thread"] = threading.Thread(target=do_claim)
    canceler = threading.Thread(target=do_cancel)
    claimer["thread"].start()
    canceler.start()
    claimer["thread"].join(timeout=30)
    canceler.join(timeout=30)

    assert not errors, errors
    assert claimer["result"].job.step_key == "a"
    assert job_states(build) == {"a": J.CANCELING, "b": J.CANCELED}
    build.refresh_from_db()
    assert build.state == BuildState.CANCELED


# ===================================================================== start


@pytest.mark.django_db
def test_start_moves_the_job_to_running(session, build):
    spec, job_client = claim(session)
    before = timezone.now()

    response = job_client.post(job_url(spec["id"], "start"))

    assert response.status_code == 200
    assert response.json() == {"state": "running", "cancel": False, "timeout": False}
    a = job_of(build, "a")
    assert a.state == J.RUNNING
    assert a.started_at >= before and a.last_heartbeat_at == a.started_at
    build.refresh_from_db()
    assert (build.state, build.started_at) == (BuildState.RUNNING, a.started_at)


@pytest.mark.django_db
def test_start_twice_keeps_the_first_start(running, build):
    spec, job_client = running
    first = job_of(build, "a").started_at

    assert start(job_client, spec["id"]) == {"state": "running", "cancel": False, "timeout": False}
    assert job_of(build, "a").started_at == first


@pytest.mark.django_db
def test_start_after_the_build_was_canceled_says_cancel(session, build):
    spec, job_client = claim(session)
    build_services.cancel_build(build=build)

    assert start(job_client, spec["id"]) == {"state": "canceling", "cancel": True, "timeout": False}
    a = job_of(build, "a")
    assert (a.state, a.started_at) == (J.CANCELING, None)


@pytest.mark.django_db
def test_start_of_a_job_the_server_already_ended_says_cancel(session, build, settings):
    spec, job_client = claim(session)
    # The agent took longer than the heartbeat timeout to fetch its inputs: the reaper gave up on it.
    lost = timezone.now() + timedelta(seconds=settings.AGENT_HEARTBEAT_TIMEOUT_SECONDS + 1)
    assert build_services.reap(now=lost).heartbeat_lost == 1

    assert start(job_client, spec["id"]) == ended("failed")
    a = job_of(build, "a")
    assert (a.state, a.started_at, a.error_code) == (J.FAILED, None, "agent_heartbeat_lost")


@pytest.mark.django_db
def test_heartbeat_and_logs_of_a_job_the_server_already_ended_say_cancel(running, build, settings):
    spec, job_client = running
    lost = timezone.now() + timedelta(seconds=settings.AGENT_HEARTBEAT_TIMEOUT_SECONDS + 1)
    build_services.reap(now=lost)

    assert job_client.post(job_url(spec["id"], "heartbeat"), {}, format="json").json() == ended("failed")
    assert_error(send_logs(job_client, spec["id"], [chunk(1, "late\n")]), 409, "job_finished")
    # Its report afterwards changes nothing.
    assert finish(job_client, spec["id"], exit_code=0).json() == ended("failed")
    assert job_of(build, "a").error_code == "agent_heartbeat_lost"


# ===================================================================== a job's credential ends with its job


def end_by_agent(job_client: APIClient, job_id: Any, settings: Any) -> None:
    assert finish(job_client, job_id, exit_code=0).json() == ended("passed")


def end_by_reaper(job_client: APIClient, job_id: Any, settings: Any) -> None:
    build_services.reap(now=timezone.now() + timedelta(seconds=settings.AGENT_HEARTBEAT_TIMEOUT_SECONDS + 1))
    Job.objects.filter(pk=job_id).update(finished_at=timezone.now())  # reaped "now", not in the future


@pytest.mark.django_db
@pytest.mark.parametrize("end", [end_by_agent, end_by_reaper])
def test_logs_for_an_ended_job_are_409_and_store_nothing(running, build, settings, end):
    spec, job_client = running
    send_logs(job_client, spec["id"], [chunk(1, "before\n")])
    end(job_client, spec["id"], settings)
    before = Job.objects.values_list("log_bytes", "last_heartbeat_at").get(pk=spec["id"])

    error = assert_error(send_logs(job_client, spec["id"], [chunk(2, "forged\n"), chunk(1, "rewritten\n")]),
                         409, "job_finished")

    assert error["type"] == "conflict"
    assert stored_log(spec["id"]) == [(1, 0, "before\n")]
    assert Job.objects.values_list("log_bytes", "last_heartbeat_at").get(pk=spec["id"]) == before


@pytest.mark.django_db
def test_a_finish_retried_within_the_grace_gets_the_same_answer_and_stores_no_more_output(running, build):
    spec, job_client = running
    first = finish(job_client, spec["id"], exit_code=0, chunks=[chunk(1, "done\n")])
    ended_at = job_of(build, "a").finished_at

    again = finish(job_client, spec["id"], exit_code=1, chunks=[chunk(1, "done\n"), chunk(2, "forged\n")])

    assert (first.status_code, again.status_code) == (200, 200)
    assert again.json() == first.json() == ended("passed")
    a = job_of(build, "a")
    assert (a.state, a.exit_code, a.finished_at) == (J.PASSED, 0, ended_at)
    assert stored_log(spec["id"]) == [(1, 0, "done\n")]


JOB_ROUTES = [("post", "start"), ("post", "heartbeat"), ("post", "logs"), ("post", "finish"), ("put", "workspace"),
              ("get", "parent-workspace"), ("get", "source"), ("put", "artifacts?path=a.txt"),
              ("post", "pipeline")]


@pytest.mark.django_db
@pytest.mark.parametrize("end", [end_by_agent, end_by_reaper])
@pytest.mark.parametrize("method,route", JOB_ROUTES)
def test_an_ended_jobs_credential_is_401_on_every_route_after_the_grace(running, build, settings, end, method,
                                                                          route):
    spec, job_client = running
    end(job_client, spec["id"], settings)
    grace = timedelta(seconds=settings.JOB_CREDENTIAL_GRACE_SECONDS)
    Job.objects.filter(pk=spec["id"]).update(finished_at=timezone.now() - grace + timedelta(seconds=5))
    assert job_client.post(job_url(spec["id"], "heartbeat"), {}, format="json").status_code == 200  # still in it
    Job.objects.filter(pk=spec["id"]).update(finished_at=timezone.now() - grace - timedelta(seconds=1))
    before = (job_states(build), Job.objects.values_list("finished_at", "log_bytes").get(pk=spec["id"]))

    assert_error(call_route(job_client, method, route, job_of(build, "a")), 401, "unauthorized")

    assert (job_states(build), Job.objects.values_list("finished_at", "log_bytes").get(pk=spec["id"])) == before


class RefusingTransport:
    """Answers every log shipment with one error, as the server would."""

    def __init__(self, status: int, code: str) -> None:
        self.status, self.code, self.calls = status, code, 0

    def json(self, method: str, path: str, *, token: str, body: Any = None, ok: tuple[int, ...] = (200,)) -> Any:
        self.calls += 1
        raise AgentError(self.status, {"error": {"type": "conflict", "code": self.code, "message": "..."}})


def test_the_agent_hearing_job_finished_stops_the_command_and_sends_that_jobs_output_no_more():
    transport = RefusingTransport(409, "job_finished")
    shipper = LogShipper(transport, JobSpec.from_claim({  # type: ignore[arg-type]
        "job": {"id": "job-1", "command": "true", "env": {}, "timeout_seconds": 60, "step_key": "a"},
        "job_token": "hmj_x"}))
    shipper.add(STDOUT, "tick\n")

    shipper.flush()  # no exception: the job is given up, not the agent
    shipper.add(STDOUT, "tick\n")
    shipper.close()
    shipper.flush()

    assert shipper.cancel_requested.is_set() and shipper.ended.is_set()
    assert (transport.calls, shipper.pending) == (1, [])  # one refusal, no retries, nothing kept for the finish


class RecordingTransport:
    """Takes every log shipment and remembers its chunks; its first `failures` shipments fail as a 503 would."""

    def __init__(self, failures: int = 0) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.failures = failures

    def json(self, method: str, path: str, *, token: str, body: Any = None, ok: tuple[int, ...] = (200,)) -> Any:
        if self.failures:
            self.failures -= 1
            raise AgentError(503, {"error": {"type": "server_error", "code": "database_unavailable",
                                             "message": "..."}})
        self.batches.append(body["chunks"])
        return {"state": "running", "cancel": False, "timeout": False}


def test_a_backlog_goes_out_in_bounded_requests_in_order_once_the_server_is_back():
    transport = RecordingTransport(failures=1)
    shipper = LogShipper(transport, JobSpec.from_claim({  # type: ignore[arg-type]
        "job": {"id": "job-1", "command": "true", "env": {}, "timeout_seconds": 60, "step_key": "a"},
        "job_token": "hmj_x"}))
    line = "x" * 1000 + "\n"
    output = line * 10_000  # 10 MB printed while the server was away
    for offset in range(0, len(output), 65536):
        shipper.add(STDOUT, output[offset:offset + 65536])
    with pytest.raises(AgentError):
        shipper.flush()  # the server is away: everything stays pending
    assert transport.batches == []

    shipper.flush()

    assert len(transport.batches) == 5
    assert all(sum(len(c["content"]) for c in batch) <= MAX_BATCH_CHARS for batch in transport.batches)
    seqs = [c["seq"] for batch in transport.batches for c in batch]
    assert seqs == list(range(1, len(seqs) + 1))
    assert "".join(c["content"] for batch in transport.batches for c in batch) == output
    assert shipper.pending == []


def test_a_flush_sends_what_was_pending_when_it_began_and_no_more():
    shipper: LogShipper

    class Chatty(RecordingTransport):
        def json(self, *args: Any, **kwargs: Any) -> Any:
            shipper.add(STDOUT, "y" * MAX_BATCH_CHARS)  # the command keeps printing while a batch is sent
            return super().json(*args, **kwargs)

    transport = Chatty()
    shipper = LogShipper(transport, JobSpec.from_claim({  # type: ignore[arg-type]
        "job": {"id": "job-1", "command": "true", "env": {}, "timeout_seconds": 60, "step_key": "a"},
        "job_token": "hmj_x"}))
    shipper.add(STDOUT, "x" * (3 * MAX_BATCH_CHARS))

    shipper.flush()

    assert len(transport.batches) == 3
    assert {c["content"][0] for batch in transport.batches for c in batch} == {"x"}
    assert sum(len(c["content"]) for c in shipper.pending) == 3 * MAX_BATCH_CHARS  # for the next flush


@pytest.mark.parametrize(("status", "code"), [(409, "job_not_active"), (422, "validation_failed")])
def test_other_refusals_of_a_log_shipment_still_abandon_the_job(status, code):
    shipper = LogShipper(RefusingTransport(status, code), JobSpec.from_claim({  # type: ignore[arg-type]
        "job": {"id": "job-1", "command": "true", "env": {}, "timeout_seconds": 60, "step_key": "a"},
        "job_token": "hmj_x"}))
    shipper.add(STDOUT, "tick\n")
    with pytest.raises(AgentError):
        shipper.flush()
    assert not shipper.ended.is_set()


@pytest.mark.django_db
def test_a_running_jobs_credential_has_no_grace_to_lose(running, build, settings):
    spec, job_client = running
    settings.JOB_CREDENTIAL_GRACE_SECONDS = 0
    assert job_client.post(job_url(spec["id"], "heartbeat"), {}, format="json").status_code == 200
    assert send_logs(job_client, spec["id"], [chunk(1, "x\n")]).status_code == 200


# ===================================================================== logs


@pytest.mark.django_db
def test_logs_are_stored(running, build):
    spec, job_client = running
    chunks = [chunk(1, "hello\n"), chunk(2, "warning: x\n", stream_kind=1), chunk(3, "[step]\n", stream_kind=2)]

    response = send_logs(job_client, spec["id"], chunks)

    assert response.status_code == 200, response.content
    assert response.json() == {"state": "running", "cancel": False, "timeout": False}
    assert stored_log(spec["id"]) == [(1, 0, "hello\n"), (2, 1, "warning: x\n"), (3, 2, "[step]\n")]
    stored = LogChunk.objects.get(job_id=spec["id"], seq=2)
    assert stored.ts == ns_from_datetime(T0 + timedelta(seconds=2))
    a = job_of(build, "a")
    assert a.log_bytes == len("hello\nwarning: x\n[step]\n")


@pytest.mark.django_db
def test_resent_and_overlapping_batches_store_each_seq_once(running, build):
    spec, job_client = running
    lines = [f"line {i} ✓\n" for i in range(1, 8)]
    first = [chunk(i, lines[i - 1]) for i in (1, 2, 3)]

    assert send_logs(job_client, spec["id"], first).status_code == 200
    assert send_logs(job_client, spec["id"], first).status_code == 200            # a retry
    overlapping = [chunk(i, lines[i - 1]) for i in (2, 3, 4, 5)]
    assert send_logs(job_client, spec["id"], overlapping).status_code == 200
    out_of_order = [chunk(i, lines[i - 1]) for i in (7, 6, 5)]
    assert send_logs(job_client, spec["id"], out_of_order).status_code == 200

    log = stored_log(spec["id"])
    assert [seq for seq, _, _ in log] == [1, 2, 3, 4, 5, 6, 7]
    assert "".join(content for _, _, content in log) == "".join(lines)
    assert job_of(build, "a").log_bytes == len("".join(lines).encode())


@pytest.mark.django_db
def test_an_empty_batch_is_fine(running):
    spec, job_client = running
    assert send_logs(job_client, spec["id"], []).status_code == 200
    assert not LogChunk.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("bad,field", [
    ({"seq": 0}, "seq"), ({"seq": -1}, "seq"), ({"seq": 2**31}, "seq"), ({"seq": "x"}, "seq"),
    ({"stream_kind": 5}, "stream_kind"), ({"stream_kind": None}, "stream_kind"),
    ({"content": None}, "content"), ({"content": "nul \x00 byte"}, "content"),
    ({"ts": "yesterday"}, "ts"), ({"ts": None}, "ts"),
])
def test_invalid_chunks_are_422_and_nothing_is_stored(running, build, bad, field):
    spec, job_client = running
    broken = {**chunk(2, "bad"), **bad}

    response = send_logs(job_client, spec["id"], [chunk(1, "good\n"), broken])

    error = assert_error(response, 422, "validation_failed")
    assert list(error["fields"]) == [f"chunks.1.{field}"]
    assert not LogChunk.objects.exists()
    assert job_of(build, "a").log_bytes == 0


@pytest.mark.django_db
@pytest.mark.parametrize("missing", ["seq", "stream_kind", "content", "ts"])
def test_chunks_missing_a_field_are_422(running, missing):
    spec, job_client = running
    broken = chunk(1, "x")
    del broken[missing]
    error = assert_error(send_logs(job_client, spec["id"], [broken]), 422, "validation_failed")
    assert list(error["fields"]) == [f"chunks.0.{missing}"]
    assert not LogChunk.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("body", [{}, {"chunks": "x"}, {"chunks": [1]}])
def test_a_malformed_logs_body_is_422(running, body):
    spec, job_client = running
    assert_error(job_client.post(job_url(spec["id"], "logs"), body, format="json"), 422, "validation_failed")
    assert not LogChunk.objects.exists()


@pytest.mark.django_db
def test_output_past_the_log_limit_is_dropped_with_one_meta_chunk(running, build, settings):
    settings.JOB_LOG_LIMIT_BYTES = 100
    spec, job_client = running
    forty = "x" * 39 + "\n"

    assert send_logs(job_client, spec["id"], [chunk(1, forty), chunk(2, forty)]).status_code == 200
    response = send_logs(job_client, spec["id"], [chunk(3, forty), chunk(4, forty)])
    assert response.json() == {"state": "running", "cancel": False, "timeout": False}
    assert send_logs(job_client, spec["id"], [chunk(5, "more\n"), chunk(6, "and more\n")]).status_code == 200
    assert send_logs(job_client, spec["id"], [chunk(3, forty)]).status_code == 200  # a retry of the cut chunk

    log = stored_log(spec["id"])
    assert [(seq, kind) for seq, kind, _ in log] == [(1, 0), (2, 0), (3, 2)]
    assert log[0][2] == log[1][2] == forty
    assert "log limit of 100 bytes" in log[2][2]
    assert sum(1 for _, kind, _ in log if kind == 2) == 1
    a = job_of(build, "a")
    assert (a.log_truncated, a.state) == (True, J.RUNNING)
    assert a.log_bytes == sum(len(content.encode()) for _, _, content in log)
    # The job goes on and finishes normally.
    assert finish(job_client, spec["id"], exit_code=0).json()["state"] == "passed"


@pytest.mark.django_db
def test_logs_answer_cancel_once_the_build_was_canceled(running, build):
    spec, job_client = running
    assert send_logs(job_client, spec["id"], [chunk(1, "a\n")]).json()["cancel"] is False

    build_services.cancel_build(build=build)
    response = send_logs(job_client, spec["id"], [chunk(2, "b\n")])

    assert response.json() == {"state": "canceling", "cancel": True, "timeout": False}
    assert [seq for seq, _, _ in stored_log(spec["id"])] == [1, 2]


@pytest.mark.django_db
def test_logs_refresh_the_jobs_heartbeat(running, build):
    spec, job_client = running
    Job.objects.filter(pk=spec["id"]).update(last_heartbeat_at=T0)
    send_logs(job_client, spec["id"], [chunk(1, "x")])
    assert job_of(build, "a").last_heartbeat_at > T0


# ===================================================================== heartbeat


@pytest.mark.django_db
def test_heartbeat_records_life(running, session, build):
    spec, job_client = running
    Job.objects.filter(pk=spec["id"]).update(last_heartbeat_at=T0)
    Agent.objects.filter(pk=session.agent.pk).update(last_seen_at=T0)

    response = job_client.post(job_url(spec["id"], "heartbeat"), {}, format="json")

    assert response.status_code == 200
    assert response.json() == {"state": "running", "cancel": False, "timeout": False}
    assert job_of(build, "a").last_heartbeat_at > T0
    session.agent.refresh_from_db()
    assert session.agent.last_seen_at > T0


@pytest.mark.django_db
def test_heartbeat_with_an_empty_body_is_fine(running):
    spec, job_client = running
    assert job_client.post(job_url(spec["id"], "heartbeat")).json()["state"] == "running"


@pytest.mark.django_db
def test_heartbeat_timing_out_moves_running_to_timing_out(running, build):
    spec, job_client = running

    response = job_client.post(job_url(spec["id"], "heartbeat"), {"timing_out": True}, format="json")

    assert response.json() == {"state": "timing_out", "cancel": False, "timeout": True}
    assert job_of(build, "a").state == J.TIMING_OUT
    build.refresh_from_db()
    assert build.state == BuildState.RUNNING


@pytest.mark.django_db
def test_heartbeat_answers_cancel_after_the_build_was_canceled(running, build):
    spec, job_client = running
    build_services.cancel_build(build=build)
    response = job_client.post(job_url(spec["id"], "heartbeat"), {}, format="json")
    assert response.json() == {"state": "canceling", "cancel": True, "timeout": False}


@pytest.mark.django_db
def test_heartbeat_with_a_bad_body_is_422(running, build):
    spec, job_client = running
    response = job_client.post(job_url(spec["id"], "heartbeat"), {"timing_out": "maybe"}, format="json")
    error = assert_error(response, 422, "validation_failed")
    assert set(error["fields"]) == {"timing_out"}
    assert job_of(build, "a").state == J.RUNNING


# ===================================================================== finish


@pytest.mark.django_db
def test_finish_with_exit_0_passes_and_schedules_the_next_job(running, build):
    spec, job_client = running

    response = finish(job_client, spec["id"], exit_code=0)

    assert response.status_code == 200
    assert response.json() == ended("passed")
    a, b = job_of(build, "a"), job_of(build, "b")
    assert (a.state, a.exit_code, a.error_code, a.signal) == (J.PASSED, 0, None, None)
    assert a.finished_at is not None
    assert b.state == J.SCHEDULED and b.scheduled_at == a.finished_at
    build.refresh_from_db()
    assert (build.state, build.finished_at) == (BuildState.RUNNING, None)


@pytest.mark.django_db
def test_the_whole_build_passes_through_the_agent_api(session, running, build):
    spec_a, client_a = running
    finish(client_a, spec_a["id"], exit_code=0)
    spec_b, client_b = claim(session)
    start(client_b, spec_b["id"])

    assert finish(client_b, spec_b["id"], exit_code=0).json()["state"] == "passed"

    build.refresh_from_db()
    assert build.state == BuildState.PASSED
    assert build.finished_at == job_of(build, "b").finished_at


@pytest.mark.django_db
def test_finish_with_exit_3_fails_and_skips_dependents(running, build):
    spec, job_client = running

    response = finish(job_client, spec["id"], exit_code=3)

    assert response.json() == ended("failed")
    a, b = job_of(build, "a"), job_of(build, "b")
    assert (a.state, a.exit_code, a.error_code) == (J.FAILED, 3, None)
    assert b.state == J.SKIPPED
    build.refresh_from_db()
    assert build.state == BuildState.FAILED
    assert build.finished_at == a.finished_at


@pytest.mark.django_db
@pytest.mark.parametrize("report", [{"exit_code": 0}, {"exit_code": 143, "signal": 15}, {"exit_code": 1},
                                    {"exit_code": None, "outcome": "canceled"}])
def test_a_canceling_job_ends_canceled_whatever_the_exit(running, build, report):
    spec, job_client = running
    build_services.cancel_build(build=build)

    response = finish(job_client, spec["id"], **report)

    assert response.json() == ended("canceled")
    a = job_of(build, "a")
    assert (a.state, a.exit_code, a.error_code) == (J.CANCELED, report["exit_code"], None)
    assert job_of(build, "b").state == J.CANCELED
    build.refresh_from_db()
    assert build.state == BuildState.CANCELED
    assert build.finished_at == a.finished_at


@pytest.mark.django_db
def test_outcome_timed_out_ends_timed_out(running, build):
    spec, job_client = running

    response = finish(job_client, spec["id"], exit_code=137, signal=9, outcome="timed_out")

    assert response.json()["state"] == "timed_out"
    a = job_of(build, "a")
    assert (a.state, a.exit_code, a.signal, a.error_code) == (J.TIMED_OUT, 137, 9, "job_timeout")
    assert str(a.timeout_seconds) in a.error_message
    assert job_of(build, "b").state == J.SKIPPED
    build.refresh_from_db()
    assert build.state == BuildState.FAILED


@pytest.mark.django_db
def test_a_timing_out_job_ends_timed_out_even_with_exit_0(running, build):
    spec, job_client = running
    job_client.post(job_url(spec["id"], "heartbeat"), {"timing_out": True}, format="json")

    assert finish(job_client, spec["id"], exit_code=0).json()["state"] == "timed_out"
    assert job_of(build, "a").error_code == "job_timeout"


@pytest.mark.django_db
def test_a_stop_the_agent_decided_on_its_own_fails_the_job(running, build):
    spec, job_client = running

    response = finish(job_client, spec["id"], exit_code=143, signal=15, outcome="canceled")

    assert response.json()["state"] == "failed"
    a = job_of(build, "a")
    assert (a.state, a.error_code, a.exit_code, a.signal) == (J.FAILED, "agent_stopped", 143, 15)
    build.refresh_from_db()
    assert build.state == BuildState.FAILED


@pytest.mark.django_db
def test_workspace_unavailable_fails_the_job_before_it_starts(session, build):
    spec, job_client = claim(session)

    response = finish(job_client, spec["id"], exit_code=None, error_code="workspace_unavailable",
                      error_message="parent workspace download failed: 404")

    assert response.json()["state"] == "failed"
    a = job_of(build, "a")
    assert (a.state, a.exit_code, a.error_code, a.error_message) == (
        J.FAILED, None, "workspace_unavailable", "parent workspace download failed: 404")
    assert job_of(build, "b").state == J.SKIPPED


@pytest.mark.django_db
def test_a_retried_finish_is_a_200_no_op(running, build):
    spec, job_client = running
    assert finish(job_client, spec["id"], exit_code=0).json()["state"] == "passed"
    first = job_of(build, "a")

    # The retry (even one that says something else) changes nothing.
    response = finish(job_client, spec["id"], exit_code=1)

    assert response.status_code == 200
    assert response.json() == ended("passed")
    again = job_of(build, "a")
    assert (again.state, again.exit_code, again.finished_at) == (J.PASSED, 0, first.finished_at)
    assert job_of(build, "b").state == J.SCHEDULED


@pytest.mark.django_db
def test_finish_stores_the_log_tail_sent_with_it(running, build):
    spec, job_client = running
    send_logs(job_client, spec["id"], [chunk(1, "building\n")])

    response = finish(job_client, spec["id"], exit_code=0,
                      chunks=[chunk(1, "building\n"), chunk(2, "done\n"), chunk(3, "exit status 0\n", 2)])

    assert response.json() == ended("passed")
    assert stored_log(spec["id"]) == [(1, 0, "building\n"), (2, 0, "done\n"), (3, 2, "exit status 0\n")]


@pytest.mark.django_db
def test_a_log_tail_past_the_limit_is_cut_with_the_finish(running, build, settings):
    settings.JOB_LOG_LIMIT_BYTES = 100
    spec, job_client = running
    forty = "x" * 39 + "\n"
    send_logs(job_client, spec["id"], [chunk(1, forty), chunk(2, forty)])

    response = finish(job_client, spec["id"], exit_code=0, chunks=[chunk(2, forty), chunk(3, forty), chunk(4, "z")])

    assert response.json() == ended("passed")
    log = stored_log(spec["id"])
    assert [(seq, kind) for seq, kind, _ in log] == [(1, 0), (2, 0), (3, 2)]
    assert "log limit of 100 bytes" in log[2][2]
    a = job_of(build, "a")
    assert (a.state, a.log_truncated) == (J.PASSED, True)
    assert a.log_bytes == sum(len(content.encode()) for _, _, content in log)


@pytest.mark.django_db
def test_finish_with_claim_next_hands_the_agent_its_next_job(session, running, build):
    spec, job_client = running

    response = finish(job_client, spec["id"], exit_code=0, claim_next=True)

    assert response.status_code == 200
    body = response.json()
    following = body.pop("next")
    assert body == ended("passed")
    assert set(following) == {"job", "job_token"}
    assert set(following["job"]) == SPEC_KEYS
    b = job_of(build, "b")
    assert (following["job"]["id"], following["job"]["step_key"]) == (str(b.pk), "b")
    assert (b.state, b.agent_id) == (J.ASSIGNED, session.agent.pk)
    assert b.credential_hash == hash_secret(following["job_token"])
    # The credential it hands over works like a claim's.
    assert start(bearer(following["job_token"]), b.pk) == {"state": "running", "cancel": False, "timeout": False}


@pytest.mark.django_db
def test_finish_with_claim_next_and_nothing_waiting_says_so(running, build):
    spec, job_client = running

    response = finish(job_client, spec["id"], exit_code=3, claim_next=True)  # b is skipped

    assert response.json() == {**ended("failed"), "next": None}
    assert job_states(build) == {"a": J.FAILED, "b": J.SKIPPED}


@pytest.mark.django_db
def test_a_retried_finish_claims_no_second_job(session, running, build, pipeline):
    spec, job_client = running
    assert finish(job_client, spec["id"], exit_code=0, claim_next=True).json()["next"]["job"]["step_key"] == "b"
    other = make_build(pipeline)  # another job is waiting

    # The first answer got lost; the agent sends its report again.
    response = finish(job_client, spec["id"], exit_code=0, claim_next=True)

    assert response.json() == ended("passed")  # no `next`: the agent claims as usual
    assert job_states(build) == {"a": J.PASSED, "b": J.ASSIGNED}
    assert job_states(other) == {"a": J.SCHEDULED, "b": J.PENDING}


@pytest.mark.django_db
def test_a_retried_finish_with_its_claim_key_gets_the_job_its_first_attempt_claimed(session, running, build,
                                                                                     pipeline):
    spec, job_client = running
    first = finish(job_client, spec["id"], exit_code=0, claim_next=True, claim_key="k1").json()["next"]
    other = make_build(pipeline)  # another job is waiting

    # The first answer got lost; the agent sends the same report again.
    again = finish(job_client, spec["id"], exit_code=0, claim_next=True, claim_key="k1").json()["next"]

    assert again["job"] == first["job"]
    assert again["job_token"] != first["job_token"]  # the lost one no longer works
    b = job_of(build, "b")
    assert b.credential_hash == hash_secret(again["job_token"])
    assert bearer(first["job_token"]).post(job_url(b.pk, "start")).status_code == 401
    assert start(bearer(again["job_token"]), b.pk)["state"] == "running"
    assert job_states(other) == {"a": J.SCHEDULED, "b": J.PENDING}


@pytest.mark.django_db
def test_a_claim_retried_with_its_key_gets_the_same_job(session, pipeline):
    build = make_build(pipeline, pipeline_ir=parallel_ir(3))

    first = session.post(f"{AGENT}/claim", {"claim_key": "retry-me"}, format="json").json()
    again = session.post(f"{AGENT}/claim", {"claim_key": "retry-me"}, format="json").json()
    fresh = session.post(f"{AGENT}/claim", {"claim_key": "another"}, format="json").json()

    assert again["job"]["id"] == first["job"]["id"] != fresh["job"]["id"]
    assert bearer(first["job_token"]).post(job_url(first["job"]["id"], "start")).status_code == 401
    assert start(bearer(again["job_token"]), again["job"]["id"])["state"] == "running"
    assert sorted(job_states(build).values()) == [J.ASSIGNED, J.RUNNING, J.SCHEDULED]
    # Once started, the key no longer re-answers: a late duplicate takes the next job.
    late = session.post(f"{AGENT}/claim", {"claim_key": "retry-me"}, format="json").json()
    assert late["job"]["id"] not in (first["job"]["id"], fresh["job"]["id"])


@pytest.mark.django_db
def test_another_agents_claim_key_takes_a_job_of_its_own(session, agent_token, pipeline):
    build = make_build(pipeline, pipeline_ir=parallel_ir(2))
    mine = session.post(f"{AGENT}/claim", {"claim_key": "shared"}, format="json").json()
    other = bearer(register(agent_token.raw, name="runner-2").json()["session_token"])

    theirs = other.post(f"{AGENT}/claim", {"claim_key": "shared"}, format="json").json()

    assert theirs["job"]["id"] != mine["job"]["id"]
    assert sorted(job_states(build).values()) == [J.ASSIGNED, J.ASSIGNED]


@pytest.mark.django_db
@pytest.mark.parametrize("key", ["has space", "x" * 65, "new\nline", ""])
def test_a_malformed_claim_key_is_422_and_claims_nothing(session, build, key):
    error = assert_error(session.post(f"{AGENT}/claim", {"claim_key": key}, format="json"), 422, "validation_failed")

    assert set(error["fields"]) == {"claim_key"}
    assert job_states(build) == {"a": J.SCHEDULED, "b": J.PENDING}


@pytest.mark.django_db
def test_a_stopped_agent_gets_no_next_job(session, running, build):
    spec, job_client = running
    assert session.post(f"{AGENT}/disconnect").status_code == 204

    response = finish(job_client, spec["id"], exit_code=0, claim_next=True)

    assert response.json() == {**ended("passed"), "next": None}
    assert job_states(build) == {"a": J.PASSED, "b": J.SCHEDULED}


@pytest.mark.django_db
def test_finish_with_a_bad_claim_next_is_422_and_changes_nothing(running, build):
    spec, job_client = running

    error = assert_error(finish(job_client, spec["id"], exit_code=0, claim_next="maybe"), 422, "validation_failed")

    assert set(error["fields"]) == {"claim_next"}
    assert job_states(build) == {"a": J.RUNNING, "b": J.PENDING}


@pytest.mark.django_db
def test_finish_with_an_invalid_log_tail_is_422_and_changes_nothing(running, build):
    spec, job_client = running

    response = finish(job_client, spec["id"], exit_code=0, chunks=[chunk(1, "ok\n"), {**chunk(2, "x"), "seq": 0}])

    error = assert_error(response, 422, "validation_failed")
    assert list(error["fields"]) == ["chunks.1.seq"]
    assert not LogChunk.objects.exists()
    assert job_of(build, "a").state == J.RUNNING


@pytest.mark.django_db
def test_the_signal_is_recorded(running, build):
    spec, job_client = running
    finish(job_client, spec["id"], exit_code=130, signal=2)
    a = job_of(build, "a")
    assert (a.state, a.exit_code, a.signal) == (J.FAILED, 130, 2)


@pytest.mark.django_db
@pytest.mark.parametrize("body,field", [
    ({"exit_code": "zero"}, "exit_code"), ({"exit_code": 70000}, "exit_code"), ({"signal": 0}, "signal"),
    ({"outcome": "passed"}, "outcome"), ({"error_code": "oops"}, "error_code"),
    ({"error_message": "x" * 2001}, "error_message"),
])
def test_finish_with_a_bad_body_is_422_and_changes_nothing(running, build, body, field):
    spec, job_client = running
    error = assert_error(finish(job_client, spec["id"], **body), 422, "validation_failed")
    assert set(error["fields"]) == {field}
    a = job_of(build, "a")
    assert (a.state, a.finished_at) == (J.RUNNING, None)


# ===================================================================== workspaces


@pytest.fixture
def media(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path
    return tmp_path


def download(response) -> bytes:
    try:
        return b"".join(response.streaming_content)
    finally:
        response.close()


@pytest.mark.django_db
def test_a_parents_workspace_reaches_its_builds_in_child(media, session, running, build):
    spec_a, client_a = running
    archive = tarball({"out/app.bin": b"\x00\x01built"})

    response = client_a.put(job_url(spec_a["id"], "workspace"), archive, content_type="application/gzip")

    assert response.status_code == 204
    a = job_of(build, "a")
    assert (media / a.workspace_archive.name).read_bytes() == archive
    finish(client_a, spec_a["id"], exit_code=0)
    spec_b, client_b = claim(session)
    got = client_b.get(spec_b["parent_workspace_path"])
    assert got.status_code == 200
    assert got["Content-Type"] == "application/gzip"
    assert download(got) == archive


@pytest.mark.django_db
def test_a_second_upload_replaces_the_first(media, running, build):
    spec, job_client = running
    job_client.put(job_url(spec["id"], "workspace"), b"first", content_type="application/gzip")
    job_client.put(job_url(spec["id"], "workspace"), b"second", content_type="application/gzip")

    a = job_of(build, "a")
    assert a.workspace_archive.read() == b"second"
    a.workspace_archive.close()
    assert [p.name for p in (media / "workspaces").iterdir()] == [a.workspace_archive.name.split("/")[-1]]


@pytest.mark.django_db
def test_parent_workspace_of_a_root_job_is_404(media, running):
    spec, job_client = running
    assert_error(job_client.get(job_url(spec["id"], "parent-workspace")), 404, "workspace_not_found")


@pytest.mark.django_db
def test_parent_workspace_when_the_parent_uploaded_none_is_404(media, session, running):
    spec_a, client_a = running
    finish(client_a, spec_a["id"], exit_code=0)
    spec_b, client_b = claim(session)
    assert_error(client_b.get(spec_b["parent_workspace_path"]), 404, "workspace_not_found")


@pytest.mark.django_db
def test_workspace_upload_after_the_job_finished_is_409(media, running, build):
    spec, job_client = running
    finish(job_client, spec["id"], exit_code=0)

    response = job_client.put(job_url(spec["id"], "workspace"), b"late", content_type="application/gzip")

    assert_error(response, 409, "job_not_active")
    assert not job_of(build, "a").workspace_archive
    assert not (media / "workspaces").exists()


@pytest.mark.django_db
def test_empty_workspace_upload_is_422(media, running, build):
    spec, job_client = running
    response = job_client.put(job_url(spec["id"], "workspace"), b"", content_type="application/gzip")
    assert_error(response, 422, "validation_failed")
    assert not job_of(build, "a").workspace_archive


@pytest.mark.django_db
def test_workspace_upload_as_json_is_415(media, running, build):
    spec, job_client = running
    response = job_client.put(job_url(spec["id"], "workspace"), {"a": 1}, format="json")
    assert_error(response, 415, "unsupported_media_type")
    assert not job_of(build, "a").workspace_archive


# ===================================================================== filesystem snapshots


@pytest.mark.django_db
def test_a_parents_snapshot_reaches_its_builds_in_child(media, session, running, build, settings):
    spec_a, client_a = running
    image = b"docker-archive " * 1000
    assert spec_a["snapshot_upload"] == {"path": job_url(spec_a["id"], "snapshot"),
                                         "max_bytes": settings.SNAPSHOT_MAX_BYTES}

    response = client_a.put(spec_a["snapshot_upload"]["path"], image, content_type="application/x-tar")

    assert response.status_code == 204
    a = job_of(build, "a")
    assert a.snapshot_image.name == f"snapshots/{a.pk}.tar"
    assert (media / a.snapshot_image.name).read_bytes() == image
    finish(client_a, spec_a["id"], exit_code=0)
    spec_b, client_b = claim(session)
    assert spec_b["parent_snapshot"] == {"job_id": str(a.pk), "path": job_url(spec_b["id"], "parent-snapshot")}
    assert spec_b["snapshot_upload"] is None  # b has no builds_in children
    got = client_b.get(spec_b["parent_snapshot"]["path"])
    assert got.status_code == 200
    assert (got["Content-Type"], got["Content-Length"]) == ("application/x-tar", str(len(image)))
    assert download(got) == image


@pytest.mark.django_db
def test_a_second_snapshot_replaces_the_first(media, running, build):
    spec, job_client = running
    job_client.put(job_url(spec["id"], "snapshot"), b"first", content_type="application/x-tar")
    job_client.put(job_url(spec["id"], "snapshot"), b"second", content_type="application/x-tar")

    a = job_of(build, "a")
    assert a.snapshot_image.read() == b"second"
    a.snapshot_image.close()
    assert [p.name for p in (media / "snapshots").iterdir()] == [a.snapshot_image.name.split("/")[-1]]


@pytest.mark.django_db
def test_a_snapshot_over_its_limit_is_413_and_not_stored(media, running, build, settings):
    settings.SNAPSHOT_MAX_BYTES = 1024
    spec, job_client = running

    announced = job_client.put(job_url(spec["id"], "snapshot"), b"x" * 1025, content_type="application/x-tar")
    # Without a Content-Length (chunked), counted as it is read: the service stops at the limit.
    with pytest.raises(ApiError) as read:
        build_services.store_snapshot(job=job_of(build, "a"), content=io.BytesIO(b"x" * 5000))

    assert_error(announced, 413, "payload_too_large")
    assert read.value.code == "snapshot_too_large" and read.value.status == 413
    assert not job_of(build, "a").snapshot_image
    assert not (media / "snapshots").exists() or not list((media / "snapshots").iterdir())


@pytest.mark.django_db
def test_parent_snapshot_of_a_root_job_is_404(media, running):
    spec, job_client = running
    assert spec["parent_snapshot"] is None
    assert_error(job_client.get(job_url(spec["id"], "parent-snapshot")), 404, "snapshot_not_found")


@pytest.mark.django_db
def test_parent_snapshot_when_the_parent_uploaded_none_is_404(media, session, running):
    # The parent ran on a host executor: its child, in a container, starts from its step's image.
    spec_a, client_a = running
    finish(client_a, spec_a["id"], exit_code=0)
    spec_b, client_b = claim(session)
    assert_error(client_b.get(spec_b["parent_snapshot"]["path"]), 404, "snapshot_not_found")


@pytest.mark.django_db
def test_snapshot_upload_after_the_job_finished_is_409(media, running, build):
    spec, job_client = running
    finish(job_client, spec["id"], exit_code=0)

    response = job_client.put(job_url(spec["id"], "snapshot"), b"late", content_type="application/x-tar")

    assert_error(response, 409, "job_not_active")
    assert not job_of(build, "a").snapshot_image
    assert not (media / "snapshots").exists()


@pytest.mark.django_db
def test_empty_snapshot_upload_is_422(media, running, build):
    spec, job_client = running
    response = job_client.put(job_url(spec["id"], "snapshot"), b"", content_type="application/x-tar")
    assert_error(response, 422, "validation_failed")
    assert not job_of(build, "a").snapshot_image


@pytest.mark.django_db
def test_a_container_that_could_not_start_fails_the_job_image_unavailable(running, build):
    spec, job_client = running

    response = job_client.post(job_url(spec["id"], "finish"), {
        "exit_code": None, "error_code": "image_unavailable",
        "error_message": "Error: initializing source docker://localhost/nope:1: connection refused"}, format="json")

    assert response.status_code == 200, response.content
    a = job_of(build, "a")
    assert (a.state, a.error_code, a.exit_code) == (J.FAILED, "image_unavailable", None)
    assert a.error_message.startswith("Error: initializing source")


# ===================================================================== build source


@pytest.fixture
def source_build(media, pipeline):
    archive = tarball({"Makefile": b"all:\n\ttrue\n"})
    build = make_build(pipeline, source_b64=base64.b64encode(archive).decode())
    build.archive = archive  # type: ignore[attr-defined]
    return build


@pytest.mark.django_db
def test_source_download_with_the_builds_job_credential(session, source_build):
    spec, job_client = claim(session)
    assert spec["source"]["kind"] == "archive"
    assert spec["source"]["path"] == source_url(source_build.id)

    response = job_client.get(spec["source"]["path"])

    assert response.status_code == 200
    assert response["Content-Type"] == "application/gzip"
    assert download(response) == source_build.archive


def source_refused(response) -> None:  # noqa: ANN001
    """The source route's one refusal: 404 `source_not_found`, type `not_found`, no archive."""
    error = assert_error(response, 404, "source_not_found")
    assert error["type"] == "not_found" and "fields" not in error


@pytest.mark.django_db
def test_source_of_another_build_is_404_source_not_found(session, source_build, pipeline):
    other = make_build(pipeline, source_b64=base64.b64encode(b"other source").decode())
    spec, job_client = claim(session)
    assert spec["build_id"] == str(source_build.id)

    source_refused(job_client.get(source_url(other.id)))


@pytest.mark.django_db
@pytest.mark.parametrize("build_id", [uuid.uuid4(), "not-a-uuid"])
def test_source_of_an_unknown_build_is_404_source_not_found(session, source_build, build_id):
    spec, job_client = claim(session)
    before = Job.objects.values_list("state", "last_heartbeat_at").get(pk=spec["id"])

    source_refused(job_client.get(source_url(build_id)))

    assert Job.objects.values_list("state", "last_heartbeat_at").get(pk=spec["id"]) == before


@pytest.mark.django_db
def test_source_with_a_finished_jobs_credential_is_404(session, source_build):
    spec, job_client = claim(session)
    start(job_client, spec["id"])
    finish(job_client, spec["id"], exit_code=0)

    source_refused(job_client.get(source_url(source_build.id)))


@pytest.mark.django_db
def test_source_without_credential_is_401(anon, api, source_build):
    assert_error(anon.get(source_url(source_build.id)), 401, "unauthorized")
    assert_error(api.get(source_url(source_build.id)), 401, "unauthorized")


@pytest.mark.django_db
def test_source_of_a_build_without_one_is_404(session, build):
    _, job_client = claim(session)
    source_refused(job_client.get(source_url(build.id)))


# ===================================================================== the agents list


def agents_url(org_slug: str) -> str:
    return f"/api/v0/organizations/{org_slug}/agents"


@pytest.mark.django_db
def test_agents_list_shows_each_agents_connection_and_current_job(api, org, agent_token, build, settings):
    connected = bearer(register(agent_token.raw, name="busy", hostname="h1", version="1.0", os="linux")
                       .json()["session_token"])
    register(agent_token.raw, name="quiet", hostname="h2", version="1.1")
    stopped = bearer(register(agent_token.raw, name="gone", hostname="h3", version="1.2").json()["session_token"])
    spec, _ = claim(connected)
    assert stopped.post(f"{AGENT}/disconnect").status_code == 204
    now = timezone.now()
    # Silent past the heartbeat timeout and the longest a claim is held.
    Agent.objects.filter(name="quiet").update(
        last_seen_at=now - timedelta(seconds=settings.AGENT_HEARTBEAT_TIMEOUT_SECONDS + MAX_CLAIM_WAIT_SECONDS + 5))
    Agent.objects.filter(name="gone").update(last_seen_at=now - timedelta(seconds=1))

    response = api.get(agents_url(org.slug))

    assert response.status_code == 200
    agents = {agent.name: agent for agent in Agent.objects.all()}
    row = {name: {"id": str(a.id), "name": a.name, "hostname": a.hostname, "version": a.version, "os": a.os,
                  "tags": {}, "created_at": iso(a.created_at), "last_seen_at": iso(a.last_seen_at)}
           for name, a in agents.items()}
    assert response.json() == {"data": [  # newest registered first
        {**row["gone"], "connection_state": "stopped", "current_job": None},
        {**row["quiet"], "connection_state": "lost", "current_job": None},
        {**row["busy"], "connection_state": "connected",
         "current_job": {"id": spec["id"], "state": "assigned", "step_key": "a", "build_number": 1,
                         "pipeline_slug": "web-ci"}},
    ], "next_cursor": None}


@pytest.mark.django_db
def test_an_agents_current_job_clears_when_the_job_ends(api, org, running):
    spec, job_client = running
    assert api.get(agents_url(org.slug)).json()["data"][0]["current_job"]["state"] == "running"
    finish(job_client, spec["id"], exit_code=0)
    assert api.get(agents_url(org.slug)).json()["data"][0]["current_job"] is None


@pytest.mark.django_db
def test_agents_list_leaves_out_other_orgs_and_long_gone_agents(api, org, other_org, agent_token):
    make_agent(other_org, name="theirs")
    register(agent_token.raw, name="ours")
    old = make_agent(org, name="last-week")
    Agent.objects.filter(pk=old.pk).update(last_seen_at=timezone.now() - timedelta(days=7))

    assert [row["name"] for row in api.get(agents_url(org.slug)).json()["data"]] == ["ours"]


@pytest.mark.django_db
def test_members_may_list_agents_but_strangers_get_404(member_api, stranger_api, org, agent_token):
    register(agent_token.raw)
    assert len(member_api.get(agents_url(org.slug)).json()["data"]) == 1
    assert_error(stranger_api.get(agents_url(org.slug)), 404, "organization_not_found")


@pytest.mark.django_db
@pytest.mark.parametrize("count", [1, 10])
def test_agents_list_costs_the_same_queries_for_1_and_10_agents(api, owner, org, pipeline, count,
                                                                 django_assert_num_queries):
    token = org_services.create_agent_token(organization=org).token
    for i in range(count):
        agent = make_agent(org, name=f"runner-{i}", token=token)
        make_build(pipeline)
        assert build_services.claim_job(agent=agent) is not None
    ApiToken.objects.filter(user=owner).update(last_used_at=timezone.now())  # authenticating won't write

    # token + membership, the agents, their active jobs (with build and pipeline)
    with django_assert_num_queries(4):
        response = api.get(agents_url(org.slug))

    assert len(response.json()["data"]) == count
    assert all(row["current_job"] is not None for row in response.json()["data"])


# ===================================================================== the hand-written fast paths
#
# Agent requests look their credential up, claim and load jobs with SQL written out, and
# check chunk lists and finish reports by hand. These hold each one equal to the ORM or
# serializer path it stands in for.


def loaded_fields(instance) -> dict[str, Any]:
    deferred = instance.get_deferred_fields()
    return {f.attname: getattr(instance, f.attname) for f in type(instance)._meta.concrete_fields
            if f.attname not in deferred}


@pytest.mark.django_db
def test_the_job_credential_loads_what_the_orm_would(running, session, build):
    spec, job_client = running
    raw = job_client.raw_token

    job = selectors.job_for_credential(raw)

    fields = loaded_fields(job)
    assert set(fields) >= {"id", "build_id", "organization_id", "kind", "state", "timeout_seconds", "agent_id"}
    assert fields == {name: getattr(Job.objects.get(pk=spec["id"]), name) for name in fields}
    assert (job.agent_seen_recently, job.agent_serving, job.build_started) == (True, True, True)
    Agent.objects.filter(pk=session.agent.pk).update(last_seen_at=T0, stopped_at=T0)
    Build.objects.filter(pk=build.pk).update(started_at=None)
    again = selectors.job_for_credential(raw)
    assert (again.agent_seen_recently, again.agent_serving, again.build_started) == (False, False, False)
    assert selectors.job_for_credential(raw + "x") is None


@pytest.mark.django_db
def test_a_refused_session_leaves_the_agents_last_seen_time_alone(session):
    Agent.objects.filter(pk=session.agent.pk).update(last_seen_at=T0, stopped_at=T0)
    assert selectors.agent_for_session(session.raw_token) is None
    Agent.objects.filter(pk=session.agent.pk).update(stopped_at=None)
    AgentToken.objects.filter(pk=session.agent.token_id).update(revoked_at=timezone.now())
    assert selectors.agent_for_session(session.raw_token) is None

    assert Agent.objects.get(pk=session.agent.pk).last_seen_at == T0


@pytest.mark.django_db
def test_the_agent_session_loads_what_the_orm_would(session):
    agent = selectors.agent_for_session(session.raw_token)

    fields = loaded_fields(agent)
    assert set(fields) == {"id", "organization_id", "name", "last_seen_at", "tags"}
    assert fields == {name: getattr(Agent.objects.get(pk=session.agent.pk), name) for name in fields}


@pytest.mark.django_db
def test_a_claimed_job_has_what_the_orm_loads(org, pipeline, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path
    build = make_build(pipeline, pipeline_ir=parallel_ir(2), env={"FOO": "bar"}, source_url="https://x.test/s.tgz",
                       source_sha256="ab" * 32)

    claim = build_services.claim_job(agent=make_agent(org))

    job = Job.objects.select_related("build", "build__pipeline").get(pk=claim.job.pk)
    assert loaded_fields(claim.job) == {name: getattr(job, name) for name in loaded_fields(claim.job)}
    assert {"env", "command", "step_key", "image", "timeout_seconds"} <= set(loaded_fields(claim.job))
    # The build as the claim read it: scheduled, and running once the claim has marked it so.
    assert (claim.job.build.state, job.build.state) == (BuildState.SCHEDULED, BuildState.RUNNING)
    job.build.state = BuildState.SCHEDULED
    for ours, theirs in ((claim.job.build, job.build), (claim.job.build.pipeline, job.build.pipeline)):
        assert loaded_fields(ours) == {name: getattr(theirs, name) for name in loaded_fields(ours)}
    assert claim.job.build.pk == build.pk
    # Whatever the spec does not read loads on first use.
    assert claim.job.build.message == build.message and claim.job.build.pipeline.name == pipeline.name


@pytest.mark.parametrize("ts", [0, 1_736_164_800_123_456_789, 2**63 - 1])
def test_checked_chunks_are_what_the_serializer_makes_of_them(ts):
    from builds.agent_serializers import LogsRequest, plain_chunks

    body = {"chunks": [{"seq": 1, "stream_kind": 0, "content": "a\n", "ts": ts},
                       {"seq": 2**31 - 1, "stream_kind": 2, "content": "", "ts": ts, "extra": 1}]}
    serializer = LogsRequest(data=body)
    assert serializer.is_valid(), serializer.errors

    assert plain_chunks(body["chunks"]) == [build_services.ChunkIn(**c) for c in serializer.validated_data["chunks"]]


@pytest.mark.parametrize(("sent", "stored"), [
    ("2025-01-06T12:00:00Z", 1_736_164_800_000_000_000),
    ("2025-01-06T12:00:00.123456+02:00", 1_736_157_600_123_456_000),
    ("2025-01-06 12:00", 1_736_164_800_000_000_000),
])
def test_an_iso_timestamp_from_an_older_agent_is_stored_in_nanoseconds(sent, stored):
    from builds.agent_serializers import LogsRequest, plain_chunks

    body = {"chunks": [{"seq": 1, "stream_kind": 0, "content": "a\n", "ts": sent}]}
    serializer = LogsRequest(data=body)
    assert serializer.is_valid(), serializer.errors
    assert serializer.validated_data["chunks"][0]["ts"] == stored
    assert plain_chunks(body["chunks"]) is None  # strings take the serializer's way


@pytest.mark.parametrize("ts", [-1, 2**63, True, 1.5, "soon", None])
def test_a_timestamp_that_is_no_nanosecond_count_or_time_is_422(ts):
    from builds.agent_serializers import LogsRequest

    serializer = LogsRequest(data={"chunks": [{"seq": 1, "stream_kind": 0, "content": "a\n", "ts": ts}]})
    assert not serializer.is_valid()
    assert "ts" in serializer.errors["chunks"][0]


@pytest.mark.parametrize("body", [
    {"exit_code": 0}, {"exit_code": -1, "signal": 255, "outcome": "timed_out"}, {"exit_code": None},
    {"outcome": "canceled", "error_message": ""}, {"error_code": "workspace_unavailable", "error_message": "no"},
    {"exit_code": 65535, "claim_next": True}, {}, {"exit_code": 0, "claim_next": True, "claim_key": "a" * 64},
    {"claim_next": True, "claim_key": None},
    {"exit_code": 0, "started": {"agent_name": "a1", "elapsed_seconds": 0.25}},
    {"exit_code": 0, "started": {"commit": "c" * 40, "elapsed_seconds": 3}}, {"exit_code": 0, "started": None},
])
def test_checked_finish_reports_are_what_the_serializer_makes_of_them(body):
    from builds.agent_serializers import REPORT_FIELDS, FinishRequest, plain_finish, started_report

    serializer = FinishRequest(data=body)
    assert serializer.is_valid(), serializer.errors
    data = serializer.validated_data

    started = None if data.get("started") is None else started_report(data["started"])
    assert plain_finish(body) == {"chunks": [], "claim_next": data["claim_next"], "claim_key": data.get("claim_key"),
                                  **{name: data.get(name) for name in REPORT_FIELDS}, "started": started}


@pytest.mark.django_db
@pytest.mark.parametrize("chunks", [
    [{"seq": "3", "stream_kind": "1", "content": "x", "ts": "2025-01-06T12:00:00Z"}],  # strings the serializer takes
    [{"seq": 3, "stream_kind": 1, "content": 5, "ts": "2025-01-06T12:00:00Z"}],
])
def test_chunks_the_checks_leave_to_the_serializer_are_stored_as_it_says(running, chunks):
    spec, job_client = running

    assert send_logs(job_client, spec["id"], chunks).status_code == 200

    assert stored_log(spec["id"]) == [(3, 1, "x" if chunks[0]["content"] == "x" else "5")]


@pytest.mark.parametrize("body", [
    {"wait": 0}, {"wait": 20}, {"wait": 30}, {"wait": 0.5}, {"claim_key": "a" * 64}, {"claim_key": None, "wait": 7},
    {"claim_key": "Ab-_9", "wait": 30.0},
])
def test_checked_claims_are_what_the_serializer_makes_of_them(body):
    from builds.agent_serializers import ClaimAsk, ClaimRequest, plain_claim

    serializer = ClaimRequest(data=body)
    assert serializer.is_valid(), serializer.errors
    assert plain_claim(body) == ClaimAsk(claim_key=serializer.validated_data.get("claim_key"),
                                         wait=serializer.validated_data["wait"])


@pytest.mark.parametrize("body", [
    {"wait": -1}, {"wait": 31}, {"wait": True}, {"wait": float("nan")}, {"wait": float("inf")}, {"wait": None},
    {"wait": "5"}, {"claim_key": "a" * 65}, {"claim_key": "no spaces"}, {"claim_key": 5}, {"claim_key": "k\n"},
    {"wait": 5, "other": 1},
])
def test_claims_the_checks_leave_to_the_serializer(body):
    """Anything but the plain shape goes to ClaimRequest, which words the 422 (or, for `"5"`, `true`, a
    trimmed key, unknown keys, accepts it as it always has)."""
    from builds.agent_serializers import plain_claim

    assert plain_claim(body) is None
