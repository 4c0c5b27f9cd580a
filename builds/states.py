"""The job and build state machine: one table of transitions, one roll-up.

Nothing else writes `Job.state` or `Build.state`. Every job transition is a
compare-and-set (`UPDATE ... WHERE state IN (<allowed sources>)`), so when two
writers race (an agent finishing while a user cancels) exactly one wins and the
loser sees zero rows changed. Work on one build is serialised by locking its
row first (`lock_build`, `lock_build_for_roll_up`), so roll-ups never interleave.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection, models, transaction
from django.db.models import Exists, OuterRef, QuerySet
from django.utils import timezone

from builds.models import Build, BuildState, EdgeKind, Job, JobDependency, JobState

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


def transition_jobs(job_ids: Iterable[uuid.UUID], *, to: str, now: datetime,
                    only_from: Iterable[str] | None = None, **fields: object) -> int:
    """Compare-and-set: move the given jobs to `to` where the table allows; returns rows changed.

    `only_from` narrows the allowed sources further, e.g. to the one state a
    decision was made from: if the job moved on meanwhile, nothing changes.

    SQL rather than QuerySet.update(): every start and finish of a job runs
    this, and building the ORM's UPDATE cost twice what running it does.
    """
    ids = list(job_ids)
    sources = _sources(to, only_from)
    if not ids or not sources:
        return 0
    assignments, params = job_assignments(_transition_values(to, now, fields))
    params += [db_value(Job, "id", job_id) for job_id in ids] + sorted(sources)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE builds_job SET {assignments} WHERE id IN ({', '.join(['%s'] * len(ids))})"
            f" AND state IN ({', '.join(['%s'] * len(sources))})",
            params,
        )
        return cursor.rowcount


@dataclass(frozen=True)
class Add:
    """A column value for `job_assignments`: add to the column instead of setting it."""

    amount: int


def job_assignments(values: Mapping[str, object]) -> tuple[str, list[Any]]:
    """`col = %s, ...` and its parameters for an UPDATE of builds_job, from field names and values."""
    assignments, params = [], []
    for name, value in values.items():
        column = Job._meta.get_field(name).column
        if isinstance(value, Add):
            assignments.append(f"{column} = {column} + %s")
            params.append(value.amount)
        else:
            assignments.append(f"{column} = %s")
            params.append(db_value(Job, name, value.pk if isinstance(value, models.Model) else value))
    return ", ".join(assignments), params


def _transition(jobs: QuerySet[Job], *, to: str, now: datetime, **fields: object) -> int:
    """`transition_jobs` for the jobs of a queryset."""
    return jobs.filter(state__in=_sources(to, None)).update(**_transition_values(to, now, fields))


def _sources(to: str, only_from: Iterable[str] | None) -> frozenset[str]:
    return sources_for(to) if only_from is None else sources_for(to) & frozenset(only_from)


def _transition_values(to: str, now: datetime, fields: Mapping[str, object]) -> dict[str, object]:
    values: dict[str, object] = {"state": to, **fields}
    if to in TERMINAL_JOB_STATES:
        values.setdefault("finished_at", now)
    elif to == J.SCHEDULED:
        values.setdefault("scheduled_at", now)
    elif to == J.RUNNING:
        values.setdefault("started_at", now)
    return values


def db_value(model: type[models.Model], field: str, value: Any) -> Any:
    """`value` as the ORM would send it for that column, for the few statements written as SQL.

    (UUIDs are text on SQLite, datetimes are stored in UTC, and so on.)
    """
    return model._meta.get_field(field).get_db_prep_save(value, connection)


@dataclass(frozen=True)
class Assigned:
    job_id: Any
    builds_in_parent_id: uuid.UUID | None  # the job whose files this one starts from
    builds_in_children: bool  # some job starts from this one's files


def assign_next_job(*, organization_id: int, agent_id: uuid.UUID, credential_hash: str, now: datetime,
                    claim_key: str | None = None, fresh: bool = True) -> Assigned | None:
    """scheduled → assigned for the organization's oldest scheduled job (None: none waiting).

    The answer also carries the job's `builds_in` links, which its spec needs.

    One statement, autocommitted, so the claimed row is locked for no longer
    than the UPDATE itself. On PostgreSQL `FOR UPDATE SKIP LOCKED` lets racing
    agents each take a different row instead of queueing on the oldest one; the
    locked row's state is checked again under the lock, so it is still
    `scheduled`. SQLite runs one writing statement at a time, so there the
    statement alone decides. Either way one job goes to exactly one agent.
    Written as SQL because the ORM has no UPDATE ... RETURNING.

    `claim_key` makes a retried claim safe: a job this agent already holds under
    the same key (its answer was lost on the way) is answered again, with a new
    credential that replaces the lost one, instead of a second job being taken.
    With `fresh=False` only that re-answer is possible.
    """
    skip_locked = " FOR UPDATE SKIP LOCKED" if connection.features.has_select_for_update_skip_locked else ""
    held = "SELECT id FROM builds_job WHERE claim_key = %s AND agent_id = %s AND state = %s LIMIT 1"
    oldest = ("SELECT id FROM builds_job WHERE organization_id = %s AND state = %s"
              f" ORDER BY scheduled_at, position LIMIT 1{skip_locked}")
    agent = db_value(Job, "agent", agent_id)
    # COALESCE evaluates the oldest-job subquery (and locks its row) only when no held job answers.
    target, target_params = (f"COALESCE(({held}), ({oldest}))", [claim_key, agent, J.ASSIGNED, organization_id,
                                                                  J.SCHEDULED]) if fresh else (
        f"({held})", [claim_key, agent, J.ASSIGNED])
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE builds_job SET state = %s, agent_id = %s, credential_hash = %s, claim_key = %s,"
            " assigned_at = %s, last_heartbeat_at = %s"
            f" WHERE id = {target}"
            " AND (state = %s OR (state = %s AND claim_key = %s AND agent_id = %s))"
            " RETURNING id,"
            " (SELECT prerequisite_id FROM builds_jobdependency WHERE job_id = builds_job.id AND kind = %s LIMIT 1),"
            " EXISTS (SELECT 1 FROM builds_jobdependency WHERE prerequisite_id = builds_job.id AND kind = %s)",
            [J.ASSIGNED, agent, credential_hash, claim_key, db_value(Job, "assigned_at", now),
             db_value(Job, "last_heartbeat_at", now), *target_params,
             J.SCHEDULED, J.ASSIGNED, claim_key, agent, EdgeKind.BUILDS_IN, EdgeKind.BUILDS_IN],
        )
        row = cursor.fetchone()
    if row is None:
        return None
    job_id, parent_id, children = row
    return Assigned(job_id, None if parent_id is None else uuid.UUID(str(parent_id)), bool(children))


@dataclass(frozen=True)
class RollUpInputs:
    """What a build's roll-up needs besides its jobs' states."""

    state: str
    cancel_requested: bool
    build_error: bool  # a build-level failure (rejected plan, pipeline timeout)
    started: bool
    finished: bool


def lock_build_for_roll_up(build_id: uuid.UUID) -> RollUpInputs:
    """Take the build's row lock (PostgreSQL) and read only what the roll-up needs.

    The same lock as `lock_build`, for the hot path of a job's end: five plain
    values instead of a model instance (callers are inside a transaction).
    """
    lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT state, cancel_requested_at IS NOT NULL, error_code IS NOT NULL, started_at IS NOT NULL,"
            f" finished_at IS NOT NULL FROM builds_build WHERE id = %s{lock}",
            [db_value(Build, "id", build_id)],
        )
        state, cancel_requested, build_error, started, finished = cursor.fetchone()
    return RollUpInputs(state, bool(cancel_requested), bool(build_error), bool(started), bool(finished))


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


def end_job(*, job_id: uuid.UUID, build_id: uuid.UUID, to: str, now: datetime,
            only_from: Iterable[str] | None = None, **fields: object) -> tuple[bool, set[str]]:
    """`transition_jobs` for one job that ends, and the states of the build's other jobs.

    The caller holds the build's lock, so the states read are every other
    job's as of now. Every end of one of the build's jobs queues for that
    lock: on PostgreSQL a data-modifying WITH does both in one round trip
    (its read sees the other jobs, not this statement's own update, which is
    why the job itself is left out of it).
    """
    if to not in TERMINAL_JOB_STATES:
        raise ValueError(f"{to} is not a terminal job state")
    sources = sorted(_sources(to, only_from))
    if not sources:
        return False, set()
    assignments, params = job_assignments(_transition_values(to, now, fields))
    job, build = db_value(Job, "id", job_id), db_value(Job, "build", build_id)
    update = (f"UPDATE builds_job SET {assignments} WHERE id = %s"
              f" AND state IN ({', '.join(['%s'] * len(sources))})")
    others = "SELECT DISTINCT state FROM builds_job WHERE build_id = %s AND id <> %s"
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"WITH ended AS ({update} RETURNING 1)"
                           f" SELECT (SELECT COUNT(*) FROM ended), ARRAY({others})",
                           [*params, job, *sources, build, job])
            changed, other_states = cursor.fetchone()
            return bool(changed), set(other_states)
        cursor.execute(update, [*params, job, *sources])
        if not cursor.rowcount:
            return False, set()
        cursor.execute(others, [build, job])
        return True, {row[0] for row in cursor.fetchall()}


def settle_after_job_end(*, build_id: uuid.UUID, build: RollUpInputs, job_id: uuid.UUID, state: str,
                         others: set[str], now: datetime) -> None:
    """What one job's end changes: its dependents and the build's roll-up, without reading the whole build.

    The caller holds the build's lock (`build` is what it read under it), the
    job just moved to terminal `state`, and `others` are the states of the
    build's other jobs (`end_job`). A job that passed can only make its own
    pending dependents ready and, if it was the last one running, end the
    build: a query only when some job is still pending. The rare cases go
    through the full `settle_build`: a failure skips its dependents
    transitively, a cancel or a build-level error decides the roll-up, and a
    build with no start time yet takes it from its jobs.
    """
    if state != J.PASSED or build.cancel_requested or build.build_error or not build.started:
        settle_build(build_id=build_id, now=now)
        return
    present = others | {state}
    if J.PENDING in present:
        # pending → scheduled leaves the roll-up as it is (rules 2–5 treat both alike),
        # so the states read above still decide it.
        promote_dependents(job_id=job_id, now=now)
    # The roll-up's rules only ask whether some/every job is in a state: distinct states suffice.
    rolled = roll_up(present)
    if rolled in TERMINAL_BUILD_STATES and not build.finished:
        # No cancel and no build error: terminal means every job is terminal.
        Build.objects.filter(pk=build_id).update(state=rolled, finished_at=now)
    elif rolled != build.state:
        Build.objects.filter(pk=build_id).update(state=rolled)


def promote_dependents(*, job_id: uuid.UUID, now: datetime) -> int:
    """Schedule the pending dependents of `job_id` whose every prerequisite passed or was skipped."""
    unsatisfied = JobDependency.objects.filter(job=OuterRef("pk")).exclude(prerequisite__state__in=SATISFIED_STATES)
    ready = Job.objects.filter(state=J.PENDING, prerequisite_edges__prerequisite_id=job_id).exclude(
        Exists(unsatisfied))
    return _transition(ready, to=J.SCHEDULED, now=now)
