"""The job and build state machine: one table of transitions, one roll-up.

Nothing else writes `Job.state` or `Build.state`. Every job transition is a
compare-and-set (`UPDATE ... WHERE state IN (<allowed sources>)`), so when two
writers race (an agent finishing while a user cancels) exactly one wins and the
loser sees zero rows changed. Work on one build is serialised by locking its
row first (`lock_build`, `lock_build_for_roll_up`), so roll-ups never interleave.

The build's state is always `roll_up` of its jobs' states. `settle_build`
applies it after reading every job; the two hot paths (`mark_build_running` on
a claim, `settle_after_job_end` when a job passes) apply the same function to
what they already know, and fall back to `settle_build` where that is not
enough (tests/test_roll_up_paths.py holds them equal).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from django.db import transaction
from django.db.models import Exists, OuterRef, Q, Subquery
from django.utils import timezone

from builds import sql
from builds.models import Build, BuildState, Job, JobDependency, JobState, WebhookEvent

J = JobState

TERMINAL_JOB_STATES: frozenset[str] = frozenset({J.PASSED, J.FAILED, J.SKIPPED, J.CANCELED, J.TIMED_OUT})
TERMINAL_BUILD_STATES: frozenset[str] = frozenset(
    {BuildState.PASSED, BuildState.FAILED, BuildState.SKIPPED, BuildState.CANCELED}
)
# Builds whose jobs all wait (for an agent, or held for an approval); a claim moves them to running.
WAITING_BUILD_STATES: frozenset[str] = frozenset({BuildState.HELD, BuildState.SCHEDULED})
# Jobs an agent holds: claimed and not yet ended. Only these report, upload and download.
LIVE_JOB_STATES: frozenset[str] = frozenset({J.ASSIGNED, J.RUNNING, J.CANCELING, J.TIMING_OUT})
# Jobs still waiting for an agent (or, held, for an approval before that).
WAITING_JOB_STATES: frozenset[str] = frozenset({J.HELD, J.PENDING, J.SCHEDULED})
# Prerequisite outcomes that let a dependent job run.
SATISFIED_STATES: frozenset[str] = frozenset({J.PASSED, J.SKIPPED})
# Prerequisite outcomes whose dependents (transitively) are skipped.
BLOCKING_STATES: frozenset[str] = frozenset({J.FAILED, J.TIMED_OUT, J.CANCELED})
# Ended jobs a retry may give a new attempt (builds.services.retries).
RETRYABLE_STATES: frozenset[str] = frozenset({J.FAILED, J.TIMED_OUT, J.CANCELED})

# What the roll-up and the follow-ups see of a job besides its state (`counted_state`): a
# retried job (an older attempt) and a soft-failed one are not what their `state` says.
# They are never a job's `state`, only what the roll-up rules count it as.
RETRIED = "retried"
SOFT_FAILED = "soft_failed"
# Satisfied prerequisites as counted: a soft failure lets its dependents run.
COUNTED_SATISFIED: frozenset[str] = SATISFIED_STATES | {SOFT_FAILED}
COUNTED_TERMINAL: frozenset[str] = TERMINAL_JOB_STATES | {SOFT_FAILED}


def counted_state(state: str, *, retried: bool = False, soft_failed: bool = False) -> str:
    """What a job counts as in `roll_up` and `follow_ups`: its state, `RETRIED` or `SOFT_FAILED`."""
    if retried:
        return RETRIED
    if soft_failed and state == J.FAILED:
        return SOFT_FAILED
    return state


JOB_TRANSITIONS: dict[str, frozenset[str]] = {
    # Approval schedules a held job. Agents claim only scheduled jobs, so a held one
    # waits without the claim statement knowing about approvals at all.
    # Approved while its pipeline has no free concurrency slot, a held job waits pending instead.
    J.HELD: frozenset({J.SCHEDULED, J.PENDING, J.SKIPPED, J.CANCELED, J.TIMED_OUT}),
    # Waiting jobs time out only with their build (pipeline timeout). A step cache hit
    # (`reused_job` set) passes without an agent once its prerequisites are met (`settle_build`).
    J.PENDING: frozenset({J.SCHEDULED, J.PASSED, J.SKIPPED, J.CANCELED, J.TIMED_OUT}),
    J.SCHEDULED: frozenset({J.ASSIGNED, J.SKIPPED, J.CANCELED, J.TIMED_OUT}),
    # An agent that claimed a job but vanished before starting it hands it back. A quick job's
    # agent may report its start with its finish (builds.services.jobs.StartedIn): it passes from here.
    J.ASSIGNED: frozenset({J.RUNNING, J.SCHEDULED, J.CANCELING, J.CANCELED, J.PASSED, J.FAILED, J.TIMED_OUT}),
    J.RUNNING: frozenset({J.PASSED, J.FAILED, J.CANCELING, J.TIMING_OUT, J.TIMED_OUT}),
    # Once a stop was requested, the agent's report ends the job in the requested
    # state whatever the exit status; a lost agent still fails it.
    J.CANCELING: frozenset({J.CANCELED, J.FAILED}),
    J.TIMING_OUT: frozenset({J.TIMED_OUT, J.FAILED}),
    J.PASSED: frozenset(),
    J.FAILED: frozenset(),
    # Only a retry reopens an ended job: a dependent skipped because the retried job failed,
    # or canceled with its build before it was ever claimed, waits again for the new attempt.
    # (The retried job itself never changes state: it is marked `retried`.)
    J.SKIPPED: frozenset({J.PENDING}),
    J.CANCELED: frozenset({J.PENDING}),
    J.TIMED_OUT: frozenset(),
}


def can_transition(source: str, target: str) -> bool:
    return target in JOB_TRANSITIONS[source]


def sources_for(target: str) -> frozenset[str]:
    """Every state a job may move to `target` from."""
    return frozenset(s for s, targets in JOB_TRANSITIONS.items() if target in targets)


def roll_up(job_states: Iterable[str], *, cancel_requested: bool = False,
            build_error: bool = False) -> BuildState:
    """The build state from its jobs' states (as `counted_state` counts them): the first rule that holds wins.

    1. a requested cancel: canceled;
    2. a build-level failure (a rejected plan, a pipeline timeout): failed,
       whatever its jobs did;
    3. no jobs, or every job skipped: skipped;
    4. every job ended: failed if one failed or timed out (a soft failure
       is not one);
    5. every job ended and one was canceled: canceled. Only a retry leaves a
       canceled job in a build whose cancel is no longer requested (retrying
       one job of a canceled build lifts the cancel for what follows from it,
       the rest stays canceled): that build did not run whole, so it must not
       pass;
    6. every job ended otherwise (passed, skipped, soft-failed): passed;
    7. some job is past waiting (claimed, running, stopping, or ended), or
       was retried (the build ran, and a new attempt waits): running;
    8. every job waiting and some held for approval: held;
    9. otherwise (every job waiting for an agent): scheduled.

    A retried job (`RETRIED`) counts in rule 7 only; a soft-failed one
    (`SOFT_FAILED`) as passed. Only which states are present matters, never
    how many jobs hold them, so a set of distinct states decides as well as
    the whole list.
    """
    seen = list(job_states)
    if cancel_requested:
        return BuildState.CANCELED
    if build_error:
        return BuildState.FAILED
    states = [s for s in seen if s != RETRIED]
    all_terminal = all(s in COUNTED_TERMINAL for s in states)
    if not seen or (all_terminal and all(s == J.SKIPPED for s in states)):
        return BuildState.SKIPPED
    if all_terminal:
        if any(s in (J.FAILED, J.TIMED_OUT) for s in states):
            return BuildState.FAILED
        if J.CANCELED in states:
            return BuildState.CANCELED
        return BuildState.PASSED
    if any(s not in WAITING_JOB_STATES for s in seen):
        return BuildState.RUNNING
    if J.HELD in states:
        return BuildState.HELD
    return BuildState.SCHEDULED


@dataclass(frozen=True)
class RollUpInputs:
    """What a build's roll-up reads of the build row itself, besides its jobs' states."""

    state: str
    cancel_requested: bool
    build_error: bool  # a build-level failure (rejected plan, pipeline timeout)
    started_at: datetime | None
    finished_at: datetime | None
    reuses_jobs: bool = False  # some job is a step cache hit (Build.reuses_jobs)


def rolled_up_columns(build: RollUpInputs, job_states: Iterable[str], *, now: datetime,
                      first_start: datetime | None = None) -> dict[str, object]:
    """The build columns that change when its jobs are in `job_states`: {} when none does.

    `state` is `roll_up`; `started_at` is kept, else the first job's start
    (`first_start`); `finished_at` is kept, else set now once the build is
    terminal and every job has ended.
    """
    states = set(job_states)
    state = roll_up(states, cancel_requested=build.cancel_requested, build_error=build.build_error)
    all_done = all(s in COUNTED_TERMINAL or s == RETRIED for s in states)
    columns: dict[str, object] = {
        "state": state,
        "started_at": build.started_at or first_start,
        "finished_at": build.finished_at or (now if all_done and state in TERMINAL_BUILD_STATES else None),
    }
    current = {"state": build.state, "started_at": build.started_at, "finished_at": build.finished_at}
    return {name: value for name, value in columns.items() if value != current[name]}


def follow_ups(states: Mapping[uuid.UUID, str],
               prerequisites: Mapping[uuid.UUID, Iterable[uuid.UUID]],
               segments: Mapping[uuid.UUID, int] | None = None,
               waits_for: Mapping[uuid.UUID, int] | None = None) -> dict[uuid.UUID, str]:
    """What the jobs' current states imply for the jobs still waiting.

    Returns {job id: new state}: `skipped` for every waiting job that
    transitively depends on a failed/timed-out/canceled job, `scheduled` for
    every pending job whose prerequisites all passed, were skipped or
    soft-failed. Retried jobs (`RETRIED`) are not there at all: their
    dependents wait for the new attempt.

    `segments` and `waits_for` are the jobs' `segment` and `after_segment`: a
    job also depends on every job of the segment it waits for. A segment is one
    node of the walk, so a wait costs its jobs, never their pairs.
    """
    states = {job: state for job, state in states.items() if state != RETRIED}
    segments = {job: segment for job, segment in (segments or {}).items() if job in states}
    waits_for = waits_for or {}
    dependents, members = _dependents(states, prerequisites, segments, waits_for)
    blocked = _reachable(dependents, [job for job, state in states.items() if state in BLOCKING_STATES])

    satisfied = {segment: all(states[job] in COUNTED_SATISFIED for job in jobs) for segment, jobs in members.items()}
    changes: dict[uuid.UUID, str] = {}
    for job, state in states.items():
        if state not in WAITING_JOB_STATES:
            continue
        if job in blocked:
            changes[job] = J.SKIPPED
        elif (state == J.PENDING and all(states.get(p) in COUNTED_SATISFIED for p in prerequisites.get(job, ()))
              and satisfied.get(waits_for.get(job), True)):
            changes[job] = J.SCHEDULED
    return changes


def downstream(roots: Iterable[uuid.UUID], states: Mapping[uuid.UUID, str],
               prerequisites: Mapping[uuid.UUID, Iterable[uuid.UUID]],
               segments: Mapping[uuid.UUID, int] | None = None,
               waits_for: Mapping[uuid.UUID, int] | None = None) -> set[uuid.UUID]:
    """Every job that transitively depends on one of `roots` (over edges and waits), retried jobs left out."""
    states = {job: state for job, state in states.items() if state != RETRIED}
    segments = {job: segment for job, segment in (segments or {}).items() if job in states}
    dependents, _ = _dependents(states, prerequisites, segments, waits_for or {})
    return {job for job in _reachable(dependents, list(roots)) if not isinstance(job, tuple) and job in states}


def _dependents(states: Mapping[uuid.UUID, str], prerequisites: Mapping[uuid.UUID, Iterable[uuid.UUID]],
                segments: Mapping[uuid.UUID, int], waits_for: Mapping[uuid.UUID, int]
                ) -> tuple[dict[object, list[object]], dict[int, list[uuid.UUID]]]:
    """The walk's graph: each job's (or segment's) dependents, and each segment's jobs."""
    dependents: dict[object, list[object]] = defaultdict(list)
    for job, prereqs in prerequisites.items():
        if job in states:
            for prereq in prereqs:
                dependents[prereq].append(job)
    members: dict[int, list[uuid.UUID]] = defaultdict(list)
    for job, segment in segments.items():
        members[segment].append(job)
        dependents[job].append(("segment", segment))
    for job, segment in waits_for.items():
        if job in states:
            dependents[("segment", segment)].append(job)
    return dependents, members


def _reachable(dependents: Mapping[object, list[object]], roots: list[object]) -> set[object]:
    reached: set[object] = set()
    frontier = list(roots)
    while frontier:
        for dependent in dependents.get(frontier.pop(), ()):
            if dependent not in reached:
                reached.add(dependent)
                frontier.append(dependent)
    return reached


# ------------------------------------------------------------------ writing transitions


def transition_jobs(job_ids: Iterable[uuid.UUID], *, to: str, now: datetime,
                    only_from: Iterable[str] | None = None, build_id: uuid.UUID | None = None,
                    **fields: object) -> int:
    """Compare-and-set: move the given jobs to `to` where the table allows; returns rows changed.

    `only_from` narrows the allowed sources further, e.g. to the one state a
    decision was made from: if the job moved on meanwhile, nothing changes.
    Jobs that end (`to` terminal) must all be of `build_id`: their
    `job.finished` events are recorded (builds.services.notifications).
    """
    ids = list(job_ids)
    sources = _sources(to, only_from)
    if not ids or not sources:
        return 0
    ending = to in TERMINAL_JOB_STATES
    if ending and build_id is None:
        raise ValueError("jobs that end need their build_id")
    changed = sql.update_jobs(ids, _transition_values(to, now, fields), only_from=sources)
    if changed and ending:
        _notifications().record_jobs_finished(build_id=build_id, job_ids=ids, state=to, now=now)
    return changed


def _notifications():  # type: ignore[no-untyped-def]
    # Imported when first needed: the services package imports this module.
    from builds.services import notifications
    return notifications


def end_job(*, job_id: uuid.UUID, build_id: uuid.UUID, to: str, now: datetime,
            only_from: Iterable[str] | None = None, unchanged: Mapping[str, object] | None = None,
            build_starts_at: datetime | None = None, **fields: object) -> tuple[bool, set[str]]:
    """`transition_jobs` for one job that ends, and the states of the build's other jobs (`sql.end_job`),
    as `counted_state` counts them.

    `fields` may hold `sql.Add` values (output counted without the job's row lock); `unchanged`
    columns must still hold what the caller read, or nothing changes. `build_starts_at`: the
    job started and ended in one report, and its build had no start: the build's start is
    written with the end, its `build.started` recorded before the job's `job.finished`.
    """
    if to not in TERMINAL_JOB_STATES:
        raise ValueError(f"{to} is not a terminal job state")
    sources = sorted(_sources(to, only_from))
    if not sources:
        return False, set()
    # The statement also asks whether any webhook endpoint wants job.finished: most ends then need no query for it.
    end = sql.end_job(job_id=job_id, build_id=build_id, values=_transition_values(to, now, fields),
                      sources=sources, unchanged=unchanged, retried_as=RETRIED, soft_failed_as=SOFT_FAILED,
                      listened_for=WebhookEvent.JOB_FINISHED.value)
    if end.changed and build_starts_at is not None:
        mark_build_started(build_id, build_starts_at)
    if end.changed and end.listened is not False:
        _notifications().record_jobs_finished(build_id=build_id, job_ids=[job_id], now=now)
    return end.changed, end.others


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
    elif to == J.PENDING:  # reopened by a retry: it waits again, as it did before it was skipped
        values.setdefault("finished_at", None)
        values.setdefault("scheduled_at", None)
    return values


# ------------------------------------------------------------------ the build's lock and roll-up


def lock_build_for_roll_up(build_id: uuid.UUID) -> RollUpInputs:
    """Take the build's row lock (PostgreSQL) and read only what the roll-up needs.

    The same lock as `lock_build`, for the hot path of a job's end: five plain
    values instead of a model instance (callers are inside a transaction).
    """
    row = sql.lock_build_for_roll_up(build_id)
    return RollUpInputs(row["state"], row["cancel_requested_at"] is not None, row["error_code"] is not None,
                        row["started_at"], row["finished_at"], row["reuses_jobs"])


def lock_build(build_id: uuid.UUID) -> Build:
    """Take the build's row lock (PostgreSQL); callers must be inside a transaction.

    `of=("self",)` locks the build row only, not its pipeline's; the large JSON
    columns are not read.
    """
    return Build.objects.select_for_update(of=("self",)).defer("pipeline_ir", "env").get(pk=build_id)


def _write_build(build_id: uuid.UUID, columns: Mapping[str, object]) -> None:
    """Write rolled-up columns (the caller holds the build's lock); record the build's start and end events."""
    columns = dict(columns)
    started_at = columns.pop("started_at", None)
    if started_at is not None:
        # Separately and only if still unset: `mark_build_started` writes it without the lock.
        mark_build_started(build_id, started_at)  # type: ignore[arg-type]
    if columns:
        Build.objects.filter(pk=build_id).update(**columns)
    if columns.get("finished_at") is not None:
        _notifications().record_build_event(build_id=build_id, event="build.finished",
                                            now=columns["finished_at"])  # type: ignore[arg-type]
    if columns.get("state") in TERMINAL_BUILD_STATES:
        # The build's slot under its pipeline's max_concurrent_builds is free: admit a waiting build,
        # after commit, because admission locks the pipeline's row and this caller holds a build's.
        # robust: the reaper's sweep admits it if this fails. (Imported here: services import states.)
        from builds.services.concurrency import admit_after_build_end
        transaction.on_commit(lambda: admit_after_build_end(build_id), robust=True)


# What any build holding an assigned job rolls up to, whatever its other jobs' states.
CLAIMED_ROLL_UP = roll_up([J.ASSIGNED])


def mark_build_running(build_id: uuid.UUID) -> None:
    """A job of the build was just assigned: the roll-up without reading the build or its jobs.

    Whatever the other jobs' states, a build holding an assigned job rolls up
    to `CLAIMED_ROLL_UP` (running), unless a cancel or a build-level error
    decides first; the UPDATE's conditions leave those builds alone. A
    conditional UPDATE needs no lock, so claims don't queue on their build's row.
    """
    Build.objects.filter(pk=build_id, state__in=WAITING_BUILD_STATES, cancel_requested_at__isnull=True,
                         error_code__isnull=True).update(state=CLAIMED_ROLL_UP)



def mark_build_started(build_id: uuid.UUID, now: datetime) -> None:
    """A job of the build started running: the build's `started_at`, if it had none (and its `build.started`)."""
    # One transaction, so no reader sees the start without its event, and no crash keeps one without the other.
    with transaction.atomic(savepoint=False):
        if Build.objects.filter(pk=build_id, started_at__isnull=True).update(started_at=now):
            _notifications().record_build_event(build_id=build_id, event="build.started", now=now)


@dataclass
class BuildGraph:
    """A build's jobs as the follow-ups walk them: counted states (`counted_state`), edges and waits."""

    states: dict[uuid.UUID, str]
    prerequisites: dict[uuid.UUID, list[uuid.UUID]]
    segments: dict[uuid.UUID, int]
    waits_for: dict[uuid.UUID, int]
    started: list[datetime]  # the jobs' start times
    reused: set[uuid.UUID]  # jobs that are step cache hits


def read_graph(build_id: uuid.UUID) -> BuildGraph:
    """Every job of the build and every edge: two queries however many there are."""
    jobs = list(Job.objects.filter(build_id=build_id).values_list("id", "state", "started_at", "segment",
                                                                   "after_segment", "retried", "soft_failed",
                                                                   "reused_job_id"))
    prerequisites: dict[uuid.UUID, list[uuid.UUID]] = defaultdict(list)
    for job_id, prereq_id in JobDependency.objects.filter(job__build_id=build_id).values_list(
            "job_id", "prerequisite_id"):
        prerequisites[job_id].append(prereq_id)
    return BuildGraph(
        states={job_id: counted_state(state, retried=retried, soft_failed=soft_failed)
                for job_id, state, _, _, _, retried, soft_failed, _ in jobs},
        prerequisites=prerequisites,
        segments={job_id: segment for job_id, _, _, segment, *_ in jobs if segment is not None},
        waits_for={job_id: after for job_id, _, _, _, after, *_ in jobs if after is not None},
        started=[started for _, _, started, *_ in jobs if started is not None],
        reused={job_id for job_id, *_, reused in jobs if reused is not None},
    )


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
        graph = read_graph(build_id)
        states, segments, waits_for, prerequisites = (graph.states, graph.segments, graph.waits_for,
                                                      graph.prerequisites)

        started = graph.started
        while build.cancel_requested_at is None:
            changes = follow_ups(states, prerequisites, segments, waits_for)
            if build.waiting_reason is not None:
                # Waiting for a concurrency slot: its roots stay pending until admitted.
                changes = {job_id: target for job_id, target in changes.items() if target != J.SCHEDULED}
            # A step cache hit that would be scheduled passes instead (no agent ever sees it), which
            # may make its dependents ready in turn: another round, at most one per level of the graph.
            cached = [job_id for job_id, target in changes.items() if target == J.SCHEDULED and job_id in graph.reused]
            by_target: dict[str, list[uuid.UUID]] = defaultdict(list)
            for job_id, target in changes.items():
                by_target[target].append(job_id)
            if cached:
                by_target[J.SCHEDULED] = [job_id for job_id in by_target[J.SCHEDULED] if job_id not in set(cached)]
                transition_jobs(cached, to=J.PASSED, now=now, only_from=(J.PENDING,), build_id=build_id,
                                exit_code=0, started_at=now)
                changes.update(dict.fromkeys(cached, J.PASSED))
                started = [*started, now]
            for target, ids in by_target.items():
                transition_jobs(ids, to=target, now=now, build_id=build_id)
            states.update(changes)
            if not cached:
                break

        inputs = RollUpInputs(build.state, build.cancel_requested_at is not None, build.error_code is not None,
                              build.started_at, build.finished_at)
        columns = rolled_up_columns(inputs, states.values(), now=now, first_start=min(started) if started else None)
        _write_build(build.pk, columns)
        for name, value in columns.items():
            setattr(build, name, value)
        return build


def passed_job_fast_path(build: RollUpInputs, state: str) -> bool:
    """Whether a job's end to `state` can be settled from the other jobs' states alone.

    A job that passed blocks nothing (no dependent is skipped) and can only
    make its own pending dependents ready, which leaves the roll-up as it is
    (rule 7 treats pending and scheduled alike; a job that ran means no job is held). Everything else takes
    `settle_build`: a failure skips its dependents transitively, a cancel
    ends the waiting jobs, a build with no start time yet takes it from
    its jobs, and in a build with step cache hits only `settle_build` passes
    the cached jobs that become ready.
    """
    return (state == J.PASSED and not build.cancel_requested and not build.build_error and build.started_at is not None
            and not build.reuses_jobs)


def settle_after_job_end(*, build_id: uuid.UUID, build: RollUpInputs, job_id: uuid.UUID, state: str,
                         others: set[str], now: datetime) -> None:
    """What one job's end changes: its dependents and the build's roll-up, without reading the whole build.

    The caller holds the build's lock (`build` is what it read under it), the
    job just moved to terminal `state`, and `others` are the distinct states of
    the build's other jobs (`end_job`). On the fast path a query runs only when
    some job is still pending.
    """
    if not passed_job_fast_path(build, state):
        settle_build(build_id=build_id, now=now)
        return
    present = others | {state}
    if J.PENDING in present:
        promote_dependents(job_id=job_id, build_id=build_id, now=now)
    _write_build(build_id, rolled_up_columns(build, present, now=now))


def promote_dependents(*, job_id: uuid.UUID, build_id: uuid.UUID, now: datetime) -> int:
    """Schedule the pending dependents of `job_id` whose every prerequisite passed or was skipped.

    One statement. Dependents are those of its edges and, when it belongs to a
    segment, the jobs waiting for that segment; a job waiting for a segment also
    needs every job of it satisfied. The segment of `job_id` is one value, so
    "is that segment satisfied" is asked once, not once per waiting job.
    """
    # A soft failure satisfies like a pass; older attempts (retried) are no one's prerequisite.
    unsatisfied = JobDependency.objects.filter(job=OuterRef("pk")).exclude(
        Q(prerequisite__state__in=SATISFIED_STATES) | Q(prerequisite__soft_failed=True))
    own_segment = Subquery(Job.objects.filter(pk=job_id).values("segment")[:1])
    open_in_segment = Job.objects.filter(build_id=build_id, segment=own_segment, retried=False).exclude(
        Q(state__in=SATISFIED_STATES) | Q(soft_failed=True))
    open_in_waited = Job.objects.filter(build_id=build_id, segment=OuterRef("after_segment"), retried=False).exclude(
        Q(state__in=SATISFIED_STATES) | Q(soft_failed=True))
    by_edge = Q(pk__in=JobDependency.objects.filter(prerequisite_id=job_id).values("job_id")) & (
        Q(after_segment__isnull=True) | ~Exists(open_in_waited))
    by_wait = Q(after_segment=own_segment) & ~Exists(open_in_segment)
    ready = Job.objects.filter(build_id=build_id, state=J.PENDING).filter(by_edge | by_wait).exclude(
        Exists(unsatisfied))
    return ready.update(**_transition_values(J.SCHEDULED, now, {}))



def update_job_columns(job_id: uuid.UUID, columns: Mapping[str, object]) -> None:
    """Write some of one job's columns, never its state (`sql.Add` values are added to the column)."""
    if "state" in columns:
        raise ValueError("job states change through transition_jobs")
    sql.update_jobs([job_id], columns)
