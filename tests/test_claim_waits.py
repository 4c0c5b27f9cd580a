"""Long-poll claims, in process: `wait` on the claim view, the hub that wakes held claims, the hand back,
and what tells the hub (PostgreSQL's triggers and notices, SQLite's poll).

tests/test_claim_waits_e2e.py holds claims on the real ASGI entry point.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from django.utils import timezone

from builds import claim_resumes, claim_waits, services, states
from builds.claim_waits import ClaimHub, Hold, Waiter
from builds.notices import listen_conninfo
from builds.models import Agent, Job, JobState
from organizations import services as org_services
from tests.helpers import AGENT, assert_error, claim, is_postgres, make_build, run_job, two_step_ir

J = JobState
LONG_POLL = {claim_waits.LONG_POLL_META: "1"}


# ------------------------------------------------------------------ the view


@pytest.mark.django_db
def test_a_claim_that_may_wait_and_finds_nothing_tells_the_long_poll_layer_whom_to_hold(session, org):
    response = session.post(f"{AGENT}/claim", {"wait": 12.5, "claim_key": "k" * 16}, format="json", **LONG_POLL)

    assert response.status_code == 204
    hold = Hold.parse(response[claim_waits.HOLD_HEADER])
    assert hold == Hold(org.pk, str(session.agent.pk), 12.5, {"queue": "default"})


@pytest.mark.django_db
def test_the_wait_may_come_in_the_query(session, org):
    response = session.post(f"{AGENT}/claim?wait=3", **LONG_POLL)
    assert response.status_code == 204 and Hold.parse(response[claim_waits.HOLD_HEADER]).wait == 3


@pytest.mark.django_db
def test_no_hold_without_wait_or_outside_the_long_poll_layer(session):
    assert claim_waits.HOLD_HEADER not in session.post(f"{AGENT}/claim", {"wait": 0}, format="json", **LONG_POLL)
    # A WSGI server (or a client sending the header itself to one) holds nothing: plain 204.
    assert claim_waits.HOLD_HEADER not in session.post(f"{AGENT}/claim", {"wait": 5}, format="json")


@pytest.mark.django_db
def test_an_agents_tags_are_in_the_hold(agent_token, org):
    from tests.helpers import bearer, register

    response = register(agent_token.raw, tags={"queue": "arm64", "os": "linux"})
    client = bearer(response.json()["session_token"])
    hold = Hold.parse(client.post(f"{AGENT}/claim", {"wait": 1}, format="json", **LONG_POLL)[claim_waits.HOLD_HEADER])
    assert hold.tags == {"queue": "arm64", "os": "linux"}


@pytest.mark.django_db
@pytest.mark.parametrize("wait", [-1, 30.5, "soon", None, [1]])
def test_a_wait_outside_0_to_30_seconds_is_422_and_claims_nothing(session, build, wait):
    body = assert_error(session.post(f"{AGENT}/claim", {"wait": wait}, format="json"), 422, "validation_failed")
    assert "wait" in body["fields"]
    assert not Job.objects.filter(build=build, state=J.ASSIGNED).exists()


@pytest.mark.django_db
def test_a_bad_wait_in_the_query_is_422(session):
    assert_error(session.post(f"{AGENT}/claim?wait=forever"), 422, "validation_failed")


@pytest.mark.django_db
def test_a_claim_with_wait_that_finds_a_job_answers_it_at_once(session, build):
    response = session.post(f"{AGENT}/claim", {"wait": 30}, format="json", **LONG_POLL)
    assert response.status_code == 200 and response.json()["job"]["step_key"] == "a"
    assert claim_waits.HOLD_HEADER not in response


@pytest.mark.django_db
def test_an_idle_claim_with_wait_is_still_two_queries(session, pipeline, django_assert_num_queries):
    with django_assert_num_queries(2):  # the session, the claim that finds nothing
        response = session.post(f"{AGENT}/claim", {"wait": 20}, format="json", **LONG_POLL)
    assert response.status_code == 204


# ------------------------------------------------------------------ the hub


def hold(org: int = 1, agent: str = "a1", **tags: str) -> Hold:
    return Hold(org, agent, 10, {"queue": "default", **tags})


def in_loop(work: Any) -> Any:
    return asyncio.run(work())


def test_a_claimable_job_wakes_the_oldest_waiter_whose_tags_match_and_only_it():
    async def work() -> list[bool]:
        hub = ClaimHub()
        hub.task, hub.following = asyncio.get_running_loop().create_future(), True  # no listening here
        first, arm, second = Waiter(hold(agent="x"), 0), Waiter(hold(agent="arm", queue="arm64"), 0), Waiter(
            hold(agent="y"), 0)
        for waiter in (first, arm, second):
            hub.add(waiter)
        assert hub.job_claimable(1, {"queue": "default"})
        woken = [w.event.is_set() for w in (first, arm, second)]
        # The next notice goes to the next one not woken yet; a queue nobody serves wakes nobody.
        assert hub.job_claimable(1, {"queue": "default"})
        assert not hub.job_claimable(1, {"queue": "gpu"})
        assert not hub.job_claimable(2, {"queue": "default"})  # another organization's
        assert hub.job_claimable(1, {"queue": "arm*"})
        return woken + [w.event.is_set() for w in (first, arm, second)] + [first.selector == {"queue": "default"}]

    assert in_loop(work) == [True, False, False, True, True, True, True]


def test_a_notice_that_came_during_the_first_attempt_wakes_the_waiter_when_it_is_registered():
    async def work() -> tuple[bool, bool]:
        hub = ClaimHub()
        hub.task, hub.following = asyncio.get_running_loop().create_future(), True
        since = claim_waits.time_now()
        hub.job_claimable(1, {"queue": "default"})  # nobody was waiting yet
        late = Waiter(hold(), since)
        hub.add(late)
        older = Waiter(hold(agent="b"), claim_waits.time_now() + 1)  # began after the notice: not for it
        hub.add(older)
        return late.event.is_set(), older.event.is_set()

    assert in_loop(work) == (True, False)


def test_credentials_news_wakes_the_organizations_or_the_agents_waiters_and_closing_wakes_all():
    async def work() -> list[list[bool]]:
        hub = ClaimHub()
        hub.task, hub.following = asyncio.get_running_loop().create_future(), True
        waiters = [Waiter(hold(1, "a1"), 0), Waiter(hold(1, "a2"), 0), Waiter(hold(2, "b1"), 0)]
        for waiter in waiters:
            hub.add(waiter)
        seen = []
        for payload in ("a a2", "o 2", "x what", "j nope {}"):
            hub.dispatch(payload)
            seen.append([w.event.is_set() for w in waiters])
        hub.close()
        seen.append([w.event.is_set() for w in waiters])
        late = Waiter(hold(3, "c"), 0)
        hub.add(late)  # a claim that starts waiting while the server stops is answered at once
        seen.append([late.event.is_set()])
        hub.remove(late)
        hub.remove(late)  # twice is harmless
        return seen

    assert in_loop(work) == [[False, True, False], [False, True, True], [False, True, True], [False, True, True],
                             [True, True, True], [True]]


def test_a_job_notice_without_a_selector_is_a_default_queue_job():
    async def work() -> tuple[bool, bool]:
        hub = ClaimHub()
        hub.task, hub.following = asyncio.get_running_loop().create_future(), True
        default, arm = Waiter(hold(agent="d"), 0), Waiter(hold(agent="r", queue="arm64"), 0)
        hub.add(arm)
        hub.add(default)
        hub.dispatch("j 1 ")
        return default.event.is_set(), arm.event.is_set()

    assert in_loop(work) == (True, False)


class HeldClaims:
    """Claims held by `hold_claim` in this loop, each attempting against `jobs` (the queue)."""

    def __init__(self) -> None:
        hub = claim_waits.claim_hub()
        hub.task, hub.following = asyncio.get_running_loop().create_future(), True  # no listening here
        self.hub = hub
        self.jobs: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}  # an agent whose next fruitless attempt waits for its gate
        self.answers: dict[str, list[int]] = {}

    def start(self, agent: str) -> asyncio.Task:
        value = claim_waits.hold_value(organization_id=1, agent_id=uuid.uuid4(), wait=5, tags={})
        sent: list[int] = self.answers.setdefault(agent, [])

        async def try_claim() -> claim_waits.Answer:
            await asyncio.sleep(0)
            if self.jobs:
                return claim_waits.Answer(200, [], json.dumps({"job": {"id": self.jobs.pop(0)}}).encode())
            gate = self.gates.pop(agent, None)
            if gate is not None:
                await gate.wait()  # found nothing; news comes before the answer does
            return claim_waits.Answer(204, [(claim_waits.HOLD_HEADER.encode(), value.encode())], b"")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                sent.append(message["status"])

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()  # the client stays
            return {}

        return asyncio.get_running_loop().create_task(claim_waits.hold_claim(try_claim, receive, send))

    async def until_waiting(self, count: int) -> None:
        while sum(len(queue) for queue in self.hub.waiting.values()) < count:
            await asyncio.sleep(0.001)


def test_one_notice_for_two_jobs_reaches_two_waiters_of_one_process():
    """The waiter that claims passes the notice on to the next one, not back to itself."""
    async def work() -> dict[str, list[int]]:
        claims = HeldClaims()
        tasks = [claims.start("a"), claims.start("b")]
        await claims.until_waiting(2)
        claims.jobs += ["j1", "j2"]  # one transaction: its two identical notices arrive once
        claims.hub.job_claimable(1, {"queue": "default"})
        await asyncio.wait_for(asyncio.gather(*tasks), 2)
        return claims.answers

    assert in_loop(work) == {"a": [200], "b": [200]}


def test_a_notice_that_comes_while_an_attempt_finds_nothing_is_passed_on_after_the_next_claims():
    async def work() -> dict[str, list[int]]:
        claims = HeldClaims()
        tasks = [claims.start("a"), claims.start("b")]
        await claims.until_waiting(2)
        gate = claims.gates["a"] = asyncio.Event()
        a = next(waiter for waiter in claims.hub.waiting[1])
        claims.hub.recheck(agent_id=a.hold.agent_id)  # a tries again, finds nothing, and before it answers...
        while "a" in claims.gates:
            await asyncio.sleep(0.001)
        claims.jobs += ["j1", "j2"]
        claims.hub.job_claimable(1, {"queue": "default"})  # ...two jobs come: the notice wakes a again
        gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 2)
        return claims.answers

    assert in_loop(work) == {"a": [200], "b": [200]}


# ------------------------------------------------------------------ handing a claim back


@pytest.mark.django_db
def test_a_claim_whose_answer_was_lost_goes_back_to_the_queue_in_its_place(session, build):
    before = Job.objects.get(build=build, step_key="a")
    spec, _ = claim(session)

    assert services.hand_back_claim(job_id=uuid.UUID(spec["id"]))

    job = Job.objects.get(pk=spec["id"])
    assert (job.state, job.agent_id, job.credential_hash, job.claim_key, job.assigned_at) == (
        J.SCHEDULED, None, None, None, None)
    assert job.scheduled_at == before.scheduled_at
    again, _ = claim(session)
    assert again["id"] == spec["id"]


@pytest.mark.django_db
def test_a_started_job_is_not_handed_back(session, build):
    from tests.helpers import start

    spec, job_client = claim(session)
    start(job_client, spec["id"])
    assert not services.hand_back_claim(job_id=uuid.UUID(spec["id"]))
    assert Job.objects.get(pk=spec["id"]).state == J.RUNNING
    assert not services.hand_back_claim(job_id=uuid.uuid4())


# ------------------------------------------------------------------ what tells the hub: PostgreSQL


def listener() -> psycopg.Connection:
    conn = psycopg.connect(listen_conninfo(), autocommit=True)
    conn.execute("LISTEN harmont_claims")
    return conn


def notices(conn: psycopg.Connection) -> list[str]:
    return [note.payload for note in conn.notifies(timeout=0.5)]


@pytest.fixture
def pg_listener(transactional_db: None) -> Any:
    if not is_postgres():
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's; SQLite is polled (tests below)")
    conn = listener()
    yield conn
    conn.close()


def test_jobs_inserted_scheduled_notify_once_per_selector(pg_listener, pipeline):
    ir = {"version": "0", "steps": [{"type": "command", "key": f"s{i}", "cmd": "true"} for i in range(5)]
          + [{"type": "command", "key": "arm", "cmd": "true", "agents": {"queue": "arm64"}}]}
    make_build(pipeline, pipeline_ir=ir)

    got = sorted(notices(pg_listener))

    assert [note.split(" ", 2)[:2] for note in got] == [["j", str(pipeline.organization_id)]] * 2
    assert sorted(note.split(" ", 2)[2] for note in got) == [json.dumps({"queue": "arm64"}),
                                                             json.dumps({"queue": "default"})]


def test_a_job_released_by_its_dependency_notifies_and_heartbeats_do_not(pg_listener, pipeline):
    build = make_build(pipeline, pipeline_ir=two_step_ir())
    notices(pg_listener)
    first = Job.objects.get(build=build, step_key="a")
    assert services.move_job(job=first, state=J.ASSIGNED) and services.move_job(job=first, state=J.RUNNING)
    Job.objects.filter(pk=first.pk).update(last_heartbeat_at=timezone.now())
    assert notices(pg_listener) == []

    first.refresh_from_db()
    services.finish_job(job=first, state=J.PASSED, exit_code=0)

    assert notices(pg_listener) == [f"j {pipeline.organization_id} {json.dumps({'queue': 'default'})}"]


def test_a_concurrency_group_job_that_ends_notifies_for_the_groups_waiting_jobs(pg_listener, pipeline):
    steps = [{"type": "command", "key": f"d{i}", "cmd": "deploy", "concurrency_group": "prod", "concurrency": 1}
             for i in range(2)]
    build = make_build(pipeline, pipeline_ir={"version": "0", "steps": steps})
    notices(pg_listener)
    holder = Job.objects.get(build=build, step_key="d0")
    assert services.move_job(job=holder, state=J.ASSIGNED) and services.move_job(job=holder, state=J.RUNNING)
    assert notices(pg_listener) == []
    holder.refresh_from_db()

    services.finish_job(job=holder, state=J.PASSED, exit_code=0)

    assert notices(pg_listener) == [f"j {pipeline.organization_id} {json.dumps({'queue': 'default'})}"]


def test_revoking_a_token_and_disconnecting_an_agent_notify(pg_listener, org, agent_token):
    from tests.helpers import register

    agent_id = register(agent_token.raw).json()["agent"]["id"]
    services.disconnect_agent(agent=Agent.objects.get(pk=agent_id))
    services.disconnect_agent(agent=Agent.objects.get(pk=agent_id))  # already stopped: nothing new
    org_services.revoke_agent_token(token=agent_token.token)
    org_services.revoke_agent_token(token=agent_token.token)

    assert notices(pg_listener) == [f"a {agent_id}", f"o {org.pk}"]


def test_a_notice_is_sent_only_when_its_transaction_commits(pg_listener, org, agent_token):
    from django.db import transaction

    with pytest.raises(RuntimeError):
        with transaction.atomic():
            org_services.revoke_agent_token(token=agent_token.token)
            raise RuntimeError("rolled back")
    assert notices(pg_listener) == []


# ------------------------------------------------------------------ what tells the hub: SQLite's poll


@pytest.mark.django_db
def test_the_poll_reports_scheduled_jobs_freed_groups_and_gone_agents_since_it_last_looked(session, pipeline, org,
                                                                                           agent_token):
    since = timezone.now() - timedelta(seconds=1)
    build = make_build(pipeline, pipeline_ir=two_step_ir())
    steps = [{"type": "command", "key": "d", "cmd": "deploy", "concurrency_group": "prod", "concurrency": 1}]
    grouped = make_build(pipeline, pipeline_ir={"version": "0", "steps": steps})
    run_job(Job.objects.get(build=grouped))
    services.disconnect_agent(agent=session.agent)

    _, news = claim_waits.poll_news([org.pk], since)

    payloads = [payload for _, payload in news]
    first = Job.objects.get(build=build, step_key="a")
    assert (("j", first.pk), f"j {org.pk} {json.dumps({'queue': 'default'})}") in news
    assert f"o {org.pk}" in payloads  # the group's job ended
    assert f"a {session.agent.pk}" in payloads
    assert claim_waits.poll_news([org.pk + 1000], since)[1] == []
    # A job claimed since is no news any more.
    states.transition_jobs([first.pk], to=J.ASSIGNED, now=timezone.now())
    assert ("j", first.pk) not in dict(claim_waits.poll_news([org.pk], since)[1])


# ------------------------------------------------------------------ the held request (a fake app in its place)


def run_claim(app: Any, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`long_poll_claim` over `app` for a client that sends `messages`; what was sent back."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": claim_waits.CLAIM_PATH, "headers": []}
    asyncio.run(claim_waits.long_poll_claim(scope, receive, send, app))
    return sent


def answering(status: int, body: bytes, *, headers: list[tuple[bytes, bytes]] = (), seen: list | None = None,
              delay: float = 0) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = await receive()
        if seen is not None:
            seen.append((dict(scope["headers"]), message["body"]))
        await asyncio.sleep(delay)
        await send({"type": "http.response.start", "status": status, "headers": list(headers)})
        await send({"type": "http.response.body", "body": body})
    return app


def test_an_answer_that_is_not_held_goes_out_as_it_came_with_one_request_id_for_the_attempts():
    seen: list = []
    body = b'{"claim_key": "abc"}'
    sent = run_claim(answering(200, b'{"job": {}}', headers=[(b"content-type", b"application/json")], seen=seen),
                     [{"type": "http.request", "body": body, "more_body": False}])

    assert sent[0] == {"type": "http.response.start", "status": 200,
                       "headers": [(b"content-type", b"application/json")]}
    assert sent[1]["body"] == b'{"job": {}}'
    headers, got = seen[0]
    assert got == body and headers[b"x-harmont-long-poll"] == b"1" and len(headers[b"x-request-id"]) == 32


def test_a_204_whose_wait_is_over_goes_out_without_the_internal_header():
    hold = claim_waits.hold_value(organization_id=1, agent_id=uuid.uuid4(), wait=0.2, tags={})
    sent = run_claim(answering(204, b"", headers=[(claim_waits.HOLD_HEADER.encode(), hold.encode())]),
                     [{"type": "http.request", "body": b"", "more_body": False}])

    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 204 and claim_waits.HOLD_HEADER.encode() not in headers
    assert float(headers[b"harmont-claim-wait"]) >= 0.2


def test_a_job_claimed_for_a_client_that_left_is_handed_back(monkeypatch):
    handed: list[str] = []
    monkeypatch.setattr(claim_waits, "_hand_back", lambda body: handed.append(json.loads(body)["job"]["id"]))

    sent = run_claim(answering(200, json.dumps({"job": {"id": "j-1"}}).encode(), delay=0.1),
                     [{"type": "http.request", "body": b"{}", "more_body": False}, {"type": "http.disconnect"}])

    assert (handed, sent) == (["j-1"], [])


def test_a_body_too_large_to_hold_is_passed_through_whole():
    seen: list = []
    part = b"x" * (claim_waits.MAX_BODY_BYTES + 1)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        got = b""
        while True:
            message = await receive()
            got += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append(got)
        await send({"type": "http.response.start", "status": 413, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent = run_claim(app, [{"type": "http.request", "body": part, "more_body": True},
                           {"type": "http.request", "body": b"tail", "more_body": False}])

    assert seen == [part + b"tail"] and sent[0]["status"] == 413


# ------------------------------------------------------------------ resume keys (builds.claim_resumes)


def listening_since(monkeypatch: pytest.MonkeyPatch, since: float | None) -> None:
    from builds import notices

    monkeypatch.setattr(notices, "listening", lambda: True)
    notices.listener().connected_since = since


def a_resume(session_hash: str = "s" * 64, *, attempted_at: float, ended_at: float) -> claim_resumes.Resume:
    return claim_resumes.Resume(session_hash, claim_waits.Answer(204, [], b""), hold(), attempted_at, ended_at)


def test_a_resume_key_is_good_once_for_its_own_session_within_the_gap(monkeypatch):
    async def work() -> list[bool]:
        now = claim_waits.time_now()
        listening_since(monkeypatch, now - 100)
        book = claim_resumes.ResumeBook()
        resume = a_resume(attempted_at=now - 30, ended_at=now)
        seen = []
        key = book.issue(resume)
        seen.append(book.take(key, "s" * 64) is resume)
        seen.append(book.take(key, "s" * 64) is None)  # spent
        other = book.issue(resume)
        seen.append(book.take(other, "t" * 64) is None)  # another session's token
        seen.append(book.take(other, "s" * 64) is None)  # ...spent it all the same
        seen.append(book.take("made-up", "s" * 64) is None)
        return seen

    assert in_loop(work) == [True, True, True, True, True]


def test_a_resume_key_is_refused_after_the_gap_a_reconnection_or_too_long_without_an_attempt(monkeypatch):
    async def work() -> list[bool]:
        now = claim_waits.time_now()
        listening_since(monkeypatch, now - 1000)
        book = claim_resumes.ResumeBook()
        late = book.issue(a_resume(attempted_at=now - 40, ended_at=now - claim_resumes.GAP_SECONDS - 0.1))
        stale = book.issue(a_resume(attempted_at=now - claim_resumes.MAX_RESUME_SECONDS - 1, ended_at=now))
        fine = book.issue(a_resume(attempted_at=now - 30, ended_at=now))
        reconnected = book.issue(a_resume(attempted_at=now - 30, ended_at=now))
        refused = [book.take(late, "s" * 64) is None, book.take(stale, "s" * 64) is None,
                   book.take(fine, "s" * 64) is not None]
        from builds import notices

        notices.listener().connected_since = now - 10  # listening again since: news may have been missed
        refused.append(book.take(reconnected, "s" * 64) is None)
        refused.append(book.issue(a_resume(attempted_at=now - 30, ended_at=now)) is None)
        notices.listener().connected_since = None
        refused.append(book.issue(a_resume(attempted_at=now, ended_at=now)) is None)  # not listening now
        notices.listener().connected_since = now - 1000
        closing = book.issue(a_resume(attempted_at=now - 30, ended_at=now))
        book.close()  # stopping: no claim is resumed here
        refused += [book.take(closing, "s" * 64) is None, book.issue(a_resume(attempted_at=now, ended_at=now)) is None]
        return refused

    assert in_loop(work) == [True] * 8


def test_keys_are_forgotten_once_their_gap_is_over(monkeypatch):
    async def work() -> int:
        now = claim_waits.time_now()
        listening_since(monkeypatch, now - 1000)
        book = claim_resumes.ResumeBook()
        for ended in range(10):
            book.issue(a_resume(attempted_at=now - 60, ended_at=now - 60 + ended))
        book.issue(a_resume(attempted_at=now - 1, ended_at=now))
        return len(book.issued)

    assert in_loop(work) == 1


def test_sqlite_issues_no_resume_keys():
    async def work() -> str | None:
        now = claim_waits.time_now()
        return claim_resumes.ResumeBook().issue(a_resume(attempted_at=now, ended_at=now))

    if is_postgres():
        pytest.skip("on PostgreSQL the hub listens")
    assert in_loop(work) is None


@pytest.mark.parametrize("body, query, wait", [
    (b'{"wait": 30, "claim_key": "abcdefghijklmnop"}', "", 30),
    (b"", "wait=2.5", 2.5),
    (b'{"claim_key": "abcdefghijklmnop"}', "wait=4", 4),
    (b'{"wait": 0}', "", None),  # no wait: answered at once, by an attempt
    (b'{"wait": 31}', "", None),
    (b'{"wait": "soon"}', "", None),
    (b'{"wait": 5, "extra": 1}', "", None),
    (b"[5]", "", None),
    (b"{", "", None),
    (b"", "wait=later", None),
])
def test_only_a_plain_claim_that_asks_to_wait_may_resume(body, query, wait):
    assert claim_resumes.plain_wait(body, query) == wait


def test_a_notice_about_an_agent_wakes_its_claim_registered_after_it():
    async def work() -> tuple[bool, bool]:
        hub = ClaimHub()
        hub.task, hub.following = asyncio.get_running_loop().create_future(), True
        since = claim_waits.time_now()
        hub.dispatch("a a1")  # its session ended in the gap between two claims
        mine, other = Waiter(hold(agent="a1"), since), Waiter(hold(agent="a2"), since)
        hub.add(mine)
        hub.add(other)
        return mine.event.is_set(), other.event.is_set()

    assert in_loop(work) == (True, False)


@pytest.mark.django_db
def test_resumed_agents_are_seen_in_one_statement_unless_stopped(session, agent_token, django_assert_num_queries):
    from tests.helpers import register

    stopped = Agent.objects.get(pk=register(agent_token.raw).json()["agent"]["id"])
    long_ago = timezone.now() - timedelta(hours=1)
    Agent.objects.filter(pk__in=[session.agent.pk, stopped.pk]).update(last_seen_at=long_ago)
    Agent.objects.filter(pk=stopped.pk).update(stopped_at=timezone.now())

    with django_assert_num_queries(1):
        assert services.mark_agents_seen(agent_ids=[session.agent.pk, stopped.pk]) == 1

    assert Agent.objects.get(pk=session.agent.pk).last_seen_at > long_ago
    assert Agent.objects.get(pk=stopped.pk).last_seen_at == long_ago
