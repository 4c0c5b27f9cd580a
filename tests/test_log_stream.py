"""Live logs: the SSE stream at /v0/jobs/{job_id}/logs?token= (SPEC §8, issue 4).

Every test serves the production entry point, `harmont.asgi:application`, with uvicorn
in a thread (`tests.live`), and reads the stream with a real HTTP client, line by line
as it arrives, while the test writes output through `services.append_log` or the
agent API of the same server. The stream promises: one `history` event first, then
each new chunk once, in seq order, with its seq as the event id; `done` within a
second of the job ending, then the end of the response; resume after an event id;
keep-alive comments in silence; flat JSON errors; one database poll per tick for
all the streams of a process.
"""

from __future__ import annotations

import asyncio
import gc
import http.client
import os
import socket
import threading
import time
import tracemalloc
import uuid
from datetime import datetime, timedelta, timezone as dt_timezone
from typing import Any

import jwt
import pytest
from django.db import OperationalError, connection, connections, transaction
from django.utils import timezone

from builds import notices, services, stream
from builds.models import Build, Job, JobState, LogChunk, StreamKind
from harmont.logtokens import mint_log_token
from organizations import services as org_services
from harmont.timestamps import ns_from_datetime
from tests.helpers import builds_url, is_postgres, make_agent, make_build, parallel_ir
from tests.live import Event, EventStream, LiveServer

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

T0 = datetime(2025, 1, 6, 12, 0, tzinfo=dt_timezone.utc)
OUT, ERR, META = StreamKind.STDOUT, StreamKind.STDERR, StreamKind.META
CORS_ORIGIN = "https://ci.example.com"


# ===================================================================== helpers


def content(job: Job, seq: int) -> str:
    return f"{job.step_key} línea {seq} ✓\n"  # non-ASCII on purpose


def ts(seq: int) -> int:
    """The time of chunk `seq` in Unix nanoseconds, with digits below the microsecond on purpose."""
    return ns_from_datetime(T0 + timedelta(seconds=seq)) + 123_456_789


def chunk(job: Job, seq: int, kind: int = OUT) -> dict[str, Any]:
    """A chunk as the stream must send it."""
    return {"seq": seq, "stream_kind": kind, "content": content(job, seq), "ts": ts(seq)}


def write(job: Job, seqs: range | list[int], kind: int = OUT) -> int:
    return services.append_log(job=job, chunks=[
        services.ChunkIn(seq, kind, content(job, seq), ts(seq)) for seq in seqs])


I64 = range(-2**63, 2**63)


def cli_decode(chunk: Any) -> tuple[int, int, str, int | None]:
    """What `hm`'s client library makes of a chunk (harmont-cloud/src/logs.rs, serde):
    `{seq: i64, stream_kind: i64, content: String, ts: Option<i64>}`; anything else fails to decode."""
    assert isinstance(chunk, dict) and set(chunk) == {"seq", "stream_kind", "content", "ts"}, chunk
    seq, kind, text, when = chunk["seq"], chunk["stream_kind"], chunk["content"], chunk["ts"]
    assert type(seq) is int and seq in I64 and type(kind) is int and kind in I64, chunk
    assert type(text) is str, chunk
    assert when is None or (type(when) is int and when in I64), chunk
    return seq, kind, text, when


def start_jobs(build: Build) -> dict[str, tuple[Job, str]]:
    """Claim and start every scheduled job of `build`: {step key: (job, job credential)}."""
    agent = make_agent(build.pipeline.organization)
    started = {}
    while (claim := services.claim_job(agent=agent)) is not None:
        services.start_job(job=claim.job)
        started[claim.job.step_key] = (claim.job, claim.credential)
    return started


def token_for(build: Build, **kwargs: Any) -> str:
    return mint_log_token(build_id=build.pk, **kwargs).token


def logs_path(job: Job | str, token: str | None, query: str = "") -> str:
    job_id = job.pk if isinstance(job, Job) else job
    return f"/v0/jobs/{job_id}/logs" + (f"?token={token}" if token is not None else "?") + query


def watch(live: LiveServer, job: Job, query: str = "", headers: dict[str, str] | None = None) -> EventStream:
    events = live.stream(logs_path(job, token_for(job.build), query), headers)
    assert events.status == 200, events.body
    return events


def history_frames(events: EventStream) -> list[Event]:
    """The `history` events up to the one marked last, each checked to carry its last seq as id."""
    frames = []
    while True:
        frame = events.next()
        assert frame.event == "history", frame.lines
        chunks = frame.data["chunks"]
        assert set(frame.data) <= {"chunks", "last"}
        assert frame.id == (chunks[-1]["seq"] if chunks else None), frame.lines
        frames.append(frame)
        if frame.data.get("last"):
            return frames


def history_of(events: EventStream) -> list[dict[str, Any]]:
    return [chunk for frame in history_frames(events) for chunk in frame.data["chunks"]]


def until_done(events: EventStream, timeout: float = 5) -> list[dict[str, Any]]:
    """The chunks that come before `done` (each checked to carry its seq as id); then the end."""
    received = []
    while (event := events.next_data_event(timeout)).event != "done":
        assert event.event == "chunk", event.lines
        assert event.id == event.data["seq"], event.lines
        received.append(event.data)
    assert event.data == {} and event.lines == ["event: done", "data: {}"]
    events.wait_closed()
    return received


def seqs(chunks: list[dict[str, Any]]) -> list[int]:
    return [c["seq"] for c in chunks]


@pytest.fixture
def running(build) -> tuple[Job, str]:
    """Job `a` of `build`, running: (job, its agent's job credential)."""
    return start_jobs(build)["a"]


# ===================================================================== history, live chunks, done


def test_history_comes_first_then_live_chunks_then_done(live_asgi, build, running):
    job, _ = running
    write(job, [1, 3], OUT)
    write(job, [2], ERR)

    events = watch(live_asgi, job)
    assert events.headers["Content-Type"].startswith("text/event-stream")
    first = events.next()
    assert first.lines[:2] == ["id: 3", "event: history"] and len(first.lines) == 3
    assert first.data == {"chunks": [chunk(job, 1), chunk(job, 2, ERR), chunk(job, 3)], "last": True}
    events.assert_silent(0.4)  # two ticks: nothing new, nothing sent

    write(job, [4], ERR)
    live = events.next()
    assert live.lines[:2] == ["id: 4", "event: chunk"] and len(live.lines) == 3
    assert live.data == chunk(job, 4, ERR)
    write(job, [5, 6, 7])
    assert [e.data for e in events.chunks(3)] == [chunk(job, 5), chunk(job, 6), chunk(job, 7)]

    services.report_finish(job=job, exit_code=0)
    assert until_done(events) == []


def test_the_cli_decodes_every_chunk_of_history_and_of_chunk_events(live_asgi, build, running):
    job, credential = running
    write(job, [1, 2])
    events = watch(live_asgi, job)
    history = events.next()
    decoded = [cli_decode(c) for c in history.data["chunks"]]
    assert decoded == [(1, OUT, content(job, 1), ts(1)), (2, OUT, content(job, 2), ts(2))]

    # Through the agent API as the agent sends it (an integer of nanoseconds), and as an older
    # agent did (an ISO-8601 string, stored as nanoseconds to the microsecond).
    agent = {"Authorization": f"Bearer {credential}"}
    for seq, sent in ((3, ts(3)), (4, "2025-01-06T12:00:04.654321Z")):
        body = {"chunks": [{"seq": seq, "stream_kind": ERR, "content": "x\n", "ts": sent}]}
        assert live_asgi.request("POST", f"/api/v0/agent/jobs/{job.pk}/logs", body=body, headers=agent).status == 200
    live = [cli_decode(e.data) for e in events.chunks(2)]
    assert live == [(3, ERR, "x\n", ts(3)), (4, ERR, "x\n", ns_from_datetime(T0 + timedelta(seconds=4, microseconds=654321)))]
    # A string, what this server sent before, is what the client cannot decode.
    with pytest.raises(AssertionError):
        cli_decode({"seq": 1, "stream_kind": 0, "content": "", "ts": "2025-01-06T12:00:00.000000Z"})
    services.report_finish(job=job, exit_code=0)
    assert until_done(events) == []


def test_chunks_sent_through_the_agent_api_arrive_once_each_in_order(live_asgi, build, running):
    job, credential = running
    agent = {"Authorization": f"Bearer {credential}"}

    def send(route: str, body: dict[str, Any]) -> dict[str, Any]:
        response = live_asgi.request("POST", f"/api/v0/agent/jobs/{job.pk}/{route}", body=body, headers=agent)
        assert response.status == 200, response.body
        return response.json()

    def batch(*numbers: int) -> list[dict[str, Any]]:
        return [chunk(job, n) for n in numbers]

    send("logs", {"chunks": batch(1)})
    events = watch(live_asgi, job)
    assert history_of(events) == batch(1)

    send("logs", {"chunks": batch(2, 3)})
    send("logs", {"chunks": batch(2, 3)})  # a retried batch
    send("logs", {"chunks": batch(3, 4)})  # overlapping
    assert [e.data for e in events.chunks(3)] == batch(2, 3, 4)
    events.assert_silent(0.4)  # two ticks

    assert send("finish", {"chunks": batch(5, 6), "exit_code": 0})["state"] == "passed"
    assert until_done(events) == batch(5, 6)


def test_several_batches_between_two_ticks_arrive_in_order_without_repeats(live_asgi, build, running):
    job, _ = running
    events = watch(live_asgi, job)
    assert history_of(events) == []

    # Out of order, repeated, all well within one tick (0.2 s).
    write(job, [1, 2, 3])
    write(job, [5, 4])
    write(job, [2, 3, 6])
    write(job, [6])

    assert [e.data for e in events.chunks(6)] == [chunk(job, n) for n in range(1, 7)]
    events.assert_silent(0.4)  # two ticks


def test_history_and_live_chunks_meet_without_gaps_or_repeats_while_a_writer_races(live_asgi, build, running):
    job, _ = running
    total = 150

    def writer() -> None:
        try:
            for first in range(1, total + 1, 3):
                write(job, range(first, first + 3))
                time.sleep(0.003)
        finally:
            connections.close_all()

    thread = threading.Thread(target=writer)
    thread.start()
    watchers = []
    for _ in range(5):  # each joins at another point of the output
        watchers.append(watch(live_asgi, job))
        time.sleep(0.08)
    thread.join()
    services.report_finish(job=job, exit_code=1)

    joined_at = []
    for events in watchers:
        history = history_of(events)
        live = until_done(events)
        assert seqs(history) + seqs(live) == list(range(1, total + 1))
        assert history + live == [chunk(job, n) for n in range(1, total + 1)]
        joined_at.append(len(history))
    assert len(set(joined_at)) > 1, joined_at  # the watchers really joined at different points


@pytest.mark.parametrize("finish", ["report_finish", "finish_job"])
def test_done_arrives_within_a_second_of_the_job_ending_then_the_stream_ends(live_asgi, build, running, finish):
    job, _ = running
    write(job, [1])
    events = watch(live_asgi, job)
    assert history_of(events) == [chunk(job, 1)]
    events.assert_silent(0.3)

    if finish == "report_finish":
        assert services.report_finish(job=job, exit_code=3) == JobState.FAILED
    else:
        assert services.finish_job(job=job, state=JobState.TIMED_OUT, error_code="job_timeout")
    ended = time.monotonic()

    done = events.next_data_event()
    assert (done.event, done.data) == ("done", {})
    assert done.at - ended < 1.0
    assert events.wait_closed(timeout=1) - ended < 1.0


def test_last_chunks_written_before_the_end_come_before_done(live_asgi, build, running):
    job, _ = running
    events = watch(live_asgi, job)
    assert history_of(events) == []

    write(job, [1, 2])
    services.report_finish(job=job, exit_code=0)  # within the same tick as the output

    assert until_done(events) == [chunk(job, 1), chunk(job, 2)]


def test_jobs_ending_at_any_moment_of_a_tick_deliver_all_their_output_before_done(live_asgi, pipeline):
    build = make_build(pipeline, pipeline_ir=parallel_ir(8))
    jobs = [job for job, _ in start_jobs(build).values()]
    watchers = [watch(live_asgi, job) for job in jobs]
    for events in watchers:
        assert history_of(events) == []

    for job in jobs:  # 8 jobs ending 25 ms apart: spread over a whole 0.2 s tick
        write(job, [1, 2])
        services.report_finish(job=job, exit_code=0)
        time.sleep(0.025)

    for job, events in zip(jobs, watchers):
        assert until_done(events) == [chunk(job, 1), chunk(job, 2)]


def test_a_job_already_over_gets_its_history_then_done_at_once(live_asgi, build, running):
    job, _ = running
    write(job, [1, 2])
    services.report_finish(job=job, exit_code=0)

    events = watch(live_asgi, job)
    history = events.next()
    assert history.data == {"chunks": [chunk(job, 1), chunk(job, 2)], "last": True}
    done = events.next(timeout=1)
    assert (done.event, done.data) == ("done", {})
    assert done.at - history.at < 0.15  # at once, not after a tick of the hub
    events.wait_closed()


def test_a_job_that_never_ran_and_ended_gets_empty_history_then_done(live_asgi, build):
    services.cancel_build(build=build)
    job = Job.objects.get(build=build, step_key="b")
    assert job.state == JobState.CANCELED

    events = watch(live_asgi, job)
    first = events.next()
    assert first.lines == ["event: history", 'data: {"chunks":[],"last":true}']  # no id: there is nothing to resume after
    assert until_done(events, timeout=1) == []


# ===================================================================== resume


@pytest.mark.parametrize("how", ["header", "query"])
def test_resume_replays_from_the_chunk_after_the_given_id(live_asgi, build, running, how):
    job, _ = running
    write(job, range(1, 6))
    query, headers = ("&last_event_id=3", None) if how == "query" else ("", {"Last-Event-ID": "3"})

    events = watch(live_asgi, job, query, headers)
    assert history_of(events) == [chunk(job, 4), chunk(job, 5)]

    write(job, [6])
    assert [e.data for e in events.chunks(1)] == [chunk(job, 6)]


def test_reconnecting_with_the_last_id_seen_loses_nothing_and_repeats_nothing(live_asgi, build, running):
    job, _ = running
    write(job, [1, 2])
    events = watch(live_asgi, job)
    assert seqs(history_of(events)) == [1, 2]
    write(job, [3])
    last = events.chunks(1)[-1].id
    events.close()  # the browser tab's connection drops...

    write(job, [4, 5])  # ...while the job goes on

    again = watch(live_asgi, job, headers={"Last-Event-ID": str(last)})
    assert history_of(again) == [chunk(job, 4), chunk(job, 5)]
    write(job, [6])
    services.report_finish(job=job, exit_code=0)
    assert until_done(again) == [chunk(job, 6)]


def test_resume_from_the_newest_id_gives_empty_history_and_then_the_new_chunks(live_asgi, build, running):
    job, _ = running
    write(job, [1, 2])

    events = watch(live_asgi, job, headers={"Last-Event-ID": "2"})
    first = events.next()
    assert first.lines == ["event: history", 'data: {"chunks":[],"last":true}']
    write(job, [3])
    assert [e.data for e in events.chunks(1)] == [chunk(job, 3)]


def test_a_resume_point_that_is_not_an_id_replays_everything(live_asgi, build, running):
    job, _ = running
    write(job, [1, 2])
    for value in ["abc", "-1", "1.5", "99999999999", ""]:
        events = watch(live_asgi, job, f"&last_event_id={value}")
        assert seqs(history_of(events)) == [1, 2], value
        events = watch(live_asgi, job, headers={"Last-Event-ID": value})
        assert seqs(history_of(events)) == [1, 2], value


# ===================================================================== keep-alive


def test_silence_is_broken_by_comment_lines(live_asgi, build, running, monkeypatch):
    monkeypatch.setattr(stream, "KEEPALIVE_SECONDS", 0.3)
    job, _ = running
    events = watch(live_asgi, job)
    history = events.next()
    assert history.data == {"chunks": [], "last": True}

    first = events.next(timeout=2)
    assert first.event == "comment" and first.lines[0].startswith(":"), first.lines
    assert 0.25 <= first.at - history.at < 1.3
    second = events.next(timeout=2)
    assert second.event == "comment"
    assert 0.25 <= second.at - first.at < 1.3

    write(job, [1])  # the stream is still alive
    assert [e.data for e in events.chunks(1)] == [chunk(job, 1)]


# ===================================================================== errors and headers


def assert_stream_error(events: EventStream, status: int, code: str) -> None:
    assert events.status == status, (events.status, events.body)
    assert events.headers["Content-Type"] == "application/json"
    body = events.json()
    assert set(body) == {"code", "message"}, body  # flat, not the API's error envelope
    assert body["code"] == code and body["message"]


def test_missing_bad_or_expired_token_is_401(live_asgi, api, build, running, settings):
    job, _ = running
    claims = {"iss": "harmont", "aud": "logs", "sub": str(build.pk), "exp": int(time.time()) + 600}
    tokens = {
        "missing": None,
        "empty": "",
        "garbage": "garbage",
        "not a jwt": "a.b.c",
        "expired": token_for(build, now=timezone.now() - timedelta(hours=2)),
        "another secret": jwt.encode(claims, "another secret, as long as a real one should be", algorithm="HS256"),
        "another audience": jwt.encode({**claims, "aud": "api"}, settings.LOG_TOKEN_SECRET, algorithm="HS256"),
        "an API token": api.raw_token,
    }
    for what, token in tokens.items():
        events = live_asgi.stream(logs_path(job, token))
        assert events.status == 401, what
        assert_stream_error(events, 401, "log_stream_unauthorized")


def test_a_token_just_before_expiry_still_opens_the_stream(live_asgi, build, running):
    job, _ = running
    token = token_for(build, now=timezone.now() - timedelta(minutes=59))
    assert live_asgi.stream(logs_path(job, token)).status == 200


def test_a_token_for_another_build_is_403(live_asgi, pipeline, other_pipeline, build, running):
    job, _ = running
    for other in (make_build(pipeline), make_build(other_pipeline)):
        assert_stream_error(live_asgi.stream(logs_path(job, token_for(other))), 403, "log_stream_forbidden")


def test_a_malformed_or_unknown_job_id_is_403(live_asgi, build):
    for job_id in ["not-a-uuid", "123", "00000000-0000-0000-0000-000000000000", "%C3%A9"]:
        events = live_asgi.stream(logs_path(job_id, token_for(build)))
        assert events.status == 403, job_id
        assert_stream_error(events, 403, "log_stream_forbidden")


def test_stream_headers_forbid_caching_and_proxy_buffering(live_asgi, build, running):
    events = watch(live_asgi, running[0])
    assert events.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert events.headers["Cache-Control"] == "no-cache"
    assert events.headers["X-Accel-Buffering"] == "no"
    assert "Content-Length" not in events.headers


def test_cors_allows_only_the_configured_origins(live_asgi, build, running, settings):
    settings.LOG_STREAM_CORS_ORIGINS = [CORS_ORIGIN]
    job, _ = running

    allowed = watch(live_asgi, job, headers={"Origin": CORS_ORIGIN})
    assert allowed.headers["Access-Control-Allow-Origin"] == CORS_ORIGIN
    assert "Origin" in allowed.headers["Vary"]
    other = watch(live_asgi, job, headers={"Origin": "https://evil.example.com"})
    assert "Access-Control-Allow-Origin" not in other.headers
    no_origin = watch(live_asgi, job)
    assert "Access-Control-Allow-Origin" not in no_origin.headers

    # The browser may read why it was refused, too.
    refused = live_asgi.stream(logs_path(job, "garbage"), {"Origin": CORS_ORIGIN})
    assert refused.status == 401 and refused.headers["Access-Control-Allow-Origin"] == CORS_ORIGIN
    refused = live_asgi.stream(logs_path(job, "garbage"), {"Origin": "https://evil.example.com"})
    assert refused.status == 401 and "Access-Control-Allow-Origin" not in refused.headers

    settings.LOG_STREAM_CORS_ORIGINS = []  # the default: no origin at all
    assert "Access-Control-Allow-Origin" not in watch(live_asgi, job, headers={"Origin": CORS_ORIGIN}).headers


# ===================================================================== many streams


def hub_watching(job: Job) -> stream.LogHub:
    """The hub of the server's event loop that has subscribers for `job`."""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        for candidate in list(stream._hubs.values()):
            if job.pk in candidate.subscribers:
                return candidate
        time.sleep(0.02)
    raise AssertionError("no hub watches the job")


def test_many_streams_share_one_poll_per_tick(live_asgi, pipeline, monkeypatch):
    build = make_build(pipeline, pipeline_ir=parallel_ir(5))
    jobs = [job for job, _ in start_jobs(build).values()]
    assert len(jobs) == 5
    calls: list[tuple[float, frozenset, int]] = []
    real_fetch = stream.fetch_updates

    def counted_fetch(cursors: dict) -> Any:
        executed: list[str] = []

        def count(execute, sql, params, many, context):  # noqa: ANN001, ANN202
            executed.append(sql)
            return execute(sql, params, many, context)

        with connections["default"].execute_wrapper(count):
            result = real_fetch(cursors)
        calls.append((time.monotonic(), frozenset(cursors), len(executed)))
        return result

    monkeypatch.setattr(stream, "fetch_updates", counted_fetch)

    watchers = {job.pk: [watch(live_asgi, job) for _ in range(4)] for job in jobs}  # 20 streams
    for events in sum(watchers.values(), []):
        assert history_of(events) == []
    hub = hub_watching(jobs[0])
    assert {job_id: len(subs) for job_id, subs in hub.subscribers.items()} == {job.pk: 4 for job in jobs}

    started = time.monotonic()
    for job in jobs:
        write(job, [1, 2])
    for job in jobs:
        for events in watchers[job.pk]:  # each stream gets its own job's output only
            assert [e.data for e in events.chunks(2)] == [chunk(job, 1), chunk(job, 2)]
    time.sleep(0.6)  # a few idle ticks too
    for job in jobs:
        write(job, [3])
    for job in jobs:
        for events in watchers[job.pk]:
            assert [e.data for e in events.chunks(1)] == [chunk(job, 3)]
    elapsed = time.monotonic() - started

    window = [call for call in calls if call[0] >= started]
    if notices.listening():
        # PostgreSQL: a look per notice at most (10 appends), none while idle, each reading only
        # jobs that had news, never one per stream...
        assert 0 < len(window) <= 2 * len(jobs), (len(window), elapsed)
        assert all(watched <= {job.pk for job in jobs} for _, watched, _ in window)
    else:
        # SQLite: at most one poll per tick for the 20 streams (one per stream would be 20 per tick),
        # each covering every watched job...
        assert 0 < len(window) <= elapsed / stream.TICK_SECONDS + 2, (len(window), elapsed)
        assert all(watched >= {job.pk for job in jobs} for _, watched, _ in window)
    # ...in the same queries however many jobs it reads: one on PostgreSQL (states and chunks in one
    # snapshot), the states then the chunks on SQLite.
    assert {queries for _, _, queries in window} == {1 if is_postgres() else 2}


def test_on_postgresql_the_hub_looks_when_told_and_only_at_the_job_with_news(live_asgi, pipeline, monkeypatch):
    if not notices.listening():
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's; SQLite polls each tick (above)")
    build = make_build(pipeline, pipeline_ir=parallel_ir(3))
    quiet, busy, ending = [job for job, _ in start_jobs(build).values()]
    looks: list[tuple[float, frozenset]] = []
    real_fetch = stream.fetch_updates

    def recorded_fetch(cursors: dict) -> Any:
        looks.append((time.monotonic(), frozenset(cursors)))
        return real_fetch(cursors)

    monkeypatch.setattr(stream, "fetch_updates", recorded_fetch)
    watchers = {job.pk: watch(live_asgi, job) for job in (quiet, busy, ending)}
    for events in watchers.values():
        assert history_of(events) == []
    time.sleep(0.5)
    looks.clear()
    watchers[quiet.pk].assert_silent(1.0)
    assert looks == []  # nothing happened: no look at all (a poll would have looked five times)

    written = time.monotonic()
    write(busy, [1, 2])
    assert [e.data for e in watchers[busy.pk].chunks(2)] == [chunk(busy, 1), chunk(busy, 2)]
    assert watchers[busy.pk].events.qsize() == 0 and looks and looks[0][1] == {busy.pk}
    assert looks[0][0] - written < 0.5  # told at once, not at the next tick of a poll

    services.report_finish(job=ending, exit_code=0)  # an end with no new chunk is news too
    assert until_done(watchers[ending.pk]) == []
    assert all(watched <= {busy.pk, ending.pk} for _, watched in looks)


def test_a_closed_stream_stops_being_watched(live_asgi, build, running):
    job, _ = running
    watchers = [watch(live_asgi, job) for _ in range(3)]
    for events in watchers:
        history_of(events)
    hub = hub_watching(job)
    deadline = time.monotonic() + 2
    while len(hub.subscribers.get(job.pk, ())) != 3:  # a stream may send its history just before it subscribes
        assert time.monotonic() < deadline, "the streams never all subscribed"
        time.sleep(0.02)

    watchers[0].close()
    watchers[1].close()
    deadline = time.monotonic() + 2
    while len(hub.subscribers.get(job.pk, ())) != 1:
        assert time.monotonic() < deadline, "closed streams are still subscribed"
        time.sleep(0.02)

    write(job, [1])  # the one left still gets the output
    assert [e.data for e in watchers[2].chunks(1)] == [chunk(job, 1)]

    watchers[2].close()
    while job.pk in hub.subscribers or job.pk in hub.cursors:
        assert time.monotonic() < deadline + 2, "the job is still watched"
        time.sleep(0.02)


def test_a_failed_poll_is_retried_on_the_next_tick(live_asgi, build, running, monkeypatch):
    job, _ = running
    real_fetch = stream.fetch_updates
    failures = []

    def flaky_fetch(cursors: dict) -> Any:
        if not failures:
            failures.append(cursors)
            raise OperationalError("server closed the connection unexpectedly")
        return real_fetch(cursors)

    events = watch(live_asgi, job)
    assert history_of(events) == []
    monkeypatch.setattr(stream, "fetch_updates", flaky_fetch)
    write(job, [1])

    assert [e.data for e in events.chunks(1)] == [chunk(job, 1)]
    assert len(failures) == 1


def test_open_streams_do_not_starve_the_rest_api(live_asgi, api, build, running):
    job, _ = running
    watchers = [watch(live_asgi, job) for _ in range(30)]
    for events in watchers:
        assert history_of(events) == []

    bearer = {"Authorization": f"Bearer {api.raw_token}"}
    build_path = builds_url(build.pipeline, f"/{build.number}")
    for _ in range(5):
        for path, headers in (("/api/v0/ping", {}), (build_path, bearer)):
            asked = time.monotonic()
            response = live_asgi.request("GET", path, headers=headers, timeout=5)
            assert response.status == 200, response.body
            assert time.monotonic() - asked < 1.0
    assert live_asgi.request("GET", build_path, headers=bearer).json()["number"] == build.number

    write(job, [1])  # and the 30 streams are still there
    for events in watchers:
        assert [e.data for e in events.chunks(1)] == [chunk(job, 1)]


@pytest.mark.postgres
def test_open_streams_do_not_hold_a_database_connection_each(live_asgi, build, running):
    if not is_postgres():
        pytest.skip("counts PostgreSQL sessions")
    job, _ = running

    def sessions() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
            return cursor.fetchone()[0]

    before = sessions()
    watchers = [watch(live_asgi, job) for _ in range(40)]
    for events in watchers:
        assert history_of(events) == []
    # The queries of opening a stream run on the loop's shared executor (as the hub's poll
    # does), so its few threads' connections serve every stream; 40 open streams holding 40
    # connections would exhaust max_connections long before the 500 the benchmark opens.
    assert sessions() - before <= min(32, (os.cpu_count() or 1) + 4) < len(watchers)


# ===================================================================== the log limit, live


def test_past_the_log_limit_the_stream_gets_one_meta_chunk_and_then_done(live_asgi, build, running, settings):
    settings.JOB_LOG_LIMIT_BYTES = 50
    job, _ = running
    assert len(content(job, 1).encode()) == 15
    events = watch(live_asgi, job)
    assert history_of(events) == []

    write(job, [1, 2])
    write(job, [3, 4, 5])  # 4 would pass 50 bytes: a notice takes its seq, 5 is dropped
    received = [e.data for e in events.chunks(4)]
    assert received[:3] == [chunk(job, n) for n in range(1, 4)]
    assert received[3]["seq"] == 4 and received[3]["stream_kind"] == META
    assert "log limit of 50 bytes" in received[3]["content"]

    write(job, [6, 7])  # dropped
    events.assert_silent(0.4)  # two ticks

    assert services.report_finish(job=job, exit_code=0) == JobState.PASSED
    assert until_done(events) == []
    job.refresh_from_db()
    assert (job.state, job.log_truncated) == (JobState.PASSED, True)


# ===================================================================== history in bounded frames


def event_bytes(event: Event) -> int:
    return len(("\n".join(event.lines) + "\n\n").encode())


def test_a_long_history_comes_in_frames_of_at_most_the_frame_size_the_last_one_marked(live_asgi, build, running,
                                                                                     monkeypatch):
    monkeypatch.setattr(stream, "HISTORY_FRAME_BYTES", 1000)
    monkeypatch.setattr(stream, "HISTORY_PAGE_ROWS", 7)  # frames span pages, pages span frames
    job, _ = running
    write(job, range(1, 61))

    frames = history_frames(watch(live_asgi, job))

    assert len(frames) > 5
    assert all(event_bytes(frame) <= 1000 for frame in frames), [event_bytes(frame) for frame in frames]
    assert [frame.data.get("last", False) for frame in frames] == [False] * (len(frames) - 1) + [True]
    assert [c for frame in frames for c in frame.data["chunks"]] == [chunk(job, seq) for seq in range(1, 61)]
    for frame in frames:  # every frame decodes as `hm` decodes one: {"chunks": [...]}
        assert [cli_decode(c) for c in frame.data["chunks"]]


def test_a_history_bigger_than_a_mebibyte_is_split_at_the_default_size(live_asgi, build, running):
    job, _ = running
    text = "é" * 30_000 + "\n"  # ~60 KB of JSON a chunk (escaped), 40 of them
    services.append_log(job=job, chunks=[services.ChunkIn(seq, OUT, text, ts(seq)) for seq in range(1, 41)])

    frames = history_frames(watch(live_asgi, job))

    assert len(frames) >= 2
    assert max(event_bytes(frame) for frame in frames) <= stream.HISTORY_FRAME_BYTES
    assert [c["seq"] for frame in frames for c in frame.data["chunks"]] == list(range(1, 41))


def test_resume_from_the_id_of_a_middle_frame_replays_the_rest_once(live_asgi, build, running, monkeypatch):
    monkeypatch.setattr(stream, "HISTORY_FRAME_BYTES", 1000)
    job, _ = running
    write(job, range(1, 41))
    frames = history_frames(watch(live_asgi, job))
    cut = frames[1].id  # a client cut off after the second frame

    again = watch(live_asgi, job, headers={"Last-Event-ID": str(cut)})
    assert seqs(history_of(again)) == list(range(cut + 1, 41))
    write(job, [41])
    assert [e.data for e in again.chunks(1)] == [chunk(job, 41)]
    services.report_finish(job=job, exit_code=0)
    assert until_done(again) == []


def test_a_job_ending_while_its_long_history_goes_out_still_ends_with_done(live_asgi, build, running, monkeypatch):
    monkeypatch.setattr(stream, "HISTORY_FRAME_BYTES", 1000)
    job, _ = running
    write(job, range(1, 41))
    events = watch(live_asgi, job)
    first = events.next()
    write(job, [41])
    services.report_finish(job=job, exit_code=0)

    rest = history_of(events)
    assert first.data["chunks"] + rest + until_done(events) == [chunk(job, seq) for seq in range(1, 42)]


# ===================================================================== a client that stops reading


def test_a_client_that_stops_reading_is_dropped_and_resumes_with_last_event_id(live_asgi, build, running,
                                                                               monkeypatch):
    monkeypatch.setattr(stream, "SUBSCRIBER_QUEUE_CHUNKS", 5)
    job, _ = running
    big = "x" * 65_535 + "\n"
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little for it
    sock.connect((live_asgi.host, live_asgi.port))
    sock.sendall(f"GET {logs_path(job, token_for(build))} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    hub = hub_watching(job)
    seq, deadline = 0, time.monotonic() + 30
    while job.pk in hub.subscribers:  # written until the stalled stream's queue overflows
        assert time.monotonic() < deadline, "the hub kept a client that reads nothing"
        services.append_log(job=job, chunks=[services.ChunkIn(s, OUT, big, ts(s)) for s in range(seq + 1, seq + 11)])
        seq += 10
        time.sleep(0.25)
    stalled_at = seq

    received = b""
    sock.settimeout(10)
    while data := sock.recv(1 << 20):  # reading again: what was queued, then the end
        received += data
    sock.close()
    ids = [int(line[4:]) for line in received.decode().split("\n") if line.startswith("id: ")]
    assert b"event: done" not in received
    assert ids == sorted(set(ids)) and ids[-1] < stalled_at

    write(job, [stalled_at + 1])
    again = watch(live_asgi, job, headers={"Last-Event-ID": str(ids[-1])})
    assert seqs(history_of(again)) == list(range(ids[-1] + 1, stalled_at + 2))
    services.report_finish(job=job, exit_code=0)
    assert until_done(again) == []


def test_a_full_queue_unsubscribes_only_the_stalled_subscriber(monkeypatch):
    monkeypatch.setattr(stream, "SUBSCRIBER_QUEUE_CHUNKS", 3)

    async def scenario() -> None:
        hub = stream.LogHub(tick=3600)
        job_id = uuid.uuid4()
        slow, fast = hub.subscribe(job_id, 0), hub.subscribe(job_id, 0)
        for seq in range(1, 5):
            hub._deliver({}, [(job_id, seq, OUT, "x", None)])
            fast.queue.get_nowait()
        assert slow.overflowed and not fast.overflowed
        assert slow.queue.qsize() == 3 and hub.subscribers[job_id] == {fast}
        hub._deliver({job_id: JobState.PASSED}, [])
        assert fast.queue.get_nowait() is stream.DONE and slow.queue.qsize() == 3
        hub.task.cancel()

    asyncio.run(scenario())


# ===================================================================== memory while a 100 MiB log is read

MIB = 1024 * 1024


def store_big_log(job: Job, mib: int) -> int:
    """`mib` MiB of log in 64 KiB chunks, written straight to the table (one string shared by all rows)."""
    piece = ("y" * 1023 + "\n") * 64
    per_batch = 64
    for first in range(1, mib * 16 + 1, per_batch):
        LogChunk.objects.bulk_create([LogChunk(job=job, seq=seq, stream_kind=OUT, content=piece, ts=ts(seq))
                                      for seq in range(first, min(first + per_batch, mib * 16 + 1))])
    size = len(piece) * mib * 16
    Job.objects.filter(pk=job.pk).update(log_bytes=size)
    return size


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def growth_while(read: Any) -> tuple[int, int, Any]:
    """(traced Python memory peak growth, resident set growth, what `read` returned) of this
    process, which is the server's: uvicorn runs in one of its threads."""
    gc.collect()
    rss_before, rss_peak, reading = rss_bytes(), 0, True

    def sample() -> None:
        nonlocal rss_peak
        while reading:
            rss_peak = max(rss_peak, rss_bytes())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0]
    sampler.start()
    try:
        result = read()
    finally:
        reading = False
        sampler.join()
        traced_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return traced_peak - traced_before, max(rss_peak, rss_bytes()) - rss_before, result


def read_all(live: LiveServer, path: str, headers: dict[str, str]) -> tuple[int, int, bytes]:
    """(status, bytes received, the last bytes): the body is counted and dropped as it arrives."""
    conn = http.client.HTTPConnection(live.host, live.port, timeout=60)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        received, last = 0, b""
        while block := response.read(64 * 1024):
            received += len(block)
            last = (last + block)[-64:]
        return response.status, received, last
    finally:
        conn.close()


def test_reading_a_100_mib_raw_log_raises_the_servers_memory_by_less_than_20_mib(live_asgi, build, running, owner):
    job, _ = running
    size = store_big_log(job, 100)
    headers = {"Authorization": f"Bearer {org_services.create_personal_token(user=owner, description='t').raw}"}
    path = builds_url(build.pipeline, f"/{build.number}/jobs/{job.pk}/log")
    read_all(live_asgi, path, {**headers, "Range": "bytes=-10"})  # warm: first-request imports and caches

    traced, rss, (status, received, last) = growth_while(lambda: read_all(live_asgi, path, headers))
    assert (status, received, last) == (200, size, ("y" * 1023 + "\n")[-64:].encode())
    assert traced < 20 * MIB, f"{traced / MIB:.1f} MiB traced"
    assert rss < 20 * MIB, f"{rss / MIB:.1f} MiB resident"

    traced, rss, (status, received, _) = growth_while(
        lambda: read_all(live_asgi, path, {**headers, "Range": f"bytes=-{90 * MIB}"}))
    assert (status, received) == (206, 90 * MIB)
    assert traced < 20 * MIB and rss < 20 * MIB, (traced / MIB, rss / MIB)


def test_streaming_a_100_mib_history_raises_the_servers_memory_by_less_than_20_mib(live_asgi, build, running):
    job, _ = running
    store_big_log(job, 100)
    services.report_finish(job=job, exit_code=0)
    path = logs_path(job, token_for(build))
    read_all(live_asgi, logs_path(job, token_for(build), f"&last_event_id={100 * 16 - 1}"), {})  # warm

    traced, rss, (status, received, last) = growth_while(lambda: read_all(live_asgi, path, {}))
    assert status == 200 and received > 100 * MIB and last.endswith(b"event: done\ndata: {}\n\n")
    assert traced < 20 * MIB, f"{traced / MIB:.1f} MiB traced"
    assert rss < 20 * MIB, f"{rss / MIB:.1f} MiB resident"


def test_on_postgresql_appends_and_ends_notify_the_logs_channel_once_per_job(transactional_db, pipeline):
    """builds.sql's log triggers: one notice per job an append wrote (however many chunks), one when a job
    ends; a heartbeat none."""
    if not notices.listening():
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    import psycopg

    build = make_build(pipeline, pipeline_ir=parallel_ir(2))
    first, second = [job for job, _ in start_jobs(build).values()]
    with psycopg.connect(notices.listen_conninfo(), autocommit=True) as conn:
        conn.execute(f"LISTEN {notices.LOG_CHANNEL}")

        def heard() -> list[str]:
            return [note.payload for note in conn.notifies(timeout=0.5)]

        write(first, range(1, 51))
        assert heard() == [str(first.pk)]
        with transaction.atomic():  # two appends of two jobs in one transaction
            write(first, [51])
            write(second, [1, 2])
        assert sorted(heard()) == sorted([str(first.pk), str(second.pk)])
        services.heartbeat(job=first)
        assert heard() == []
        services.report_finish(job=second, exit_code=0)
        assert heard() == [str(second.pk)]
