"""Live job logs: the Server-Sent Events stream at /v0/jobs/{job_id}/logs.

Served by an async view, so an open stream costs a coroutine, not a request
worker. New output reaches waiting streams through one `LogHub` per event loop
(one per server process): every tick it asks the database, in one query, for
the chunks after each watched job's cursor and the states of those jobs, and
fans the answer out to the subscribers. So the database sees one poll per
process per tick however many browsers are watching.

History (what is stored past the resume point) goes out as several `history` events of
at most HISTORY_FRAME_BYTES each, read from the database one page at a time as the
previous frame is sent; each carries the id of its last chunk, so a client cut off
mid-history resumes after the frame it got, and the last says `"last": true`. A
subscriber's queue holds at most SUBSCRIBER_QUEUE_CHUNKS items: a client that stops
reading overflows it, is dropped by the hub and has its stream ended (without `done`),
and resumes with Last-Event-ID like any other cut connection.

Why per-job cursors rather than "chunk id > last id": appends to one job are
serialised by its row lock and numbered by the agent, so `seq > cursor` can't
skip a chunk that commits late, whereas a global id can commit out of order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection
from django.db.models import Q
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse

from builds import notices, sql
from builds.models import Job, LogChunk
from builds.responses import chunk_sizes
from builds.states import TERMINAL_JOB_STATES
from harmont import metrics
from harmont.errors import DATABASE_RETRY_AFTER_SECONDS, DATABASE_UNAVAILABLE_ERRORS
from harmont.logtokens import LogTokenInvalid, verify_log_token
from harmont.loop_local import LoopLocal
from harmont.serializers import parse_uuid

log = logging.getLogger("harmont.stream")

TICK_SECONDS = 0.2  # SQLite: how often the hub looks for new chunks
FULL_LOOK_SECONDS = 5.0  # PostgreSQL: how often it looks at every watched job without news
GATHER_SECONDS = 0.02  # PostgreSQL: from news to the look
KEEPALIVE_SECONDS = 15.0
DONE = object()  # sentinel queued after a job's last chunk
DRAIN = object()  # sentinel queued when the server stops: the stream ends, the client reconnects elsewhere
# What a draining server tells EventSource: reconnect after this many milliseconds (to another instance).
DRAIN_RETRY_MS = 1000
HISTORY_FRAME_BYTES = 1024 * 1024  # a whole event, id and event lines included
HISTORY_PAGE_ROWS = 500  # chunks whose sizes one history page looks at
HISTORY_PAGE_BYTES = 512 * 1024  # content one history page reads (at least one chunk, however big)
SUBSCRIBER_QUEUE_CHUNKS = 1000


def chunk_dict(seq: int, stream_kind: int, content: str, ts: int | None) -> dict[str, Any]:
    """A chunk on the wire (SPEC §8): `ts` in Unix nanoseconds, as `hm`'s client decodes it (`Option<i64>`)."""
    return {"seq": seq, "stream_kind": stream_kind, "content": content, "ts": ts}


def frame(event: str, data: Any, *, event_id: int | None = None) -> bytes:
    lines = [f"id: {event_id}"] if event_id is not None else []
    lines += [f"event: {event}", f"data: {json.dumps(data, separators=(',', ':'))}"]
    return ("\n".join(lines) + "\n\n").encode()


@dataclass(frozen=True)
class LiveChunk:
    """A chunk as every stream of its job sends it: its event, encoded once however many watch."""

    seq: int
    frame: bytes


@dataclass(eq=False)
class Subscriber:
    job_id: uuid.UUID
    last_seq: int
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=SUBSCRIBER_QUEUE_CHUNKS))
    # Set by the hub when the queue was full: the client is not reading; its stream ends.
    overflowed: bool = False


def fetch_updates(cursors: dict[uuid.UUID, int]) -> tuple[dict[uuid.UUID, str], list[tuple]]:
    """States of the watched jobs, and their chunks past each cursor: a job seen terminal here has
    all of its chunks in the answer (one statement on PostgreSQL; on SQLite the states are read
    first)."""
    try:
        if connection.vendor == "postgresql":
            return sql.updates_after(cursors)
        states = dict(Job.objects.filter(pk__in=list(cursors)).values_list("id", "state"))
        condition = Q()
        for job_id, seq in cursors.items():
            condition |= Q(job_id=job_id, seq__gt=seq)
        return states, list(LogChunk.objects.filter(condition).order_by("job_id", "seq")
                            .values_list("job_id", "seq", "stream_kind", "content", "ts"))
    except DatabaseError:
        close_old_connections()  # a dropped connection is replaced on the next tick
        raise


class LogHub:
    """The live streams of one process (one event loop), and the looks at the database that feed them.

    On PostgreSQL the hub looks when told to: the triggers of builds.sql notify
    `harmont_logs` with a job's id when chunks of it were appended or it ended,
    the process's listener (builds.notices) hands that here, and the next look
    (GATHER_SECONDS later, so one agent's burst of appends is read at once)
    reads only the jobs with news. Every FULL_LOOK_SECONDS, and whenever the
    listener (re)connects, it looks at every watched job anyway. On SQLite it
    looks at every watched job each `tick`.
    """

    def __init__(self, tick: float = TICK_SECONDS) -> None:
        self.tick = tick
        self.subscribers: dict[uuid.UUID, set[Subscriber]] = {}
        self.cursors: dict[uuid.UUID, int] = {}
        self.task: asyncio.Task | None = None
        self.draining = False
        self.following = False  # PostgreSQL: the loop's listener hands us the logs channel
        self.news: set[uuid.UUID] = set()  # watched jobs with news since the last look
        self.look_at_all = True  # the next look reads every watched job
        self.woken = asyncio.Event()

    def subscribe(self, job_id: uuid.UUID, after_seq: int) -> Subscriber:
        subscriber = Subscriber(job_id, after_seq)
        if self.draining:
            subscriber.queue.put_nowait(DRAIN)
            return subscriber
        self.subscribers.setdefault(job_id, set()).add(subscriber)
        if not self.following and notices.listening():
            self.following = True
            notices.listener().follow(notices.LOG_CHANNEL, notices.Follower(self._notice, self._look_at_all))
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())
        return subscriber

    def start_from(self, subscriber: Subscriber, seq: int) -> None:
        """The subscriber's history reached `seq`; the hub need not look before it."""
        subscriber.last_seq = max(subscriber.last_seq, seq)
        if subscriber.job_id not in self.subscribers:
            return  # the job ended meanwhile; its DONE is already queued
        current = self.cursors.get(subscriber.job_id)
        self.cursors[subscriber.job_id] = subscriber.last_seq if current is None else min(current,
                                                                                           subscriber.last_seq)
        # What came between its history and now was notified before it watched: look once.
        self.news.add(subscriber.job_id)
        self.woken.set()

    def _notice(self, payload: str) -> None:
        """A job's chunks were appended, or it ended (the logs channel)."""
        try:
            job_id = uuid.UUID(payload)
        except ValueError:
            log.warning("ignored a malformed log notice %r", payload[:200])
            return
        if job_id in self.subscribers:
            self.news.add(job_id)
            self.woken.set()

    def _look_at_all(self) -> None:
        """Notices may have been missed (the listener (re)connected)."""
        self.look_at_all = True
        self.woken.set()

    async def _next_look(self) -> list[uuid.UUID]:
        """Wait for the next look; the jobs it reads."""
        if not self.following:
            await asyncio.sleep(self.tick)
            return list(self.cursors)
        try:
            await asyncio.wait_for(self.woken.wait(), FULL_LOOK_SECONDS)
            await asyncio.sleep(GATHER_SECONDS)
        except asyncio.TimeoutError:
            self.look_at_all = True
        self.woken.clear()
        if self.look_at_all:
            self.look_at_all = False
            self.news.clear()
            return list(self.cursors)
        jobs, self.news = list(self.news), set()
        return jobs

    def drain(self) -> None:
        """The server is stopping: every open stream ends now, telling its client to reconnect (elsewhere)."""
        self.draining = True
        stalled: list[Subscriber] = []
        for watchers in list(self.subscribers.values()):
            for subscriber in watchers:
                self._offer(subscriber, DRAIN, stalled)
        for subscriber in stalled:
            self.unsubscribe(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        watchers = self.subscribers.get(subscriber.job_id)
        if watchers is None:
            return
        watchers.discard(subscriber)
        if not watchers:
            del self.subscribers[subscriber.job_id]
            self.cursors.pop(subscriber.job_id, None)

    async def _run(self) -> None:
        while self.subscribers:
            jobs = await self._next_look()
            cursors = {job: self.cursors[job] for job in jobs if job in self.subscribers and job in self.cursors}
            if not cursors:
                continue
            try:
                states, chunks = await sync_to_async(fetch_updates, thread_sensitive=False)(cursors)
            except Exception:  # noqa: BLE001 — one bad poll must not end every stream of the process
                log.exception("log stream poll failed; retrying")
                self._look_at_all()  # the news it took is not lost: soon, every watched job again
                await asyncio.sleep(self.tick)
                continue
            self._deliver(states, chunks)

    def _deliver(self, states: dict[uuid.UUID, str], chunks: list[tuple]) -> None:
        stalled: list[Subscriber] = []
        for job_id, seq, stream_kind, content, ts in chunks:
            self.cursors[job_id] = max(self.cursors.get(job_id, 0), seq)
            watchers = self.subscribers.get(job_id, ())
            if not watchers:
                continue
            # JSON-encoded once: a 64 KB chunk watched by ten browsers is not encoded ten times.
            live = LiveChunk(seq, frame("chunk", chunk_dict(seq, stream_kind, content, ts), event_id=seq))
            for subscriber in watchers:
                self._offer(subscriber, live, stalled)
        for job_id, state in states.items():
            if state in TERMINAL_JOB_STATES:
                for subscriber in self.subscribers.pop(job_id, ()):
                    self._offer(subscriber, DONE, stalled)
                self.cursors.pop(job_id, None)
        for subscriber in stalled:
            self.unsubscribe(subscriber)

    @staticmethod
    def _offer(subscriber: Subscriber, item: Any, stalled: list[Subscriber]) -> None:
        if subscriber.overflowed:
            return
        try:
            subscriber.queue.put_nowait(item)
        except asyncio.QueueFull:
            # Its reader is behind by a whole queue: holding more for it would grow without
            # bound. What it has queued still goes out, then its stream ends and it resumes.
            subscriber.overflowed = True
            stalled.append(subscriber)


# One hub per event loop: in harmont.worker (or under ASGI) that is one per process.
hub = LoopLocal(LogHub)
_hubs = hub.instances


def stream_error(code: str, message: str, status: int, request: HttpRequest) -> JsonResponse:
    # Flat JSON, not the API envelope: the hosted service's stream answers this way.
    return with_cors(JsonResponse({"code": code, "message": message}, status=status), request)


def with_cors(response: HttpResponse, request: HttpRequest) -> HttpResponse:
    origin = request.headers.get("Origin")
    allowed = settings.LOG_STREAM_CORS_ORIGINS
    if origin and ("*" in allowed or origin in allowed):
        response["Access-Control-Allow-Origin"] = origin
        response["Vary"] = "Origin"
    return response


def resume_point(request: HttpRequest) -> int:
    raw = request.headers.get("Last-Event-ID") or request.GET.get("last_event_id") or "0"
    return int(raw) if raw.isdigit() and len(raw) <= 10 else 0


def may_open(job_id: uuid.UUID, build_id: uuid.UUID) -> bool:
    try:
        return Job.objects.filter(pk=job_id, build_id=build_id).exists()
    except DatabaseError:
        close_old_connections()  # a shared thread: don't leave it a broken connection
        raise


def history(job_id: uuid.UUID, after_seq: int) -> tuple[str, tuple[list[tuple], bool]]:
    """The job's state, then the first page of its stored chunks past `after_seq` (in that
    order: a job seen terminal here has all of its chunks in the pages that follow)."""
    try:
        state = Job.objects.values_list("state", flat=True).get(pk=job_id)
        return state, history_page(job_id, after_seq)
    except DatabaseError:
        close_old_connections()
        raise


def history_page(job_id: uuid.UUID, after_seq: int) -> tuple[list[tuple], bool]:
    """The chunks past `after_seq` that fit in HISTORY_PAGE_BYTES (sizes are read first, so a
    page of big chunks is not read whole), and whether more may follow."""
    try:
        sizes = chunk_sizes(job_id, after=after_seq, limit=HISTORY_PAGE_ROWS)
        if not sizes:
            return [], False
        total, count = 0, 0
        for _, size in sizes:
            if count and total + size > HISTORY_PAGE_BYTES:
                break
            total += size
            count += 1
        rows = list(LogChunk.objects.filter(job_id=job_id, seq__gt=after_seq, seq__lte=sizes[count - 1][0])
                    .order_by("seq").values_list("seq", "stream_kind", "content", "ts"))
        return rows, count < len(sizes) or len(sizes) == HISTORY_PAGE_ROWS
    except DatabaseError:
        close_old_connections()
        raise


def history_frame(encoded: list[str], *, last: bool, event_id: int | None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    tail = '],"last":true}' if last else "]}"
    return f"{head}event: history\ndata: {{\"chunks\":[{','.join(encoded)}{tail}\n\n".encode()


# The bytes of a history event besides its chunks and their commas: id and event lines, the
# JSON around the list, the closing blank line (an id is at most 20 digits).
FRAME_OVERHEAD = len(history_frame([], last=True, event_id=10**20))


async def history_frames(job_id: uuid.UUID, after_seq: int, first_page: tuple[list[tuple], bool]) -> AsyncIterator[
        tuple[bytes, int]]:
    """The history as events of at most HISTORY_FRAME_BYTES (a single chunk bigger than that goes
    alone: a chunk is never split, its seq names it), each with the seq it ends at."""
    encoded: list[str] = []
    size, seq, (page, more) = FRAME_OVERHEAD, after_seq, first_page
    while page:
        for row in page:
            item = json.dumps(chunk_dict(*row), separators=(",", ":"))
            if encoded and size + len(item) + 1 > HISTORY_FRAME_BYTES:
                yield history_frame(encoded, last=False, event_id=seq), seq
                encoded, size = [], FRAME_OVERHEAD
            encoded.append(item)
            size += len(item) + 1
            seq = row[0]
        page, more = (await sync_to_async(history_page, thread_sensitive=False)(job_id, seq)
                      if more else ([], False))
    # Only a frame with chunks is ever held back, so the last is empty only if all of history is.
    yield history_frame(encoded, last=True, event_id=seq if encoded else None), seq


async def job_log_stream(request: HttpRequest, job_id: str) -> HttpResponse:
    try:
        build_id = verify_log_token(request.GET.get("token"))
    except LogTokenInvalid:
        return stream_error("log_stream_unauthorized", "A valid, unexpired log token is required (?token=).",
                            401, request)
    job_uuid = parse_uuid(job_id)
    try:
        return await _open_stream(request, job_uuid, build_id)
    except DATABASE_UNAVAILABLE_ERRORS:
        # Before the response starts, so it can still say why; the client retries (EventSource does so
        # on its own) and resumes from its Last-Event-ID once the database is back.
        log.warning("log stream of job %s not opened: database unavailable", job_id)
        response = stream_error("database_unavailable", "The database is unavailable; retry shortly.", 503,
                                request)
        response["Retry-After"] = str(DATABASE_RETRY_AFTER_SECONDS)
        return response


async def _open_stream(request: HttpRequest, job_uuid: uuid.UUID | None, build_id: uuid.UUID) -> HttpResponse:
    # Both queries run on the event loop's shared executor (as the hub's poll does), not
    # thread-sensitive: Django's ASGI handler gives each request a thread of its own that
    # lives as long as the response, so a connection opened there was held by every open
    # stream (500 watchers, 500 idle PostgreSQL connections: past max_connections).
    if job_uuid is None or not await sync_to_async(may_open, thread_sensitive=False)(job_uuid, build_id):
        return stream_error("log_stream_forbidden", "This log token does not open that job's log.", 403, request)

    after = resume_point(request)
    # The first page is read here, so a failure to read comes before the response starts;
    # the rest as the history goes out.
    state, first_page = await sync_to_async(history, thread_sensitive=False)(job_uuid, after)
    response = StreamingHttpResponse(events(hub(), job_uuid, after, first_page, state in TERMINAL_JOB_STATES),
                                     content_type="text/event-stream; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return with_cors(response, request)


async def events(logs: LogHub, job_id: uuid.UUID, after: int, first_page: tuple[list[tuple], bool],
                 finished: bool) -> AsyncIterator[bytes]:
    seq = after
    async for data, seq in history_frames(job_id, after, first_page):
        yield data
    if finished:
        yield frame("done", {})
        return
    # Watched from where the history ended: the hub's next poll brings what came meanwhile
    # (and `done` if the job ended while its history was going out).
    subscriber = logs.subscribe(job_id, seq)
    logs.start_from(subscriber, seq)
    metrics.STREAMS_OPEN.inc()
    try:
        while True:
            try:
                item = await asyncio.wait_for(subscriber.queue.get(), timeout=KEEPALIVE_SECONDS)
            except asyncio.TimeoutError:
                if subscriber.overflowed:
                    return
                yield b": keep-alive\n\n"
                continue
            if item is DONE:
                yield frame("done", {})
                return
            if item is DRAIN:
                # No `done`: the client resumes from the last id it got, on whichever server answers.
                yield f"retry: {DRAIN_RETRY_MS}\n\n".encode()
                return
            if item.seq > subscriber.last_seq:  # else already in the history
                subscriber.last_seq = item.seq
                yield item.frame
            if subscriber.overflowed and subscriber.queue.empty():
                return  # ended without `done`: the client resumes from the last id it got
    finally:
        metrics.STREAMS_OPEN.dec()
        logs.unsubscribe(subscriber)
