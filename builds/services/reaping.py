"""The reaper's verdicts: what agents can no longer report (lost agents, overdue jobs and builds)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from builds import states
from builds.models import Build, Job, JobState
from builds.services.jobs import finish_job, move_job

J = JobState


@dataclass
class ReapReport:
    heartbeat_lost: int = 0
    job_timeouts: int = 0
    pipeline_timeouts: int = 0


def reap(*, now: datetime | None = None, silence_counted_from: datetime | None = None) -> ReapReport:
    """Judge what agents can no longer report: lost agents, overdue jobs, overdue builds.

    - a live job whose agent sent nothing for HEARTBEAT_TIMEOUT → `failed`,
      `agent_heartbeat_lost`;
    - a running job past its timeout (plus a grace for the agent's own stop) →
      `timing_out`, so the agent's next heartbeat tells it to stop;
    - a build past its pipeline `timeout_seconds` (counted from its first job's
      start) → `failed`, `pipeline_timeout`; its waiting jobs `timed_out`, its
      running ones `timing_out` until their agents report.

    `silence_counted_from` is when the caller could last reach the database again after
    failing to: an agent's silence counts only from then (see builds.reaper.OutageGrace).
    """
    now = now or timezone.now()
    report = ReapReport()
    lost_before = now - timedelta(seconds=settings.AGENT_HEARTBEAT_TIMEOUT_SECONDS)
    if silence_counted_from is not None and silence_counted_from > lost_before:
        lost = Job.objects.none()
    else:
        lost = Job.objects.filter(state__in=states.LIVE_JOB_STATES, last_heartbeat_at__lt=lost_before)
    for job in lost.only("id", "build_id", "last_heartbeat_at", "kind", "retry_policy", "soft_fail_policy",
                         "automatic_retries"):
        # Compare-and-set on the heartbeat read above: one that arrives in between keeps its job.
        if finish_job(job=job, state=J.FAILED, error_code="agent_heartbeat_lost",
                      error_message="The agent running this job stopped responding.", now=now,
                      unchanged={"last_heartbeat_at": job.last_heartbeat_at}):
            report.heartbeat_lost += 1

    grace = timedelta(seconds=settings.JOB_TIMEOUT_GRACE_SECONDS)
    # Running jobs are bounded by the number of agents, so checking each in Python is cheap.
    running = Job.objects.filter(state=J.RUNNING, started_at__isnull=False).only(
        "id", "build_id", "started_at", "timeout_seconds")
    for job in running:
        if job.started_at + timedelta(seconds=job.timeout_seconds) + grace < now:
            if move_job(job=job, state=J.TIMING_OUT, now=now):
                report.job_timeouts += 1

    late_builds = Build.objects.filter(
        ~Q(state__in=states.TERMINAL_BUILD_STATES), timeout_seconds__isnull=False, started_at__isnull=False,
        error_code__isnull=True,
    ).only("id", "started_at", "timeout_seconds")
    for build in late_builds:
        if build.started_at + timedelta(seconds=build.timeout_seconds) < now:
            if time_out_build(build_id=build.pk, now=now):
                report.pipeline_timeouts += 1
    return report


def time_out_build(*, build_id: uuid.UUID, now: datetime) -> bool:
    """Fail a build that ran past its pipeline timeout: waiting jobs time out, running ones are told to stop.

    False when the build already ended or was already timed out (a second
    reaper pass, or a racing one).
    """
    with transaction.atomic():
        build = states.lock_build(build_id)
        if build.state in states.TERMINAL_BUILD_STATES or build.error_code:
            return False
        Build.objects.filter(pk=build_id).update(
            error_code="pipeline_timeout",
            error_message=f"The build ran longer than its pipeline timeout of {build.timeout_seconds} s.",
        )
        waiting = Job.objects.filter(build_id=build_id, state__in=(*states.WAITING_JOB_STATES, J.ASSIGNED))
        states.transition_jobs(waiting.values_list("id", flat=True), to=J.TIMED_OUT, now=now,
                               build_id=build_id, error_code="pipeline_timeout")
        running = Job.objects.filter(build_id=build_id, state=J.RUNNING)
        # The code tells the agent's later timed-out report apart from the job's own timeout.
        states.transition_jobs(running.values_list("id", flat=True), to=J.TIMING_OUT, now=now,
                               error_code="pipeline_timeout",
                               error_message=f"Stopped: the build ran longer than its pipeline timeout of "
                                             f"{build.timeout_seconds} s.")
        states.settle_build(build_id=build_id, now=now)
    return True
