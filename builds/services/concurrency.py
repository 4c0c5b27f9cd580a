"""A pipeline's `max_concurrent_builds`: which builds wait for a slot, and admitting them when one frees.

A build created while its pipeline already has its limit of active builds (or
older builds waiting) is created waiting: `Build.waiting_reason` set and its
root jobs `pending`, so it rolls up `scheduled` and no agent's claim sees it
(the claim stays one statement that knows nothing of limits). When an active
build ends, `admit_waiting_builds` runs after that transaction commits and
schedules the oldest waiting builds that fit; the reaper's pass runs it too, for
an admission lost to a process that died after its commit.

Lock order: the pipeline's row, then a build's. `_insert_build` takes the
pipeline's row lock (its build counter) before counting, and admission takes the
same lock before counting, so a create and an admission never both take the last
slot. Nothing takes the pipeline's lock while holding a build's: admission runs
outside the transaction that ended the build.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime

from django.db import transaction
from django.db.models import Count, Q, Subquery
from django.utils import timezone

from builds import states
from builds.models import Build, BuildState
from pipelines.models import Pipeline

log = logging.getLogger("harmont.concurrency")

# A build occupies one of its pipeline's slots from creation until it ends; a held build (waiting
# for an approval) and a waiting one do not. A canceled build frees its slot at once, while its
# jobs may still be stopping: its agents are told to stop, and nothing new of it starts.
ACTIVE_BUILD_STATES = (BuildState.SCHEDULED, BuildState.RUNNING)


def _active(pipeline_id: int) -> Q:
    return Q(pipeline_id=pipeline_id, state__in=ACTIVE_BUILD_STATES, waiting_reason__isnull=True,
             cancel_requested_at__isnull=True)


def waiting_reason_at_create(*, pipeline_id: int, limit: int) -> str | None:
    """Why a build created now must wait (None: it may start). The caller holds the pipeline's row lock.

    It waits when the pipeline has `limit` active builds, and also when older
    builds wait already, so that a new build never overtakes them. Also asked
    when a held build is approved.
    """
    counts = Build.objects.filter(pipeline_id=pipeline_id).aggregate(
        active=Count("pk", filter=_active(pipeline_id)),
        waiting=Count("pk", filter=Q(waiting_reason__isnull=False)))
    if counts["active"] < limit and not counts["waiting"]:
        return None
    reason = (f"Waiting for a concurrency slot: {counts['active']} of {limit} concurrent builds of this "
              f"pipeline are running")
    if counts["waiting"]:
        reason += f", {counts['waiting']} older build{'s' if counts['waiting'] != 1 else ''} waiting first"
    return reason + "."


def admit_waiting_builds(*, pipeline_id: int, now: datetime | None = None) -> list[int]:
    """Schedule the oldest waiting builds of a pipeline that fit under its limit; their numbers.

    Safe to run any number of times and from several processes at once: the
    pipeline's row lock serialises the counting, and each admitted build is
    re-read under its own lock before its flag is cleared. With no limit (it was
    removed) every waiting build is admitted.
    """
    now = now or timezone.now()
    admitted: list[int] = []
    with transaction.atomic():
        # FOR NO KEY UPDATE, like the counter's UPDATE in `_insert_build`: it queues behind that and
        # other admissions, but not behind the FOR KEY SHARE that PostgreSQL's foreign key check takes
        # on the pipeline at the commit of any transaction that updated a build row twice (a cancel,
        # holding that build's lock): a plain FOR UPDATE here deadlocks with it.
        limits = list(Pipeline.objects.select_for_update(no_key=True).filter(pk=pipeline_id)
                      .values_list("max_concurrent_builds", flat=True))
        if not limits:
            return admitted
        limit = limits[0]
        waiting = Build.objects.filter(pipeline_id=pipeline_id, waiting_reason__isnull=False).order_by("number")
        free = None
        if limit is not None:
            free = limit - Build.objects.filter(_active(pipeline_id)).count()
            if free <= 0:
                return admitted
        for build_id in list(waiting.values_list("pk", flat=True)):
            if free is not None and len(admitted) >= free:
                break
            locked = states.lock_build(build_id)
            # Canceled between the read and its lock: the next one in line takes the slot.
            if locked.waiting_reason is None or locked.cancel_requested_at is not None:
                continue
            Build.objects.filter(pk=build_id).update(waiting_reason=None)
            locked.waiting_reason = None
            # Schedules its root jobs (pending, with every prerequisite met) and rolls it up.
            states.settle_build(build_id=build_id, now=now, locked=locked)
            admitted.append(locked.number)
    return admitted


def admit_after_build_end(build_id: uuid.UUID) -> None:
    """Run after the transaction that ended build `build_id` commits: admit what its slot lets in."""
    # One query on every build's end, which for a pipeline without waiting builds is all it costs.
    pipeline_of_build = Build.objects.filter(pk=build_id).values("pipeline_id")[:1]
    pipeline_id = (Build.objects.filter(pipeline_id=Subquery(pipeline_of_build), waiting_reason__isnull=False)
                   .values_list("pipeline_id", flat=True).first())
    if pipeline_id is not None:
        admit_waiting_builds(pipeline_id=pipeline_id)


def admit_everywhere(*, now: datetime | None = None) -> int:
    """The reaper's sweep: admit for every pipeline with waiting builds; how many builds were admitted."""
    pipeline_ids = (Build.objects.filter(waiting_reason__isnull=False).order_by()
                    .values_list("pipeline_id", flat=True).distinct())
    return sum(len(admit_waiting_builds(pipeline_id=pid, now=now)) for pid in list(pipeline_ids))
