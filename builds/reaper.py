"""The reaper loop: the part of execution no agent can report on (lost agents, overdue work), the
rows that only live for a while (expired idempotency keys, agents not seen for a day), the
pipelines' schedules (their due builds), builds waiting for a concurrency slot, and the webhook
deliveries whose task got lost or failed, handed to the queue again."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from django.conf import settings
from django.db import DatabaseError, close_old_connections
from django.utils import timezone

from builds import services
from harmont import metrics
from builds.services.agents import prune_agents
from organizations.idempotency import prune_idempotency_keys

log = logging.getLogger("harmont.reaper")


class OutageGrace:
    """When the reaper could reach the database again after a failed pass.

    A reaper can't tell an agent that is gone from one that could not get through to a
    database that was away: both are silent. So after an outage no job is judged lost
    until a full heartbeat timeout has passed since the database answered again, which
    gives every agent that timeout to get its heartbeats in.
    """

    def __init__(self) -> None:
        self.outage = False
        self.back_since: datetime | None = None

    def failed(self) -> None:
        self.outage = True
        self.back_since = None

    def silence_counted_from(self, now: datetime) -> datetime | None:
        """For the pass starting at `now`: the `silence_counted_from` it gives `reap`."""
        if not self.outage:
            return None
        if self.back_since is None:
            self.back_since = now  # this pass is the first since; a failure of it starts over
        if now - self.back_since >= timedelta(seconds=settings.AGENT_HEARTBEAT_TIMEOUT_SECONDS):
            self.outage = False
        return self.back_since


def run_reaper(*, stop: threading.Event, interval: float, once: bool = False, grace: OutageGrace | None = None,
               clock: Callable[[], datetime] = timezone.now) -> None:
    """Reap every `interval` seconds until `stop` is set. Each pass is idempotent and
    every verdict is a compare-and-set, so several reapers at once are harmless.

    `grace` carries what the reaper knows of database outages from one pass to the next
    (a test passes its own, with a `clock` of its own)."""
    grace = grace or OutageGrace()
    while not stop.is_set():
        try:
            now = clock()
            report = services.reap(now=now, silence_counted_from=grace.silence_counted_from(now))
            metrics.count_reaped([("agent_heartbeat_lost", report.heartbeat_lost), ("job_timeout", report.job_timeouts),
                                  ("pipeline_timeout", report.pipeline_timeouts)])
            if report.heartbeat_lost or report.job_timeouts or report.pipeline_timeouts:
                log.info("reaped: %s", report)
            # Here rather than per request: one indexed DELETE every few seconds, not one per create.
            pruned = prune_idempotency_keys()
            if pruned:
                log.info("pruned %d expired idempotency keys", pruned)
            gone = prune_agents()
            if gone:
                log.info("pruned %d agents not seen for a day", gone)
            requeued = services.requeue_webhook_deliveries(now=now)
            if requeued:
                log.info("handed %d webhook deliveries to the task queue again", requeued)
            swept = services.sweep_notifications(now=now)
            if swept:
                log.info("handed %d lanes of commit statuses and webhook events to the task queue again", swept)
            scheduled = services.run_due_schedules(now=now)
            if scheduled:
                log.info("scheduled builds: %s", ", ".join(f"{b.pipeline.slug}#{b.number}" for b in scheduled))
            # Builds whose admission was lost (a process died between a build's end and admitting the next).
            admitted = services.admit_everywhere(now=now)
            if admitted:
                log.info("admitted %d builds waiting for a concurrency slot", admitted)
        except DatabaseError:
            log.exception("reaper pass failed; retrying")
            grace.failed()
            close_old_connections()
        if once:
            return
        stop.wait(interval)
