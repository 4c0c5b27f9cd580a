"""Writes for one job's life on an agent: start, heartbeat, the final report, and the transitions they cause."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.utils import timezone

from builds import states
from builds.models import Job, JobState
from builds.services import caches, notifications, retries
from builds.services.agents import agent_seen_by, touch_job
from builds.services.logs import ChunkIn, store_chunks, store_fitting_chunks

J = JobState


@dataclasses.dataclass(frozen=True)
class StartedIn:
    """A job's start that its agent reported with the finish (the start report was held back, and the command
    ended before it went out): when, as seconds before the report, and the commit its checkout landed on."""

    elapsed_seconds: float
    commit: str | None = None


def finish_job(*, job: Job, state: str, exit_code: int | None = None, error_code: str | None = None,
               error_message: str | None = None, signal: int | None = None, now: datetime | None = None,
               expected: str | None = None, chunks: Sequence[ChunkIn] = (),
               unchanged: Mapping[str, Any] | None = None, started_at: datetime | None = None) -> bool:
    """End a job in a terminal `state`; then skip/schedule what follows and roll up.

    Returns False (and changes nothing but storing `chunks`) when the job was
    no longer in a state that may move there: the other writer of a race
    already ended it. With `expected`, also when the job is no longer in that
    state (the caller chose `state` because the job was `expected`).

    `chunks`, the job's last output, are stored in the same transaction: no
    reader sees the job ended without them, and its row is written once.
    `unchanged`: job columns that must still hold what the caller read when
    it decided (the reaper's `last_heartbeat_at`), else nothing changes.

    A failure the job's `retry_policy` retries automatically ends the job
    `retried` and adds its next attempt; one its `soft_fail_policy` matches
    ends it `soft_failed` (builds.services.retries). `job` should come with its
    `kind`, `retry_policy`, `soft_fail_policy` and `automatic_retries` loaded.

    `started_at`: the job never reported a start, and its agent says it started then
    (`StartedIn`): written with the end, and the build's start if it had none.
    """
    if state not in states.TERMINAL_JOB_STATES:
        raise ValueError(f"{state} is not a terminal job state")
    now = now or timezone.now()
    with transaction.atomic():
        # The output goes first, before the build's lock when it can: every end of one of
        # the build's jobs queues for that lock, so it is held for as few statements as
        # possible. (Inserting takes no lock that a writer holding the build's waits for.)
        log: dict[str, Any] | None = store_fitting_chunks(job, chunks, now) if chunks else {}
        build = states.lock_build_for_roll_up(job.build_id)
        if log is None:
            # Near the log limit: under the job's row lock, which comes after the build's
            # (as for every writer that takes both).
            log = store_chunks(job.pk, chunks, now)[1]
        # An automatic retry or a soft failure is decided here, in the transaction that ends the
        # job, so no follow-up ever skips its dependents in between (builds.services.retries).
        build_starts_at = started_at if build.started_at is None else None  # the job starts its build too
        outcome, retry_rule = retries.end_columns(job, state=state, exit_code=exit_code, error_code=error_code,
                                                  build=build)
        changed, others = states.end_job(job_id=job.pk, build_id=job.build_id, to=state, now=now,
                                         only_from=None if expected is None else (expected,), unchanged=unchanged,
                                         exit_code=exit_code,
                                         error_code=error_code, error_message=error_message, signal=signal,
                                         build_starts_at=build_starts_at,
                                         **log, **outcome, **({} if started_at is None else {"started_at": started_at}))
        if changed and build_starts_at is not None:
            build = dataclasses.replace(build, started_at=build_starts_at)  # what the roll-up below must see
        if changed and retry_rule is not None:
            retries.retry_after_end(job_id=job.pk, rule=retry_rule, now=now)
        elif changed:
            states.settle_after_job_end(build_id=job.build_id, build=build, job_id=job.pk, state=state,
                                        others=others, now=now)
        elif log:
            states.update_job_columns(job.pk, log)  # the job moved on meanwhile; its output is kept all the same
        if changed and state == J.PASSED and job.cache_key:
            # A cached step that ran: later builds may reuse it (in this transaction, so no pass loses its entry).
            caches.record_entry(job_id=job.pk, now=now)
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


def start_job(*, job: Job, commit: str | None = None, now: datetime | None = None,
              elapsed_seconds: float = 0.0) -> str:
    """The agent begins running the command: assigned → running. Returns the job's state after.

    `commit`: the full id the job's checkout landed on; a build whose commit was
    no full id takes it (`notifications.record_checked_out_commit`).
    `elapsed_seconds`: the command started that long ago (a start report its agent
    held back, builds/agent/starts.py), so the job's start is dated back.
    """
    now = now or timezone.now()
    started_at = started_before(now, elapsed_seconds, job)
    if commit is not None:
        notifications.record_checked_out_commit(build_id=job.build_id, commit=commit, now=now)
    # assigned → running changes no roll-up (the build is running since the claim), so no
    # build lock: a compare-and-set on the job and the build's first start time.
    started = states.transition_jobs([job.pk], to=J.RUNNING, now=now, last_heartbeat_at=now, started_at=started_at)
    if started:
        # The credential's lookup read whether the build has a start time: once one job of
        # the build has started, the others have nothing to write there.
        if not getattr(job, "build_started", False):
            states.mark_build_started(job.build_id, started_at)
        job.state, job.started_at = J.RUNNING, started_at
    agent_seen_by(job=job, now=now)
    return J.RUNNING if started else Job.objects.values_list("state", flat=True).get(pk=job.pk)


def started_before(now: datetime, elapsed_seconds: float, job: Job) -> datetime:
    """When a command that started `elapsed_seconds` before `now` began: by the server's clock (agents'
    clocks drift), and never longer ago than the job's timeout (which would have stopped it)."""
    return now - timedelta(seconds=min(max(elapsed_seconds, 0.0), job.timeout_seconds))


def heartbeat(*, job: Job, timing_out: bool = False, now: datetime | None = None) -> str:
    """Record life; the agent may say its job hit its timeout. Returns the job's state after."""
    now = now or timezone.now()
    touch_job(job=job, now=now)
    if timing_out:
        move_job(job=job, state=J.TIMING_OUT, now=now)
    return Job.objects.values_list("state", flat=True).get(pk=job.pk)


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
                  chunks: Sequence[ChunkIn] = (), now: datetime | None = None,
                  started: StartedIn | None = None) -> str:
    """The agent's final report, with its last output. Idempotent: a retried report changes nothing.

    `started`: the agent held the job's start report back and the command ended
    first, so this report starts the job too. An `assigned` job is then judged
    as the running job it was: a quick job costs its agent and the server one
    request less (two instead of three with the claim riding on the finish).

    The output is stored with the report that ends the job (a seq already stored
    is skipped); a report on a job that had ended already stores none, as the log
    route refuses output for it: a retry's output went in with its original.
    """
    now = now or timezone.now()
    started_at = None
    if started is not None:
        started_at = started_before(now, started.elapsed_seconds, job)
        if started.commit is not None:
            notifications.record_checked_out_commit(build_id=job.build_id, commit=started.commit, now=now)
    elif error_code is None and (exit_code is not None or signal is not None):
        # The command ran, yet the job may still be assigned: its start report is still on the way
        # (or an agent that never sends one). It started by now, at the latest; the start that
        # arrives later finds the job ended and changes nothing.
        started_at = now
    # The first verdict is judged from the job as the caller loaded it (for an agent's
    # request: as its credential was checked, a moment ago). The compare-and-set accepts
    # exactly that state, so a cancel or timeout landing in between makes it lose; judge
    # again from a fresh read, else a canceling job could end failed, or sit in canceling
    # until the reaper fails it as lost.
    current, current_code, current_message = job.state, job.error_code, job.error_message
    for _ in range(3):
        if current in states.TERMINAL_JOB_STATES:
            return current
        # Only a job the server still has as assigned takes the start; one canceled before its start was
        # heard of keeps none, as any job canceled before its start report.
        starts = started_at is not None and current == J.ASSIGNED
        state, code = outcome_state(current=J.RUNNING if starts else current, exit_code=exit_code, outcome=outcome,
                                    error_code=error_code)
        message = error_message
        if state == J.TIMED_OUT and current_code == "pipeline_timeout":
            # Stopped because its build ran out of time (time_out_build), not its own timeout.
            code, message = current_code, message or current_message
        if code == "job_timeout" and not message:
            message = f"The job ran longer than its timeout of {job.timeout_seconds} s."
        if finish_job(job=job, state=state, exit_code=exit_code, signal=signal, error_code=code,
                      error_message=message, now=now, expected=current, chunks=chunks,
                      started_at=started_at if starts else None):
            agent_seen_by(job=job, now=now)
            return state
        chunks = ()  # stored by that attempt
        current, current_code, current_message = Job.objects.values_list(
            "state", "error_code", "error_message").get(pk=job.pk)
    return current
