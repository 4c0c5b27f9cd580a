"""Writes for jobs: transitions, what agents report, and the reaper's verdicts."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from builds import states
from builds.models import Agent, Build, Job, JobDependency, JobState, LogChunk, StreamKind
from harmont.auth import JOB_CREDENTIAL_PREFIX, hash_secret, new_prefixed_secret

J = JobState
ACTIVE_STATES = (J.ASSIGNED, J.RUNNING, J.CANCELING, J.TIMING_OUT)


def finish_job(*, job: Job, state: str, exit_code: int | None = None, error_code: str | None = None,
               error_message: str | None = None, signal: int | None = None, now: datetime | None = None) -> bool:
    """End a job in a terminal `state`; then skip/schedule what follows and roll up.

    Returns False (and changes nothing) when the job was no longer in a state
    that may move there: the other writer of a race already ended it.
    """
    if state not in states.TERMINAL_JOB_STATES:
        raise ValueError(f"{state} is not a terminal job state")
    now = now or timezone.now()
    with transaction.atomic():
        locked = states.lock_build(job.build_id)
        changed = states.transition_jobs([job.pk], to=state, now=now, exit_code=exit_code,
                                         error_code=error_code, error_message=error_message, signal=signal)
        if changed:
            states.settle_build(build_id=job.build_id, now=now, locked=locked)
    return bool(changed)


def move_job(*, job: Job, state: str, now: datetime | None = None, **fields: Any) -> bool:
    """A non-terminal job transition (assigned, running, canceling, timing_out), then roll up."""
    if state in states.TERMINAL_JOB_STATES:
        raise ValueError("use finish_job for terminal states")
    now = now or timezone.now()
    with transaction.atomic():
        locked = states.lock_build(job.build_id)
        changed = states.transition_jobs([job.pk], to=state, now=now, **fields)
        if changed:
            states.settle_build(build_id=job.build_id, now=now, locked=locked)
    return bool(changed)


# ------------------------------------------------------------------ claiming


@dataclass(frozen=True)
class Claim:
    job: Job
    credential: str  # raw job-scoped credential; only its hash is stored


def claim_job(*, agent: Agent, now: datetime | None = None) -> Claim | None:
    """Give `agent` the oldest scheduled job of its organization, or None.

    PostgreSQL: `FOR UPDATE SKIP LOCKED` lets racing agents each lock a
    different candidate instead of queueing on the same row. SQLite has no row
    locks; there the compare-and-set UPDATE decides, and a loser tries the next
    candidate. Either way one job goes to exactly one agent.
    """
    now = now or timezone.now()
    for _ in range(5):
        with transaction.atomic():
            candidate = (
                # of=("self",): lock (and skip) job rows only, never their build or pipeline.
                Job.objects.select_for_update(skip_locked=True, of=("self",))
                .select_related("build", "build__pipeline")
                .defer("build__pipeline_ir", "build__pipeline__definition", "build__pipeline__triggers")
                .filter(organization_id=agent.organization_id, state=J.SCHEDULED)
                .order_by("scheduled_at", "position")
                .first()
            )
            if candidate is None:
                return None
            credential = new_prefixed_secret(JOB_CREDENTIAL_PREFIX)
            won = states.transition_jobs(
                [candidate.pk], to=J.ASSIGNED, now=now, agent=agent, credential_hash=hash_secret(credential),
                assigned_at=now, last_heartbeat_at=now,
            )
        if won:
            # Only after the claim committed, and without the build's lock: waiting for it
            # while holding the job's deadlocks with cancel_build / time_out_build, which
            # lock the build first and then update its scheduled jobs.
            states.mark_build_running(candidate.build_id)
            candidate.state, candidate.agent = J.ASSIGNED, agent
            return Claim(candidate, credential)
    return None


def job_for_credential(raw: str) -> Job | None:
    return (
        Job.objects.select_related("build", "agent", "agent__token")
        # Agent requests never read these; decoding them was a large part of each request.
        .defer("env", "cache", "runner_args", "build__pipeline_ir", "build__env")
        .filter(credential_hash=hash_secret(raw))
        .first()
    )


# "Last seen" is shown to the second at best; refreshing it on every request of a busy
# agent would be a write per request for nothing.
AGENT_SEEN_RESOLUTION = timedelta(seconds=2)


def touch(job: Job, now: datetime) -> None:
    """A sign of life from the job's agent (also refreshes the agent's last-seen time)."""
    Job.objects.filter(pk=job.pk).update(last_heartbeat_at=now)
    agent_seen_by(job, now)


def agent_seen_by(job: Job, now: datetime) -> None:
    if not job.agent_id:
        return
    agent = job.agent  # loaded with the job by job_for_credential
    if agent.last_seen_at and now - agent.last_seen_at < AGENT_SEEN_RESOLUTION:
        return
    Agent.objects.filter(pk=agent.pk).update(last_seen_at=now)


def start_job(*, job: Job, now: datetime | None = None) -> str:
    """The agent begins running the command: assigned → running. Returns the job's state after."""
    now = now or timezone.now()
    # assigned → running changes no roll-up (the build is running since the claim), so no
    # build lock: a compare-and-set on the job and the build's first start time.
    started = states.transition_jobs([job.pk], to=J.RUNNING, now=now, last_heartbeat_at=now)
    if started:
        states.mark_build_started(job.build_id, now)
    agent_seen_by(job, now)
    return J.RUNNING if started else Job.objects.values_list("state", flat=True).get(pk=job.pk)


def heartbeat(*, job: Job, timing_out: bool = False, now: datetime | None = None) -> str:
    """Record life; the agent may say its job hit its timeout. Returns the job's state after."""
    now = now or timezone.now()
    touch(job, now)
    if timing_out:
        move_job(job=job, state=J.TIMING_OUT, now=now)
    return Job.objects.values_list("state", flat=True).get(pk=job.pk)


# ------------------------------------------------------------------ finishing


def outcome_state(*, current: str, exit_code: int | None, outcome: str | None,
                  error_code: str | None) -> tuple[str, str | None]:
    """The terminal state (and error code) an agent's report means, given the job's state now.

    A stop the server asked for wins over the exit status: a job being canceled
    ends `canceled`, one timing out ends `timed_out`. A stop the agent decided
    on its own (its host shutting down) is a failure of the job, not a cancel,
    so the build does not roll up as passed.
    """
    if current == J.CANCELING:
        return J.CANCELED, None
    if current == J.TIMING_OUT or outcome == "timed_out":
        return J.TIMED_OUT, "job_timeout"
    if outcome == "canceled":
        return J.FAILED, "agent_stopped"
    if error_code:
        return J.FAILED, error_code
    if exit_code == 0:
        return J.PASSED, None
    return J.FAILED, None


def report_finish(*, job: Job, exit_code: int | None, signal: int | None = None, outcome: str | None = None,
                  error_code: str | None = None, error_message: str | None = None,
                  now: datetime | None = None) -> str:
    """The agent's final report. Idempotent: a retried report after success changes nothing."""
    now = now or timezone.now()
    # A cancel or timeout landing between the read and the write makes the compare-and-set
    # lose (running → passed is no move from canceling); judge again from the new state,
    # else the job would sit in canceling until the reaper fails it as lost.
    for _ in range(3):
        current, current_code, current_message = Job.objects.values_list(
            "state", "error_code", "error_message").get(pk=job.pk)
        if current in states.TERMINAL_JOB_STATES:
            return current
        state, code = outcome_state(current=current, exit_code=exit_code, outcome=outcome, error_code=error_code)
        message = error_message
        if state == J.TIMED_OUT and current_code == "pipeline_timeout":
            # Stopped because its build ran out of time (time_out_build), not its own timeout.
            code, message = current_code, message or current_message
        if code == "job_timeout" and not message:
            message = f"The job ran longer than its timeout of {job.timeout_seconds} s."
        if finish_job(job=job, state=state, exit_code=exit_code, signal=signal, error_code=code,
                      error_message=message, now=now):
            agent_seen_by(job, now)
            return state
    return Job.objects.values_list("state", flat=True).get(pk=job.pk)


# ------------------------------------------------------------------ logs


@dataclass(frozen=True)
class ChunkIn:
    seq: int
    stream_kind: int
    content: str
    ts: datetime


def append_log(*, job: Job, chunks: list[ChunkIn], now: datetime | None = None, alive: bool = True) -> int:
    """Store the chunks not stored yet; returns how many were new.

    The job's row lock serialises appends to one job, so a retried batch racing
    its original is stored once and counted once against the log limit. Past
    the limit output is dropped and a single meta chunk says so; the job goes on.
    """
    now = now or timezone.now()
    if not chunks:
        return 0
    limit = settings.JOB_LOG_LIMIT_BYTES
    with transaction.atomic():
        locked = Job.objects.select_for_update().only("id", "log_bytes", "log_truncated").get(pk=job.pk)
        seqs = [chunk.seq for chunk in chunks]
        seen = set(LogChunk.objects.filter(job_id=job.pk, seq__in=seqs).values_list("seq", flat=True))
        rows: list[LogChunk] = []
        added_bytes = 0
        truncated = locked.log_truncated
        for chunk in sorted({c.seq: c for c in chunks if c.seq not in seen}.values(), key=lambda c: c.seq):
            if truncated:
                break
            size = len(chunk.content.encode())
            if locked.log_bytes + added_bytes + size > limit:
                truncated = True
                notice = f"[harmont] log limit of {limit} bytes reached; further output of this job is not stored\n"
                # log_bytes stays the exact size of what is stored (the raw log's Content-Length).
                added_bytes += len(notice.encode())
                rows.append(LogChunk(job_id=job.pk, seq=chunk.seq, stream_kind=StreamKind.META, ts=chunk.ts,
                                     created_at=now, content=notice))
                break
            added_bytes += size
            rows.append(LogChunk(job_id=job.pk, seq=chunk.seq, stream_kind=chunk.stream_kind,
                                 content=chunk.content, ts=chunk.ts, created_at=now))
        LogChunk.objects.bulk_create(rows, ignore_conflicts=True)
        Job.objects.filter(pk=job.pk).update(log_bytes=F("log_bytes") + added_bytes, log_truncated=truncated)
    if alive:
        touch(job, now)
    return len(rows)


# ------------------------------------------------------------------ workspaces


def store_workspace(*, job: Job, archive: bytes) -> None:
    """Keep the files a job left behind for its `builds_in` children."""
    name = default_storage.save(f"workspaces/{job.pk}.tar.gz", ContentFile(archive))
    old = Job.objects.values_list("workspace_archive", flat=True).get(pk=job.pk)
    Job.objects.filter(pk=job.pk).update(workspace_archive=name)
    if old and old != name:
        default_storage.delete(old)


def builds_in_parent(job: Job) -> Job | None:
    edge = (JobDependency.objects.select_related("prerequisite")
            .filter(job=job, kind="builds_in").first())
    return edge.prerequisite if edge else None


@dataclass(frozen=True)
class BuildsInLinks:
    parent_id: uuid.UUID | None  # the job whose files this one starts from
    has_children: bool  # some job starts from this one's files


def builds_in_links(job: Job) -> BuildsInLinks:
    """Both directions of the job's `builds_in` edges, in one query."""
    edges = JobDependency.objects.filter(Q(job=job) | Q(prerequisite=job), kind="builds_in").values_list(
        "job_id", "prerequisite_id")
    parent = None
    children = False
    for job_id, prerequisite_id in edges:
        if job_id == job.pk:
            parent = prerequisite_id
        else:
            children = True
    return BuildsInLinks(parent, children)


# ------------------------------------------------------------------ the reaper


@dataclass
class ReapReport:
    heartbeat_lost: int = 0
    job_timeouts: int = 0
    pipeline_timeouts: int = 0


def reap(*, now: datetime | None = None) -> ReapReport:
    """Judge what agents can no longer report: lost agents, overdue jobs, overdue builds.

    - an active job whose agent sent nothing for HEARTBEAT_TIMEOUT → `failed`,
      `agent_heartbeat_lost`;
    - a running job past its timeout (plus a grace for the agent's own stop) →
      `timing_out`, so the agent's next heartbeat tells it to stop;
    - a build past its pipeline `timeout_seconds` (counted from its first job's
      start) → `failed`, `pipeline_timeout`; its waiting jobs `timed_out`, its
      running ones `timing_out` until their agents report.
    """
    now = now or timezone.now()
    report = ReapReport()
    lost_before = now - timedelta(seconds=settings.AGENT_HEARTBEAT_TIMEOUT_SECONDS)
    for job in Job.objects.filter(state__in=ACTIVE_STATES, last_heartbeat_at__lt=lost_before).only("id", "build_id"):
        if finish_job(job=job, state=J.FAILED, error_code="agent_heartbeat_lost",
                      error_message="The agent running this job stopped responding.", now=now):
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
    with transaction.atomic():
        build = states.lock_build(build_id)
        if build.state in states.TERMINAL_BUILD_STATES or build.error_code:
            return False
        Build.objects.filter(pk=build_id).update(
            error_code="pipeline_timeout",
            error_message=f"The build ran longer than its pipeline timeout of {build.timeout_seconds} s.",
        )
        waiting = Job.objects.filter(build_id=build_id, state__in=(J.PENDING, J.SCHEDULED, J.ASSIGNED))
        states.transition_jobs(waiting.values_list("id", flat=True), to=J.TIMED_OUT, now=now,
                               error_code="pipeline_timeout")
        running = Job.objects.filter(build_id=build_id, state=J.RUNNING)
        # The code tells the agent's later timed-out report apart from the job's own timeout.
        states.transition_jobs(running.values_list("id", flat=True), to=J.TIMING_OUT, now=now,
                               error_code="pipeline_timeout",
                               error_message=f"Stopped: the build ran longer than its pipeline timeout of "
                                             f"{build.timeout_seconds} s.")
        states.settle_build(build_id=build_id, now=now)
    return True

