"""The reaper loop: the part of execution no agent can report on (lost agents, overdue work), and
the rows that only live for a while (expired idempotency keys, agents not seen for a day)."""

from __future__ import annotations

import logging
import threading

from django.db import DatabaseError, close_old_connections

from builds import services
from builds.services.agents import prune_agents
from organizations.idempotency import prune_idempotency_keys

log = logging.getLogger("harmont.reaper")


def run_reaper(*, stop: threading.Event, interval: float, once: bool = False) -> None:
    """Reap every `interval` seconds until `stop` is set. Each pass is idempotent and
    every verdict is a compare-and-set, so several reapers at once are harmless."""
    while not stop.is_set():
        try:
            report = services.reap()
            if report.heartbeat_lost or report.job_timeouts or report.pipeline_timeouts:
                log.info("reaped: %s", report)
            # Here rather than per request: one indexed DELETE every few seconds, not one per create.
            pruned = prune_idempotency_keys()
            if pruned:
                log.info("pruned %d expired idempotency keys", pruned)
            gone = prune_agents()
            if gone:
                log.info("pruned %d agents not seen for a day", gone)
        except DatabaseError:
            log.exception("reaper pass failed; retrying")
            close_old_connections()
        if once:
            return
        stop.wait(interval)
