"""The schedule tick: one build per due time of each enabled schedule, whoever runs the tick."""

from __future__ import annotations

import logging
from datetime import datetime

from django.db import IntegrityError, transaction
from django.utils import timezone

from builds.models import Build, BuildSource
from builds.services.builds import BuildPlanRejected, create_build, validate_build_request
from harmont.errors import ApiError
from pipelines.models import PipelineSchedule, ScheduledRun
from pipelines.cron import latest_due_at_or_before, next_due_after

log = logging.getLogger("harmont.schedules")


def run_due_schedules(*, now: datetime | None = None) -> list[Build]:
    """Create the build of every enabled schedule that is due at `now`; the builds created.

    Called by every reaper's pass, so several processes may run it at once. For
    each due schedule the latest due time at or before `now` is claimed by
    inserting its `ScheduledRun` row (unique per schedule and due time), in the
    same transaction as the build: only the process whose insert commits creates
    a build, and a process that dies half-way leaves neither. After downtime
    only that latest missed time runs (at most one catch-up), then `next_run_at`
    moves past `now`.
    """
    now = now or timezone.now()
    created: list[Build] = []
    due = (PipelineSchedule.objects.filter(enabled=True, next_run_at__lte=now, pipeline__archived_at__isnull=True)
           .select_related("pipeline", "created_by").order_by("next_run_at", "pk"))
    for schedule in due:
        try:
            build = _run_schedule(schedule=schedule, now=now)
        except IntegrityError:
            build = None  # another process claimed this due time first
        _advance(schedule=schedule, now=now)
        if build is not None:
            created.append(build)
    return created


def _run_schedule(*, schedule: PipelineSchedule, now: datetime) -> Build | None:
    due_at = latest_due_at_or_before(cron=schedule.cron, zone=schedule.timezone, moment=now)
    with transaction.atomic():
        # On PostgreSQL a second process's insert of the same row waits for this transaction and then fails.
        run = ScheduledRun.objects.create(schedule=schedule, due_at=due_at, created_at=now)
        build = None
        try:
            request = validate_build_request(
                branch=schedule.branch, commit=schedule.commit, env=schedule.env,
                message=schedule.message or f"Scheduled build ({schedule.cron}, {schedule.timezone})",
                source=BuildSource.SCHEDULE, allowed_sources=frozenset({BuildSource.SCHEDULE}))
            # The server's own path: `allow_manual: false` pipelines build too. The schedule's
            # creator is named, but no role: the build's secrets follow the branch's rules.
            build = create_build(pipeline=schedule.pipeline, request=request, created_by=schedule.created_by,
                                 now=now)
        except ApiError as exc:
            if isinstance(exc, BuildPlanRejected):
                build = exc.build  # recorded as a failed build, like any rejected plan
            else:
                # Stored fields were checked when saved; should one be refused now, the due time is
                # still spent (recorded without a build) rather than retried on every pass.
                log.warning("schedule %s could not build at %s: %s", schedule.pk, due_at.isoformat(), exc.message)
        ScheduledRun.objects.filter(pk=run.pk).update(build=build)
        PipelineSchedule.objects.filter(pk=schedule.pk).update(last_run_at=due_at, last_build=build)
    log.info("schedule %s: build #%s for %s", schedule.pk, build.number if build else None, due_at.isoformat())
    return build


def _advance(*, schedule: PipelineSchedule, now: datetime) -> None:
    """Move `next_run_at` past `now`, unless another process already moved it (compare-and-set)."""
    following = next_due_after(cron=schedule.cron, zone=schedule.timezone, after=now)
    PipelineSchedule.objects.filter(pk=schedule.pk, next_run_at=schedule.next_run_at).update(next_run_at=following)
