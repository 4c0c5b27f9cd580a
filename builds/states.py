"""The job and build state machine: one table of transitions, one roll-up.

Nothing else writes `Job.state` or `Build.state`. Every job transition is a
compare-and-set (`UPDATE ... WHERE state IN (<allowed sources>)`), so when two
writers race (an agent finishing while a user cancels) exactly one wins and the
loser sees zero rows changed. Work on one build is serialised by locking its
row first (`settle_build`), so roll-ups never interleave.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from builds.models import Build, BuildState, Job, JobDependency, JobState

J = JobState

TERMINAL_JOB_STATES: frozenset[str] = frozenset({J.PASSED, J.FAILED, J.SKIPPED, J.CANCELED, J.TIMED_OUT})
TERMINAL_BUILD_STATES: frozenset[str] = frozenset(
    {BuildState.PASSED, BuildState.FAILED, BuildState.SKIPPED, BuildState.CANCELED}
)
# Prerequisite outcomes that let a dependent job run.
SATISFIED_STATES: frozenset[str] = frozenset({J.PASSED, J.SKIPPED})
# Prerequisite outcomes whose dependents (transitively) are skipped.
BLOCKING_STATES: frozenset[str] = frozenset({J.FAILED, J.TIMED_OUT, J.CANCELED})

JOB_TRANSITIONS: dict[str, frozenset[str]] = {
    # Waiting jobs time out only with their build (pipeline timeout).
    J.PENDING: frozenset({J.SCHEDULED, J.SKIPPED, J.CANCELED, J.TIMED_OUT}),
    J.SCHEDULED: frozenset({J.ASSIGNED, J.SKIPPED, J.CANCELED, J.TIMED_OUT}),
    # An agent that claimed a job but vanished before starting it hands it back.
    J.ASSIGNED: frozenset({J.RUNNING, J.SCHEDULED, J.CANCELING, J.CANCELED, J.FAILED, J.TIMED_OUT}),
    J.RUNNING: frozenset({J.PASSED, J.FAILED, J.CANCELING, J.TIMING_OUT, J.TIMED_OUT}),
    # Once a stop was requested, the agent's report ends the job in the requested
    # state whatever the exit status; a lost agent still fails it.
    J.CANCELING: frozenset({J.CANCELED, J.FAILED}),
    J.TIMING_OUT: frozenset({J.TIMED_OUT, J.FAILED}),
    J.PASSED: frozenset(),
    J.FAILED: frozenset(),
    J.SKIPPED: frozenset(),
    J.CANCELED: frozenset(),
    J.TIMED_OUT: frozenset(),
}


def can_transition(source: str, target: str) -> bool:
    return target in JOB_TRANSITIONS[source]


def sources_for(target: str) -> frozenset[str]:
    """Every state a job may move to `target` from."""
    return frozenset(s for s, targets in JOB_TRANSITIONS.items() if target in targets)


def roll_up(job_states: Iterable[str], *, cancel_requested: bool = False,
            build_error: bool = False) -> BuildState:
    """The build state from its jobs' states: the first rule that holds wins.

    `build_error` is a build-level failure (a rejected plan, a pipeline timeout)
    that fails the build whatever its jobs did.
    """
    states = list(job_states)
    if cancel_requested:
        return BuildState.CANCELED
    if build_error:
        return BuildState.FAILED
    all_terminal = all(s in TERMINAL_JOB_STATES for s in states)
    if not states or (all_terminal and all(s == J.SKIPPED for s in states)):
        return BuildState.SKIPPED
    if all_terminal:
        if any(s in (J.FAILED, J.TIMED_OUT) for s in states):
            return BuildState.FAILED
        return BuildState.PASSED
    if any(s not in (J.PENDING, J.SCHEDULED) for s in states):
        return BuildState.RUNNING
    return BuildState.SCHEDULED


def follow_ups(states: Mapping[uuid.UUID, str],
               prerequisites: Mapping[uuid.UUID, Iterable[uuid.UUID]]) -> dict[uuid.UUID, str]:
    """What the jobs' current states imply for the jobs still waiting.

    Returns {job id: new state}: `skipped` for every waiting job that
    transitively depends on a failed/timed-out/canceled job, `scheduled` for
    every pending job whose prerequisites all passed or were skipped.
    """
    dependents: dict[uuid.UUID, list[uuid.UUID]] = defaultdict(list)
    for job, prereqs in prerequisites.items():
        for prereq in prereqs:
            dependents[prereq].append(job)

    blocked: set[uuid.UUID] = set()
    frontier = [job for job, state in states.items() if state in BLOCKING_STATES]
    while frontier:
        for dependent in dependents[frontier.pop()]:
            if dependent not in blocked:
                blocked.add(dependent)
                frontier.append(dependent)

    changes: dict[uuid.UUID, str] = {}
    for job, state in states.items():
        if state not in (J.PENDING, J.SCHEDULED):
            continue
        if job in blocked:
            changes[job] = J.SKIPPED
        elif state == J.PENDING and all(states[p] in SATISFIED_STATES for p in prerequisites.get(job, ())):
            changes[job] = J.SCHEDULED
    return changes


def transition_jobs(job_ids: Iterable[uuid.UUID], *, to: str, now: datetime, **fields: object) -> int:
    """Compare-and-set: move the given jobs to `to` where the table allows; returns rows changed."""
    ids = list(job_ids)
    if not ids:
        return 0
    values: dict[str, object] = {"state": to, **fields}
    if to in TERMINAL_JOB_STATES:
        values.setdefault("finished_at", now)
    elif to == J.SCHEDULED:
        values.setdefault("scheduled_at", now)
    elif to == J.RUNNING:
        values.setdefault("started_at", now)
    return Job.objects.filter(pk__in=ids, state__in=sources_for(to)).update(**values)


def lock_build(build_id: uuid.UUID) -> Build:
    """Take the build's row lock (PostgreSQL); callers must be inside a transaction.

    `of=("self",)` locks the build row only, not its pipeline's; the large JSON
    columns are not read.
    """
    return Build.objects.select_for_update(of=("self",)).defer("pipeline_ir", "env").get(pk=build_id)


def mark_build_running(build_id: uuid.UUID) -> None:
    """A job of the build was just assigned: roll-up rule 4 without reading the build's jobs.

    An assigned job is past `scheduled` and not terminal, so the roll-up can
    only be `running`, unless a cancel or a build-level error decided earlier
    (rules 1 and 3 win), which the conditions leave alone. A conditional UPDATE
    needs no lock, so claims don't queue on their build's row.
    """
    Build.objects.filter(pk=build_id, state=BuildState.SCHEDULED, cancel_requested_at__isnull=True,
                         error_code__isnull=True).update(state=BuildState.RUNNING)


def mark_build_started(build_id: uuid.UUID, now: datetime) -> None:
    """A job of the build started running: the build's `started_at`, if it had none."""
    Build.objects.filter(pk=build_id, started_at__isnull=True).update(started_at=now)


def settle_build(*, build_id: uuid.UUID, now: datetime | None = None, locked: Build | None = None) -> Build:
    """Apply follow-up transitions (skip / schedule) and roll the build state up.

    Called after every job transition that can change what follows, inside the
    same transaction; pass the build if the caller already holds its lock. Reads
    the build's jobs and edges once (two queries) however many jobs changed.
    """
    now = now or timezone.now()
    # savepoint=False: inside the caller's transaction a savepoint would only cost two queries.
    with transaction.atomic(savepoint=False):
        build = locked or lock_build(build_id)
        jobs = list(Job.objects.filter(build_id=build_id).values_list("id", "state", "started_at"))
        states = {job_id: state for job_id, state, _ in jobs}
        prerequisites: dict[uuid.UUID, list[uuid.UUID]] = defaultdict(list)
        for job_id, prereq_id in JobDependency.objects.filter(job__build_id=build_id).values_list(
                "job_id", "prerequisite_id"):
            prerequisites[job_id].append(prereq_id)

        if build.cancel_requested_at is None:
            changes = follow_ups(states, prerequisites)
            by_target: dict[str, list[uuid.UUID]] = defaultdict(list)
            for job_id, target in changes.items():
                by_target[target].append(job_id)
            for target, ids in by_target.items():
                transition_jobs(ids, to=target, now=now)
            states.update(changes)

        state = roll_up(states.values(), cancel_requested=build.cancel_requested_at is not None,
                        build_error=build.error_code is not None)
        started = [s for _, _, s in jobs if s is not None]
        started_at = build.started_at or (min(started) if started else None)
        all_done = all(s in TERMINAL_JOB_STATES for s in states.values())
        finished_at = build.finished_at or (now if all_done and state in TERMINAL_BUILD_STATES else None)
        if (state, started_at, finished_at) != (build.state, build.started_at, build.finished_at):
            Build.objects.filter(pk=build.pk).update(state=state, started_at=started_at, finished_at=finished_at)
            build.state, build.started_at, build.finished_at = state, started_at, finished_at
        return build
