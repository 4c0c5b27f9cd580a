"""Long-poll claims: `POST /api/v0/agent/claim` with `wait` is held in the event loop until a job may be there.

The ASGI entry point (harmont.asgi) hands claims to `long_poll_claim`. Each
attempt is the ordinary claim view, run on the WSGI thread pool like every
REST request (authentication, validation, the one-statement claim, the error
envelope); only the waiting between attempts happens here, as an
`asyncio.Event` of a `Waiter`, so a held claim costs no thread. An attempt that
finds nothing says so with the internal `x-harmont-claim-hold` header (the
agent's organization, id and tags), and the claim waits until one of these:

- a job the agent's tags match became claimable in its organization: the next
  attempt claims it (or finds it taken and waits again);
- its organization's agent tokens or this agent changed (revoked, disconnected):
  the next attempt answers 401 at once;
- `wait` seconds passed since the request came: 204, as a claim without `wait`;
- the client went away: nothing is answered, and a job claimed meanwhile is
  handed back (assigned → scheduled) for another agent.

Where the news comes from: on PostgreSQL, the triggers of builds.sql NOTIFY
`harmont_claims` when jobs are inserted scheduled, handed back, or freed a
concurrency slot, and the services NOTIFY revocations; the process's one
LISTEN connection (builds.notices) hands them to `ClaimHub`, which wakes the
matching waiters. On SQLite the hub polls the
database instead (POLL_SECONDS), while someone waits.

One job wakes one waiter (the oldest waiting whose tags match its selector),
not every waiter of the organization: a thousand idle agents don't all try for
each job. A woken waiter that claims wakes the next matching one, in case the
notice stood for several jobs (identical notices of one transaction arrive
once); one that finds nothing ends the chain.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from asgiref.sync import sync_to_async
from django.db import close_old_connections

from builds import claim_resumes, notices
from harmont import claim_notices, metrics
from harmont.loop_local import LoopLocal
from pipelines import agent_tags

log = logging.getLogger("harmont.claims")

CLAIM_PATH = "/api/v0/agent/claim"
# Attempt (this module) → view: this layer holds 204s, so tell it whom the claim is for.
LONG_POLL_HEADER = "x-harmont-long-poll"
LONG_POLL_META = "HTTP_X_HARMONT_LONG_POLL"
# View → this layer, never sent on: `<organization id> <agent id> <wait> <tags JSON>`.
HOLD_HEADER = "x-harmont-claim-hold"
# On the answer of a held claim: the seconds it was held. Agents that see no such header poll.
WAITED_HEADER = "Harmont-Claim-Wait"
# The body of a claim is a little JSON; anything larger is answered without holding.
MAX_BODY_BYTES = 64 * 1024
POLL_SECONDS = 0.1  # SQLite: how often the hub looks for news while someone waits
# A notice that came just before its waiter was registered still counts (see ClaimHub.add).
RECENT_SECONDS = 5.0

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
App = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]


def hold_value(*, organization_id: int, agent_id: uuid.UUID, wait: float, tags: dict[str, str]) -> str:
    """What the claim view puts in HOLD_HEADER (ASCII: the tags' JSON escapes the rest)."""
    return Hold(organization_id, str(agent_id), wait, agent_tags.effective_tags(tags)).value()


@dataclass(frozen=True)
class Hold:
    organization_id: int
    agent_id: str
    wait: float
    tags: dict[str, str]  # effective: with the default queue

    @classmethod
    def parse(cls, value: str) -> Hold:
        organization, agent, wait, tags = value.split(" ", 3)
        return cls(int(organization), agent, float(wait), json.loads(tags))

    def value(self) -> str:
        return f"{self.organization_id} {self.agent_id} {self.wait:g} {json.dumps(self.tags, sort_keys=True)}"


@dataclass(eq=False)
class Waiter:
    hold: Hold
    since: float  # loop time its first attempt started: notices after it concern it
    event: asyncio.Event = field(default_factory=asyncio.Event)
    # The selector of the job it was woken for: a claim then wakes the next waiter for it.
    selector: dict[str, str] | None = None
    expired_at: float | None = None  # loop time its wait ran out (from then on, news went to others)

    def matches(self, selector: dict[str, str]) -> bool:
        return agent_tags.selector_matches(selector, self.hold.tags)

    def wake(self, selector: dict[str, str] | None = None) -> None:
        if selector is not None:
            self.selector = selector
        self.event.set()

    def expire(self) -> None:
        if not self.event.is_set():
            self.expired_at = time_now()
            self.event.set()


@dataclass(frozen=True)
class Notice:
    at: float
    organization_id: int | None  # None: an agent's (`a`)
    selector: dict[str, str] | None  # None: check credentials again (`o`, `a`)
    agent_id: str | None = None

    def concerns(self, waiter: Waiter) -> bool:
        if self.agent_id is not None:
            return self.agent_id == waiter.hold.agent_id
        return self.organization_id == waiter.hold.organization_id and (
            self.selector is None or waiter.matches(self.selector))


class ClaimHub:
    """The waiting claims of one process (one event loop), and what wakes them."""

    def __init__(self) -> None:
        self.waiting: dict[int, list[Waiter]] = {}
        self.recent: list[Notice] = []
        self.closing = False
        self.following = False  # PostgreSQL: the loop's listener hands us the claims channel
        self.task: asyncio.Task | None = None  # SQLite: the poll

    # ---------------------------------------------------------------- waiters

    def add(self, waiter: Waiter) -> None:
        """Register `waiter`; a notice for it that came since its first attempt began wakes it at once."""
        self.waiting.setdefault(waiter.hold.organization_id, []).append(waiter)
        if notices.listening():
            if not self.following:
                self.following = True
                notices.listener().follow(claim_notices.CHANNEL, notices.Follower(self.dispatch, self.recheck))
        elif self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._poll())
        for notice in self.recent:
            if notice.at >= waiter.since and notice.concerns(waiter):
                waiter.wake(notice.selector)
                return
        if self.closing:
            waiter.wake()

    def remove(self, waiter: Waiter) -> bool:
        """Forget `waiter`; whether it was waiting."""
        queue = self.waiting.get(waiter.hold.organization_id)
        if queue is None:
            return False
        try:
            queue.remove(waiter)
        except ValueError:
            return False
        if not queue:
            del self.waiting[waiter.hold.organization_id]
        return True

    # ---------------------------------------------------------------- news

    def job_claimable(self, organization_id: int, selector: dict[str, str]) -> bool:
        """A job with `selector` may be claimable: wake the oldest matching waiter not woken yet."""
        self._remember(Notice(time_now(), organization_id, selector))
        for waiter in self.waiting.get(organization_id, ()):
            if not waiter.event.is_set() and waiter.matches(selector):
                waiter.wake(selector)
                return True
        return False

    def recheck(self, organization_id: int | None = None, agent_id: str | None = None) -> None:
        """Credentials changed (or news may have been missed): the waiters concerned try again."""
        if organization_id is not None or agent_id is not None:
            self._remember(Notice(time_now(), organization_id, None, agent_id))
        for queue in list(self.waiting.values()):
            for waiter in queue:
                if (organization_id is None and agent_id is None) or waiter.hold.organization_id == organization_id \
                        or waiter.hold.agent_id == agent_id:
                    waiter.wake()

    def close(self) -> None:
        """The server is stopping: every waiting claim is answered now (204), none is held again."""
        self.closing = True
        claim_resumes.resume_book().close()
        self.recheck()

    def dispatch(self, payload: str) -> None:
        """One notice of the claims channel (harmont.claim_notices)."""
        kind, _, rest = payload.partition(" ")
        try:
            if kind == "j":
                organization, _, selector = rest.partition(" ")
                self.job_claimable(int(organization), agent_tags.job_selector(json.loads(selector) if selector
                                                                               else None))
            elif kind == "o":
                self.recheck(organization_id=int(rest))
            elif kind == "a":
                self.recheck(agent_id=rest)
        except ValueError:
            log.warning("ignored a malformed claim notice %r", payload[:200])

    def _remember(self, notice: Notice) -> None:
        cutoff = notice.at - RECENT_SECONDS
        self.recent = [old for old in self.recent if old.at >= cutoff]
        self.recent.append(notice)

    async def _poll(self) -> None:
        seen: dict[Any, float] = {}
        since = None
        while True:
            await asyncio.sleep(POLL_SECONDS)
            if not self.waiting:
                since = None
                continue
            try:
                since, news = await sync_to_async(_poll_in_thread, thread_sensitive=False)(list(self.waiting), since)
            except Exception:  # noqa: BLE001
                log.exception("claim poll failed; retrying")
                continue
            now = time_now()
            for key, payload in news:
                if key not in seen:
                    seen[key] = now
                    self.dispatch(payload)
            for key in [key for key, at in seen.items() if at < now - RECENT_SECONDS * 2]:
                del seen[key]


def time_now() -> float:
    return asyncio.get_running_loop().time()


def poll_news(organization_ids: list[int], since: Any) -> tuple[Any, list[tuple[Any, str]]]:
    """SQLite: what happened to the waiting organizations since `since`, as (dedupe key, notice) pairs.

    Looks back a little further than the last poll: a transaction that began
    before it may commit after it, with an earlier timestamp. The keys keep a
    notice from counting twice.
    """
    from django.db.models import Q
    from django.utils import timezone

    from builds.models import Agent, Job, JobState

    now = timezone.now()
    since = since or now
    after = since - timedelta(seconds=RECENT_SECONDS)
    news: list[tuple[Any, str]] = []
    scheduled = (Job.objects.filter(organization_id__in=organization_ids, state=JobState.SCHEDULED,
                                    scheduled_at__gte=after)
                 .values_list("id", "organization_id", "agents"))
    for job_id, organization_id, selector in scheduled:
        news.append((("j", job_id), f"j {organization_id} {json.dumps(selector) if selector is not None else ''}"))
    # A concurrency group's job ended: its group's waiting jobs may have room now.
    freed = (Job.objects.filter(organization_id__in=organization_ids, concurrency_group__isnull=False,
                                finished_at__gte=after).values_list("id", "organization_id"))
    for job_id, organization_id in freed:
        news.append((("g", job_id), f"o {organization_id}"))
    gone = (Agent.objects.filter(organization_id__in=organization_ids)
            .filter(Q(stopped_at__gte=after) | Q(token__revoked_at__gte=after)).values_list("id", "stopped_at"))
    for agent_id, stopped_at in gone:
        news.append((("a", agent_id, stopped_at), f"a {agent_id}"))
    return now, news


def _poll_in_thread(organization_ids: list[int], since: Any) -> tuple[Any, list[tuple[Any, str]]]:
    close_old_connections()  # a thread of the pool keeps its connection between polls, as a request would
    return poll_news(organization_ids, since)


claim_hub = LoopLocal(ClaimHub)  # the running event loop's hub


# ------------------------------------------------------------------ the held request


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> str | None:
        wanted = name.encode()
        return next((value.decode("latin-1") for key, value in self.headers if key == wanted), None)


async def read_body(receive: Receive) -> tuple[bytes, bool]:
    """The request's body, and whether it ended within MAX_BODY_BYTES (else what was read so far)."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return bytes(body), False
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return bytes(body), True
        if len(body) > MAX_BODY_BYTES:
            return bytes(body), False


async def attempt(app: App, scope: dict[str, Any], body: bytes) -> Answer:
    """One pass of the request through `app` (the WSGI side), its answer collected instead of sent."""
    delivered = False

    async def replay() -> dict[str, Any]:
        nonlocal delivered
        if delivered:
            await asyncio.Event().wait()  # nothing more will come; the app never asks
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    answer = Answer(500, [], b"")
    chunks: list[bytes] = []

    async def collect(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer.status, answer.headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, replay, collect)
    answer.body = b"".join(chunks)
    return answer


def attempt_wsgi(app: Callable[..., Any], environ: dict[str, Any], body: bytes) -> Answer:
    """`attempt` on a WSGI application, in the calling thread (harmont.worker's first attempt, and
    those after news, on its threads)."""
    answer = Answer(500, [], b"")
    chunks: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        answer.status = int(status.split(" ", 1)[0])
        answer.headers = [(key.lower().encode("latin-1"), value.encode("latin-1")) for key, value in headers]
        return chunks.append

    result = app({**environ, "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body))}, start_response)
    try:
        chunks.extend(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    answer.body = b"".join(chunks)
    return answer


def attempt_environ(environ: dict[str, Any]) -> dict[str, Any]:
    """`attempt_scope` for a WSGI environ."""
    return {"HTTP_X_REQUEST_ID": uuid.uuid4().hex, **environ, LONG_POLL_META: "1"}


async def send_answer(send: Send, answer: Answer, *, waited: float | None, resume_key: str | None = None) -> None:
    headers = [(key, value) for key, value in answer.headers if key != HOLD_HEADER.encode()]
    if waited is not None:
        headers.append((WAITED_HEADER.lower().encode(), f"{waited:.3f}".encode()))
    if resume_key is not None:
        headers.append((claim_resumes.RESUME_HEADER.lower().encode(), resume_key.encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body, "more_body": False})


def attempt_scope(scope: dict[str, Any]) -> dict[str, Any]:
    """The scope of each attempt: marked for the view, with one request id for all of them."""
    headers = [(key, value) for key, value in scope["headers"] if key != LONG_POLL_HEADER.encode()]
    if not any(key == b"x-request-id" for key, _ in headers):
        headers.append((b"x-request-id", uuid.uuid4().hex.encode()))
    return {**scope, "headers": [*headers, (LONG_POLL_HEADER.encode(), b"1")]}


async def _watch_disconnect(receive: Receive, on_gone: Callable[[], None]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            on_gone()
            return


async def _wait_for(waiter: Waiter, timeout: float) -> None:
    """Until news wakes `waiter`, the client leaves (which wakes it too), or `timeout` runs out (which
    expires it). One event and a timer: a thousand idle claims start and end a wait every 30 s."""
    timer = asyncio.get_running_loop().call_later(timeout, waiter.expire)
    try:
        await waiter.event.wait()
    finally:
        timer.cancel()


async def long_poll_claim(scope: dict[str, Any], receive: Receive, send: Send, app: App) -> None:
    """Answer one claim request, holding it while the agent asked to wait and nothing is there."""
    body, complete = await read_body(receive)
    if not complete:
        await _pass_through(scope, body, receive, send, app)
        return
    scope = attempt_scope(scope)
    headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
    await resume_or_hold(lambda: attempt(app, scope, body), receive, send, header=headers.get, body=body,
                         query=scope.get("query_string", b"").decode("latin-1"), request_id=headers["x-request-id"])


async def resume_or_hold(try_claim: Callable[[], Awaitable[Answer]], receive: Receive, send: Send, *,
                         header: Callable[[str], str | None], body: bytes, query: str, request_id: str) -> None:
    """A claim handed to the loop before any attempt: held at once if it resumes the agent's last one and
    may (builds.claim_resumes), else attempted (`try_claim`) and held as any."""
    session_hash = claim_resumes.session_hash(header)
    key = header(claim_resumes.RESUME_HEADER.lower())
    resume = claim_resumes.resume_book().take(key, session_hash) if key and session_hash else None
    wait = claim_resumes.plain_wait(body, query) if resume is not None else None
    if resume is None or wait is None:
        await hold_claim(try_claim, receive, send, session_hash=session_hash)
        return
    started = time.perf_counter()
    hold = replace(resume.hold, wait=wait)
    headers = [(name, value) for name, value in resume.answer.headers
               if name not in (HOLD_HEADER.encode(), b"x-request-id")]
    first = Answer(204, [*headers, (b"x-request-id", request_id.encode()), (HOLD_HEADER.encode(), hold.value().encode())],
                   b"")
    claim_resumes.resume_book().seen(hold.agent_id)
    claim_resumes.log_resumed(path=CLAIM_PATH, request_id=request_id, hold=hold, started=started)
    await hold_claim(try_claim, receive, send, first=first, session_hash=session_hash, resumed=resume)


async def hold_claim(try_claim: Callable[[], Awaitable[Answer]], receive: Receive, send: Send, *,
                     first: Answer | None = None, started: float | None = None, session_hash: str | None = None,
                     resumed: claim_resumes.Resume | None = None) -> None:
    """Attempt the claim (`try_claim`, or `first`: the answer of an attempt made before, which
    began at `started`, time.monotonic(), or of the claim it resumes) and attempt it again each time
    news may concern it, for as long as its `wait`; then send the answer. A claim that ran out
    leaves a resume key for the next (with the hash of its session token, `session_hash`)."""
    hub = claim_hub()
    if resumed is not None:
        # Held as the last claim was: news since that one stopped waiting concerns this one.
        since, attempted_at, started = resumed.ended_at, resumed.attempted_at, time.monotonic()
    else:
        # The loop's clock is time.monotonic(): a first attempt made on a thread began at `since`.
        since = time_now() if started is None else started
        started = time.monotonic() if started is None else started
        attempted_at = since
    gone = asyncio.Event()
    waiter: Waiter | None = None

    def on_gone() -> None:
        gone.set()
        if waiter is not None:
            waiter.event.set()  # ends its wait (and no news is handed to it any more)

    watcher = asyncio.ensure_future(_watch_disconnect(receive, on_gone))
    # Job notices this claim was woken for and won't use: passed on to the next waiter once it is gone
    # (not before, or the oldest waiter, itself, would take them back).
    pass_on: list[dict[str, str]] = []
    outcome = "gone"

    def leave() -> None:
        if waiter is None or not hub.remove(waiter):
            return
        if waiter.event.is_set() and waiter.selector is not None:
            pass_on.append(waiter.selector)  # a job's notice came during the last attempt
        for selector in pass_on:
            hub.job_claimable(waiter.hold.organization_id, selector)

    try:
        while True:
            woken_for = None
            if waiter is not None:
                # What woke this attempt is taken now; news from now on counts for the next attempt.
                woken_for, waiter.selector = waiter.selector, None
                waiter.event.clear()
            if first is None:
                attempted_at = time_now()
            answer, first = (first, None) if first is not None else (await try_claim(), None)
            hold = answer.header(HOLD_HEADER)
            if woken_for is not None and answer.status == 200:
                pass_on.append(woken_for)  # woken for a job and got one: the notice may have stood for more
            if answer.status != 204 or hold is None:
                leave()
                if gone.is_set() and answer.status == 200:
                    await sync_to_async(_hand_back, thread_sensitive=False)(answer.body)
                    return
                outcome = "job" if answer.status == 200 else str(answer.status)
                await send_answer(send, answer, waited=time.monotonic() - started if waiter else None)
                return
            if waiter is None:
                waiter = Waiter(Hold.parse(hold), since)
                hub.add(waiter)
                metrics.CLAIMS_HELD.inc()
            left = waiter.hold.wait - (time.monotonic() - started)
            if not gone.is_set() and left > 0 and not hub.closing and not waiter.event.is_set():
                await _wait_for(waiter, left)
            if gone.is_set():
                return
            if waiter.expired_at is not None or not waiter.event.is_set() or hub.closing:
                outcome = "empty"  # the wait is over (or the server is stopping)
                leave()
                key = None if session_hash is None else claim_resumes.resume_book().issue(claim_resumes.Resume(
                    session_hash, answer, waiter.hold, attempted_at, waiter.expired_at or time_now()))
                await send_answer(send, answer, waited=time.monotonic() - started, resume_key=key)
                return
    finally:
        watcher.cancel()
        leave()
        if waiter is not None:
            metrics.CLAIMS_HELD.dec()
            metrics.CLAIM_HOLD_SECONDS.labels(outcome).observe(time.monotonic() - started)


async def _pass_through(scope: dict[str, Any], body: bytes, receive: Receive, send: Send, app: App) -> None:
    """A request too large to hold: the app reads what was read, then the rest, as it would have."""
    replayed = False

    async def rest() -> dict[str, Any]:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": True}
        return await receive()

    await app(scope, rest, send)


def _hand_back(body: bytes) -> None:
    """The agent left before its claim's answer went out: the job it took goes back to the queue."""
    from builds import services

    try:
        job_id = json.loads(body)["job"]["id"]
    except (ValueError, KeyError, TypeError):
        return
    close_old_connections()
    services.hand_back_claim(job_id=uuid.UUID(str(job_id)))
