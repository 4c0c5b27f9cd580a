"""Writes for jobs: transitions, what agents report, and the reaper's verdicts."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from builds import states
from builds.models import Agent, Build, BuildState, Job, JobDependency, JobState, LogChunk, StreamKind
from harmont.auth import JOB_CREDENTIAL_PREFIX, hash_secret, new_prefixed_secret
from harmont.rows import Columns, first_row
from pipelines.models import Pipeline

J = JobState
ACTIVE_STATES = (J.ASSIGNED, J.RUNNING, J.CANCELING, J.TIMING_OUT)


def finish_job(*, job: Job, state: str, exit_code: int | None = None, error_code: str | None = None,
               error_message: str | None = None, signal: int | None = None, now: datetime | None = None,
               expected: str | None = None, chunks: Sequence[ChunkIn] = ()) -> bool:
    """End a job in a terminal `state`; then skip/schedule what follows and roll up.

    Returns False (and changes nothing but storing `chunks`) when the job was
    no longer in a state that may move there: the other writer of a race
    already ended it. With `expected`, also when the job is no longer in that
    state (the caller chose `state` because the job was `expected`).

    `chunks`, the job's last output, are stored in the same transaction: no
    reader sees the job ended without them, and its row is written once.
    """
    if state not in states.TERMINAL_JOB_STATES:
        raise ValueError(f"{state} is not a terminal job state")
    now = now or timezone.now()
    with transaction.atomic():
        # The output goes first, before the build's lock when it can: every end of one of
        # the build's jobs queues for that lock, so it is held for as few statements as
        # possible. (Inserting takes no lock that a writer holding the build's waits for.)
        log = _store_fitting_chunks(job, chunks, now) if chunks else {}
        build = states.lock_build_for_roll_up(job.build_id)
        if log is None:
            # Near the log limit: under the job's row lock, which comes after the build's
            # (as for every writer that takes both).
            log = _store_chunks(job.pk, chunks, now)[1]
        changed, others = states.end_job(job_id=job.pk, build_id=job.build_id, to=state, now=now,
                                         only_from=None if expected is None else (expected,), exit_code=exit_code,
                                         error_code=error_code, error_message=error_message, signal=signal, **log)
        if changed:
            states.settle_after_job_end(build_id=job.build_id, build=build, job_id=job.pk, state=state,
                                        others=others, now=now)
        elif log:
            _set_job_columns(job.pk, log)  # the job moved on meanwhile; its output is kept all the same
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


def claim_job(*, agent: Agent, now: datetime | None = None, claim_key: str | None = None) -> Claim | None:
    """Give `agent` the oldest scheduled job of its organization, or None.

    A claim retried with the same `claim_key` gets the job the first attempt took.
    """
    claim = claim_for_agent(agent_id=agent.pk, organization_id=agent.organization_id, now=now, claim_key=claim_key)
    if claim is not None:
        claim.job.agent = agent
    return claim


def claim_for_agent(*, agent_id: uuid.UUID, organization_id: int, now: datetime | None = None,
                    claim_key: str | None = None, fresh: bool = True) -> Claim | None:
    """`claim_job` by the agent's id (a finish report's job names its agent; it needn't be loaded).

    The claim itself is one statement (`states.assign_next_job`, which also
    answers the job's `builds_in` links); then one query reads the job with
    its build and pipeline for the job spec. `fresh=False`: only re-answer the
    job already claimed under `claim_key` (a retried finish report).
    """
    now = now or timezone.now()
    credential = new_prefixed_secret(JOB_CREDENTIAL_PREFIX)
    assigned = states.assign_next_job(organization_id=organization_id, agent_id=agent_id,
                                      credential_hash=hash_secret(credential), now=now, claim_key=claim_key,
                                      fresh=fresh)
    if assigned is None:
        return None
    job = _claimed_job(assigned.job_id)
    job.builds_in = BuildsInLinks(assigned.builds_in_parent_id, assigned.builds_in_children)
    if job.build.state == BuildState.SCHEDULED:
        # Only after the claim committed, and without the build's lock: waiting for it
        # while holding the job's deadlocks with cancel_build / time_out_build, which
        # lock the build first and then update its scheduled jobs. A build read as past
        # `scheduled` needs nothing: builds never go back to it.
        states.mark_build_running(job.build_id)
    return Claim(job, credential)


# What the job spec reads of the build and the pipeline (builds.agent_api: job_spec,
# source_spec), read along with the job; anything else loads on first use. The job's
# large JSON columns are left out too.
CLAIMED_JOB = Columns(Job, [f.attname for f in Job._meta.concrete_fields if f.name not in ("cache", "runner_args")])
CLAIMED_BUILD = Columns(Build, ("id", "pipeline_id", "number", "state", "branch", "commit", "source_archive",
                                "source_url", "source_sha256"))
CLAIMED_PIPELINE = Columns(Pipeline, ("id", "organization_id", "slug", "repository", "source_slug"))
CLAIMED_JOB_SQL = (
    f"SELECT {CLAIMED_JOB.select('j')}, {CLAIMED_BUILD.select('b')}, {CLAIMED_PIPELINE.select('p')}"
    f" FROM {Job._meta.db_table} j JOIN {Build._meta.db_table} b ON b.id = j.build_id"
    f" JOIN {Pipeline._meta.db_table} p ON p.id = b.pipeline_id WHERE j.id = %s"
)


def _claimed_job(job_id: Any) -> Job:
    """The job with the columns of its build and pipeline that the spec reads, in one query.

    SQL, because building the ORM's three-table query was a sixth of a busy
    server's CPU.
    """
    cells = first_row(CLAIMED_JOB_SQL, [states.db_value(Job, "id", job_id)])
    assert cells is not None, "a job just claimed exists"
    job = CLAIMED_JOB.load(cells, connection)
    job.build = CLAIMED_BUILD.load(cells, connection)
    job.build.pipeline = CLAIMED_PIPELINE.load(cells, connection)
    return job


# Every agent request starts with one of the two lookups below. They are written as
# SQL: building the same query with the ORM cost three to four times as much CPU as
# running it, on every request. Manager.raw() still makes the model instance (with
# only these columns loaded; any other loads on first use).


def agent_for_session(raw: str) -> Agent | None:
    """The agent an agent session belongs to (None: unknown, stopped, or its agent token was revoked)."""
    agents = Agent.objects.raw(
        "SELECT a.id, a.organization_id, a.name, a.last_seen_at FROM builds_agent a"
        " JOIN organizations_agenttoken t ON t.id = a.token_id"
        " WHERE a.session_hash = %s AND a.stopped_at IS NULL AND t.revoked_at IS NULL",
        [hash_secret(raw)],
    )
    return next(iter(agents), None)


def job_for_credential(raw: str, *, now: datetime | None = None) -> Job | None:
    """The job a job credential opens (None: unknown, or its agent's token was revoked).

    Also, as plain values: `agent_seen_recently` (the job's agent was seen
    within AGENT_SEEN_RESOLUTION of `now`) and `build_started` (its build has
    a start time), which spare `agent_seen_by` and `start_job` a write, and
    `agent_serving` (the agent has not stopped, so it may claim more jobs).
    """
    now = now or timezone.now()
    jobs = Job.objects.raw(
        "SELECT j.id, j.build_id, j.organization_id, j.kind, j.state, j.timeout_seconds, j.error_code,"
        " j.error_message, j.log_bytes, j.log_truncated, j.agent_id, a.last_seen_at >= %s AS agent_seen_recently,"
        " a.stopped_at IS NULL AS agent_serving, b.started_at IS NOT NULL AS build_started"
        " FROM builds_job j JOIN builds_build b ON b.id = j.build_id"
        " LEFT JOIN builds_agent a ON a.id = j.agent_id"
        " LEFT JOIN organizations_agenttoken t ON t.id = a.token_id"
        " WHERE j.credential_hash = %s AND (j.agent_id IS NULL OR t.revoked_at IS NULL)",
        [states.db_value(Agent, "last_seen_at", now - AGENT_SEEN_RESOLUTION), hash_secret(raw)],
    )
    return next(iter(jobs), None)


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
    if hasattr(job, "agent_seen_recently"):  # read with the job by job_for_credential
        recently = bool(job.agent_seen_recently)
    else:  # a claim's job has its agent; others load it here
        last_seen = job.agent.last_seen_at
        recently = bool(last_seen and now - last_seen < AGENT_SEEN_RESOLUTION)
    if recently:
        return
    Agent.objects.filter(pk=job.agent_id).update(last_seen_at=now)
    job.agent_seen_recently = True  # once per request is enough


def start_job(*, job: Job, now: datetime | None = None) -> str:
    """The agent begins running the command: assigned → running. Returns the job's state after."""
    now = now or timezone.now()
    # assigned → running changes no roll-up (the build is running since the claim), so no
    # build lock: a compare-and-set on the job and the build's first start time.
    started = states.transition_jobs([job.pk], to=J.RUNNING, now=now, last_heartbeat_at=now)
    if started:
        # job_for_credential read whether the build has a start time: once one job of the
        # build has started, the others have nothing to write there.
        if not getattr(job, "build_started", False):
            states.mark_build_started(job.build_id, now)
        job.state, job.started_at = J.RUNNING, now
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
                  chunks: Sequence[ChunkIn] = (), now: datetime | None = None) -> str:
    """The agent's final report, with its last output. Idempotent: a retried report changes nothing.

    The output is stored however the report ends (a seq already stored is skipped).
    """
    now = now or timezone.now()
    # The first verdict is judged from the job as the caller loaded it (for an agent's
    # request: as its credential was checked, a moment ago). The compare-and-set accepts
    # exactly that state, so a cancel or timeout landing in between makes it lose; judge
    # again from a fresh read, else a canceling job could end failed, or sit in canceling
    # until the reaper fails it as lost.
    current, current_code, current_message = job.state, job.error_code, job.error_message
    for _ in range(3):
        if current in states.TERMINAL_JOB_STATES:
            if chunks:
                append_log(job=job, chunks=chunks, now=now, alive=False)
            return current
        state, code = outcome_state(current=current, exit_code=exit_code, outcome=outcome, error_code=error_code)
        message = error_message
        if state == J.TIMED_OUT and current_code == "pipeline_timeout":
            # Stopped because its build ran out of time (time_out_build), not its own timeout.
            code, message = current_code, message or current_message
        if code == "job_timeout" and not message:
            message = f"The job ran longer than its timeout of {job.timeout_seconds} s."
        if finish_job(job=job, state=state, exit_code=exit_code, signal=signal, error_code=code,
                      error_message=message, now=now, expected=current, chunks=chunks):
            agent_seen_by(job, now)
            return state
        chunks = ()  # stored by that attempt
        current, current_code, current_message = Job.objects.values_list(
            "state", "error_code", "error_message").get(pk=job.pk)
    return current


# ------------------------------------------------------------------ logs


@dataclass(frozen=True)
class ChunkIn:
    seq: int
    stream_kind: int
    content: str
    ts: datetime


def append_log(*, job: Job, chunks: Sequence[ChunkIn], now: datetime | None = None, alive: bool = True) -> int:
    """Store the chunks not stored yet; returns how many were new.

    The job's row lock serialises appends to one job, so a retried batch racing
    its original is stored once and counted once against the log limit. Past
    the limit output is dropped and a single meta chunk says so; the job goes on.
    `alive`: the batch is also a sign of life (a heartbeat) from the job's agent.
    """
    now = now or timezone.now()
    if not chunks:
        return 0
    with transaction.atomic():
        stored, log = _store_chunks(job.pk, chunks, now)
        if alive:
            log["last_heartbeat_at"] = now
        if log:
            _set_job_columns(job.pk, log)
    if alive:
        agent_seen_by(job, now)
    return stored


# The statements that store output are SQL: every log shipment and every finish runs
# them, and together they cost about what building one ORM query does.


def _batch(chunks: Sequence[ChunkIn]) -> tuple[list[ChunkIn], dict[int, int]]:
    """The chunks by seq (a seq named twice in one batch: its last copy counts) and their sizes in bytes."""
    batch = sorted({c.seq: c for c in chunks}.values(), key=lambda c: c.seq)
    return batch, {chunk.seq: len(chunk.content.encode()) for chunk in batch}


def _store_fitting_chunks(job: Job, chunks: Sequence[ChunkIn], now: datetime) -> dict[str, Any] | None:
    """Store the chunks not stored yet without the job's row lock, if all of them fit under the log limit.

    Judged from the log's size as `job` was loaded (for an agent's request: as
    its credential was checked); None when the batch might reach the limit,
    for `_store_chunks` to store under the lock. Returns the job's log columns
    to write with them ({} when nothing new was stored).
    """
    if job.log_truncated:
        return {}  # output past the limit is dropped
    batch, sizes = _batch(chunks)
    if job.log_bytes + sum(sizes.values()) > settings.JOB_LOG_LIMIT_BYTES:
        return None
    new = _insert_chunks(job.pk, [(chunk, chunk.stream_kind, chunk.content) for chunk in batch], now)
    added = sum(sizes[seq] for seq in new)
    # Added, not set: without the row lock, another batch may be counted meanwhile.
    return {"log_bytes": states.Add(added)} if added else {}


def _store_chunks(job_id: uuid.UUID, chunks: Sequence[ChunkIn], now: datetime) -> tuple[int, dict[str, Any]]:
    """Store the chunks not stored yet (the caller's transaction); takes the job's row lock.

    Returns how many were new and the job's log columns to write with them
    ({} when nothing was stored).
    """
    limit = settings.JOB_LOG_LIMIT_BYTES
    batch, sizes = _batch(chunks)
    # NO KEY UPDATE (PostgreSQL): a finish inserting its last chunks before it takes its
    # build's lock holds a key-share lock on the job's row; it must not queue behind this.
    if connection.features.has_select_for_no_key_update:
        lock = " FOR NO KEY UPDATE"
    else:
        lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT log_bytes, log_truncated FROM builds_job WHERE id = %s{lock}",
                       [states.db_value(Job, "id", job_id)])
        log_bytes, truncated = cursor.fetchone()
    if truncated:
        return 0, {}  # output past the limit is dropped
    if log_bytes + sum(sizes.values()) <= limit:
        # The whole batch fits, whichever of its chunks are stored already: no need to
        # know which are new before inserting. The (job, seq) constraint skips the
        # stored ones and the insert names the rest.
        new = _insert_chunks(job_id, [(chunk, chunk.stream_kind, chunk.content) for chunk in batch], now)
        stored = [chunk.content for chunk in batch if chunk.seq in new]
    else:
        # Near the limit, which chunks are new decides where the log is cut.
        seen = set(LogChunk.objects.filter(job_id=job_id, seq__in=list(sizes)).values_list("seq", flat=True))
        rows: list[tuple[ChunkIn, int, str]] = []
        added = 0
        for chunk in batch:
            if chunk.seq in seen:
                continue
            if log_bytes + added + sizes[chunk.seq] > limit:
                truncated = True
                notice = f"[harmont] log limit of {limit} bytes reached; further output of this job is not stored\n"
                rows.append((chunk, StreamKind.META, notice))
                break
            added += sizes[chunk.seq]
            rows.append((chunk, chunk.stream_kind, chunk.content))
        new = _insert_chunks(job_id, rows, now)
        stored = [content for chunk, _, content in rows if chunk.seq in new]
    if not stored:
        return 0, {}
    # log_bytes stays the exact size of what is stored (the raw log's Content-Length);
    # the row lock makes the sum exact.
    columns: dict[str, Any] = {"log_bytes": log_bytes + sum(len(content.encode()) for content in stored)}
    if truncated:
        columns["log_truncated"] = True
    return len(stored), columns


def _set_job_columns(job_id: uuid.UUID, columns: dict[str, Any]) -> None:
    """Write some of one job's columns (never its state: builds.states does that)."""
    assignments, params = states.job_assignments(columns)
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE builds_job SET {assignments} WHERE id = %s",
                       [*params, states.db_value(Job, "id", job_id)])


def _insert_chunks(job_id: uuid.UUID, rows: list[tuple[ChunkIn, int, str]], now: datetime) -> set[int]:
    """Insert (chunk, stream kind, content) rows unless their seq is stored; returns the seqs inserted.

    SQL because the ORM's insert that skips conflicts can't tell which rows it
    skipped; `RETURNING` does (PostgreSQL, and SQLite since 3.35).
    """
    inserted: set[int] = set()
    job = states.db_value(LogChunk, "job", job_id)
    created = states.db_value(LogChunk, "created_at", now)
    for start in range(0, len(rows), INSERT_BATCH):
        part = rows[start:start + INSERT_BATCH]
        params: list[Any] = []
        for chunk, stream_kind, content in part:
            params += [job, chunk.seq, int(stream_kind), content, states.db_value(LogChunk, "ts", chunk.ts), created]
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO builds_logchunk (job_id, seq, stream_kind, content, ts, created_at) VALUES "
                + ", ".join(["(%s, %s, %s, %s, %s, %s)"] * len(part))
                + " ON CONFLICT (job_id, seq) DO NOTHING RETURNING seq",
                params,
            )
            inserted.update(seq for (seq,) in cursor.fetchall())
    return inserted


# Rows per INSERT: 6 parameters each stays far below SQLite's limit on parameters.
INSERT_BATCH = 500


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
    """Both directions of the job's `builds_in` edges, in one query (none for a claim's job, which has them)."""
    if hasattr(job, "builds_in"):  # read with the job by claim_job
        return job.builds_in
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

