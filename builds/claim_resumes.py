"""Resumed claims: an idle agent's next claim is held at once, without an attempt, when nothing changed.

An idle agent's held claim ends after its `wait` with 204, and the agent asks
again at once. That next claim's first attempt (a request through Django: the
session lookup, the last-seen write, the claim statement) would tell a process
that heard every notice since nothing it doesn't know: with a thousand idle
agents, those attempts are most of what the fleet costs the server. So the 204
of a held claim carries a one-time key (RESUME_HEADER); the agent sends it back
with its next claim, and the process that issued it holds that claim at once, as
if its first attempt had found nothing again, when all of these hold:

- the key is this process's and unused, and the claim it ended stopped waiting at
  most GAP_SECONDS ago: builds.claim_waits.ClaimHub remembers the notices of that
  gap, and one that concerns the claim wakes it at once (its attempt is then a
  real one);
- the request carries the same session token, and a plain `wait` above 0;
- the process listened to PostgreSQL's notices all the while (a reconnection may
  have missed news), and is not stopping;
- the agent's last real attempt began at most MAX_RESUME_SECONDS ago: what no
  notice tells (its organization deleted, say) is found by the next one.

Otherwise the claim is attempted as usual. A retry of a claim whose answer was
lost sends the key again, which is spent by then: the retry is attempted, and
finds the job its claim key took. Each attempt refreshes the agent's last-seen
time; for resumed claims this module writes it, in batches (SEEN_FLUSH_SECONDS).
SQLite's hub polls instead of hearing notices, so it issues no keys.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from asgiref.sync import sync_to_async
from django.db import close_old_connections

from builds import notices
from harmont import metrics
from harmont.log_format import REQUEST_ID
from harmont.logs import log_request
from harmont.loop_local import LoopLocal
from harmont.tokens import hash_secret

if TYPE_CHECKING:
    from builds.claim_waits import Answer, Hold

log = logging.getLogger("harmont.claims")

# On a held claim's 204, and on the agent's next claim.
RESUME_HEADER = "Harmont-Claim-Resume"
RESUME_META = "HTTP_HARMONT_CLAIM_RESUME"
# Below the hub's memory of notices (claim_waits.RECENT_SECONDS), so news of the gap is not forgotten.
GAP_SECONDS = 2.0
MAX_RESUME_SECONDS = 300.0
SEEN_FLUSH_SECONDS = 2.0  # as often as an attempt may refresh last-seen (selectors.AGENT_SEEN_RESOLUTION)


@dataclass(frozen=True)
class Resume:
    """What a held claim that ran out leaves for the agent's next claim."""

    session_hash: str
    answer: Answer  # the 204 of its last attempt, the hold header included
    hold: Hold
    attempted_at: float  # loop time its last real attempt began
    ended_at: float  # loop time it stopped waiting


@dataclass
class ResumeBook:
    """The keys one process (event loop) issued, and the agents its resumed claims saw."""

    issued: dict[str, Resume] = field(default_factory=dict)  # by key, in the order issued
    unseen: set[str] = field(default_factory=set)  # agent ids whose last-seen time is to be written
    flusher: asyncio.Task | None = None
    closed: bool = False

    def issue(self, resume: Resume) -> str | None:
        """A key for the agent's next claim; None when that claim could not be resumed here anyway."""
        if self.closed or not _listening_since(resume.attempted_at):
            return None
        self._forget_before(resume.ended_at - GAP_SECONDS)
        key = secrets.token_urlsafe(18)
        self.issued[key] = resume
        return key

    def take(self, key: str, session_hash: str) -> Resume | None:
        """The claim `key` was issued for, if the claim presenting it (with `session_hash`) may be held at once."""
        resume = self.issued.pop(key, None)  # spent either way
        if resume is None or not hmac.compare_digest(resume.session_hash, session_hash) or self.closed:
            return None
        now = asyncio.get_running_loop().time()
        if now - resume.ended_at > GAP_SECONDS or now - resume.attempted_at > MAX_RESUME_SECONDS:
            return None
        return resume if _listening_since(resume.attempted_at) else None

    def close(self) -> None:
        """The server is stopping: no claim is resumed here any more."""
        self.closed = True
        self.issued.clear()

    def seen(self, agent_id: str) -> None:
        """A resumed claim of `agent_id` began: its last-seen time is written with the next batch."""
        self.unseen.add(agent_id)
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush())

    def _forget_before(self, cutoff: float) -> None:
        while self.issued:
            key = next(iter(self.issued))
            if self.issued[key].ended_at >= cutoff:
                return
            del self.issued[key]

    async def _flush(self) -> None:
        while self.unseen:
            await asyncio.sleep(SEEN_FLUSH_SECONDS)
            batch, self.unseen = self.unseen, set()
            try:
                await sync_to_async(_mark_seen, thread_sensitive=False)(sorted(batch))
            except Exception:  # noqa: BLE001 - the next attempt of each agent writes it anyway
                log.exception("writing %d resumed agents' last-seen time failed", len(batch))


def _listening_since(moment: float) -> bool:
    """Whether this loop's listener has heard every notice since loop time `moment`."""
    if not notices.listening():
        return False
    since = notices.listener().connected_since
    return since is not None and since <= moment


def _mark_seen(agent_ids: list[str]) -> None:
    from builds.services.agents import mark_agents_seen

    close_old_connections()  # a thread of the pool keeps its connection between batches, as a request would
    mark_agents_seen(agent_ids=[uuid.UUID(agent_id) for agent_id in agent_ids])


resume_book = LoopLocal(ResumeBook)  # the running event loop's book


def session_hash(header: Callable[[str], str | None]) -> str | None:
    """The hash of a claim's bearer token (`header`: its headers by lower-case name), as sessions are stored."""
    scheme, _, token = (header("authorization") or "").partition(" ")
    return hash_secret(token.strip()) if scheme.lower() == "bearer" and token.strip() else None


def plain_wait(body: bytes, query: str) -> float | None:
    """The `wait` of a well-formed claim that asks to wait (as the claim view reads it), else None: such a
    claim is attempted, and the view words what is wrong with it."""
    from builds.agent_serializers import plain_claim

    try:
        data = json.loads(body) if body else {}
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if "wait" not in data:
        waits = parse_qs(query).get("wait")
        if waits:
            try:
                data = {**data, "wait": float(waits[-1])}
            except ValueError:
                return None
    ask = plain_claim(data)
    return ask.wait if ask is not None and ask.wait > 0 else None


def log_resumed(*, path: str, request_id: str, hold: Hold, started: float) -> None:
    """The request line and metric a resumed claim's skipped attempt would have had (harmont.logs)."""
    duration = time.perf_counter() - started
    metrics.REQUEST_SECONDS.labels("POST", path, "204").observe(duration)
    metrics.CLAIMS_RESUMED.inc()
    token = REQUEST_ID.set(request_id)
    try:
        log_request(method="POST", route=path, path=path, status=204, duration=duration, agent_id=hold.agent_id,
                    organization_id=hold.organization_id, resumed=True)
    finally:
        REQUEST_ID.reset(token)
