"""Retries and soft failures: a new attempt of a job's step, by hand or at the job's end.

A retry never changes the old job's state: the job keeps its state, exit code
and log and is marked `retried`, which takes it out of the roll-up and of
what its step's dependents wait for (builds.states.counted_state). The new
attempt is a new job of the same step: the step's columns copied (whatever
columns a step has, see `step_fields`), the next `attempt`, `retry_of` the
old job, the old job's prerequisites, and the old job's dependents now
waiting for it.

Decisions where Buildkite's rules leave room, written down here:

* `exit_status` of a job whose agent was lost is -1; `"*"` matches every
  failure, a lost agent and a failure to start too. The first automatic rule
  whose `exit_status` matches decides (a used-up rule retries no more, a later
  rule does not step in). A lost agent with no matching rule gets one retry,
  unless the step says `automatic: false` (no automatic retry at all).
* Only `failed` jobs are retried automatically: a timed-out or canceled job
  is what its timeout or its canceler asked for. By hand, `failed`,
  `timed_out` and `canceled` jobs may be retried.
* Soft fail: `"*"` (and `soft_fail: true`) matches a failure of the command,
  that is a non-zero exit status with no server- or agent-side error: a lost
  agent, a job that could not start or an agent that stopped on its own fails
  hard (they say nothing about the command). An int matches that exit status
  (-1: a lost agent). A timeout is never soft. An automatic retry is decided
  before soft fail: only the last attempt can soft-fail.
* Not retryable by hand (409 `job_not_retryable`): a job that has not ended,
  one already retried, one whose step says `manual: false`, the render job
  (its pipeline is planned once; build again instead), any job of a build
  that failed as a whole (rejected plan, pipeline timeout), and a job one of
  whose prerequisites ended blocking (failed, timed out, canceled): retry that
  one first, which brings this one back with it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from builds import states
from builds.services import notifications
from builds.models import Build, Job, JobDependency, JobKind, JobState
from harmont.errors import ApiError
from pipelines.ir import AGENT_LOST_EXIT_STATUS, ANY_EXIT_STATUS

J = JobState

AGENT_LOST_ERROR = "agent_heartbeat_lost"
# The key under which the default retry of a lost agent is counted in `automatic_retries`.
AGENT_LOST_RULE = "agent_lost"
AGENT_LOST_DEFAULT_LIMIT = 1
# What one run of a job wrote; everything else describes its step and goes to a new attempt as it is.
EXECUTION_FIELDS = frozenset({
    "id", "state", "exit_code", "error_code", "error_message", "soft_failed", "signal", "created_at",
    "scheduled_at", "started_at", "finished_at", "agent", "credential_hash", "claim_key", "assigned_at",
    "last_heartbeat_at", "log_bytes", "log_truncated", "workspace_archive", "snapshot_image", "attempt", "retry_of", "retried",
    "automatic_retries",
})


def step_fields(job: Job) -> dict[str, Any]:
    """The job's columns that describe its step (every concrete field but `EXECUTION_FIELDS`), by attname.

    Generic on purpose: a column added to Job for a step (an agent selector, a
    concurrency group) is copied to a retry's new attempt without this module
    knowing it.
    """
    return {field.attname: getattr(job, field.attname) for field in Job._meta.concrete_fields
            if field.name not in EXECUTION_FIELDS}


# ------------------------------------------------------------------ what a job's end means (pure)


def exit_status_of(*, exit_code: int | None, error_code: str | None) -> int | None:
    """The exit status retry and soft-fail rules match: -1 for a lost agent, else the command's (None: none)."""
    if error_code == AGENT_LOST_ERROR:
        return AGENT_LOST_EXIT_STATUS
    return exit_code


def _status_matches(rule_status: Any, status: int | None) -> bool:
    if rule_status == ANY_EXIT_STATUS:
        return True
    if status is None:
        return False
    return status in rule_status if isinstance(rule_status, list) else status == rule_status


def automatic_retry_rule(policy: Mapping[str, Any] | None, used: Mapping[str, int], *, state: str,
                         exit_code: int | None, error_code: str | None) -> str | None:
    """The key (in `automatic_retries`) of the rule that retries a job ending so, or None for no retry.

    `policy` is the job's normalised `retry_policy`; `used` counts the
    automatic retries its step's attempts had, by rule key.
    """
    automatic = (policy or {}).get("automatic")
    if state != J.FAILED or automatic is False:  # `automatic: false`: no automatic retry at all
        return None
    status = exit_status_of(exit_code=exit_code, error_code=error_code)
    for index, rule in enumerate(automatic or []):
        if _status_matches(rule["exit_status"], status):
            key = str(index)
            return key if used.get(key, 0) < rule["limit"] else None
    if status == AGENT_LOST_EXIT_STATUS and used.get(AGENT_LOST_RULE, 0) < AGENT_LOST_DEFAULT_LIMIT:
        return AGENT_LOST_RULE
    return None


def soft_fails(policy: Mapping[str, Any] | None, *, state: str, exit_code: int | None,
               error_code: str | None) -> bool:
    """Whether a job ending so ends soft-failed under its normalised `soft_fail_policy`."""
    if state != J.FAILED or not policy:
        return False
    if policy["exit_status"] == ANY_EXIT_STATUS:
        # A failure of the command itself, not of its agent or its start.
        return error_code is None and exit_code not in (None, 0)
    return _status_matches(policy["exit_status"], exit_status_of(exit_code=exit_code, error_code=error_code))


def manual_retry_allowed(policy: Mapping[str, Any] | None) -> tuple[bool, str | None]:
    """(allowed, the step's reason when not) for a retry by hand."""
    manual = (policy or {}).get("manual") or {}
    return bool(manual.get("allowed", True)), manual.get("reason")


def refusal(job: Job, build: Build) -> str | None:
    """Why `job` can't be retried by hand, judged from the job and its build alone (None: it can)."""
    if job.retried:
        return "it was retried already"
    if job.state not in states.RETRYABLE_STATES:
        return f"it is {job.state}; only failed, timed-out and canceled jobs are retried"
    if job.kind == JobKind.RENDER:
        return "it renders the pipeline; start a new build instead"
    if build.error_code:
        return f"the build failed as a whole ({build.error_code}); start a new build instead"
    allowed, reason = manual_retry_allowed(job.retry_policy)
    if not allowed:
        return f"its step does not allow manual retries{f': {reason}' if reason else ''}"
    return None


def retryable_by_hand(job: Job, build: Build) -> bool:
    """Whether the build page offers Retry: what `retry_job` checks of the job alone (not its prerequisites)."""
    return refusal(job, build) is None


def end_columns(job: Job, *, state: str, exit_code: int | None, error_code: str | None,
                build: states.RollUpInputs) -> tuple[dict[str, Any], str | None]:
    """The extra columns a job's end writes (`retried` or `soft_failed`), and the retry rule used, if any.

    A build being canceled or failed as a whole gets no automatic retry.
    """
    rule = None
    if not build.cancel_requested and not build.build_error and job.kind != JobKind.RENDER:
        rule = automatic_retry_rule(job.retry_policy, job.automatic_retries or {}, state=state,
                                    exit_code=exit_code, error_code=error_code)
    if rule is not None:
        return {"retried": True}, rule
    if soft_fails(job.soft_fail_policy, state=state, exit_code=exit_code, error_code=error_code):
        return {"soft_failed": True}, None
    return {}, None


# ------------------------------------------------------------------ writes


def retry_job(*, job: Job, now: datetime | None = None) -> Job:
    """A retry by hand: a new attempt of an ended job's step (see the module docstring for who may).

    Under the build's lock; the old job is compared-and-set (`retried` false,
    state retryable), so of two racing retries one creates the attempt and the
    other gets 409 `job_not_retryable`. Dependents that were skipped because of
    the job, or canceled with its build before any agent took them, wait again;
    a canceled build's cancel is lifted; the build runs again (`finished_at`
    cleared) and what is ready is scheduled. Returns the new job.
    """
    now = now or timezone.now()
    with transaction.atomic():
        build = states.lock_build(job.build_id)
        old = Job.objects.filter(pk=job.pk).first()
        if old is None:
            raise ApiError("job_not_found", f"No job {job.pk} in build #{build.number}.")
        graph = states.read_graph(build.pk)
        _check_retryable(build, old, graph)
        if not Job.objects.filter(pk=old.pk, retried=False, state__in=states.RETRYABLE_STATES).update(retried=True):
            raise _not_retryable(old, "it was retried already")
        new = _add_attempt(old=old, graph=graph, now=now, automatic_retries=old.automatic_retries or {})
        reopened = build.finished_at is not None
        if build.cancel_requested_at is not None or reopened:
            Build.objects.filter(pk=build.pk).update(cancel_requested_at=None, finished_at=None)
            build.cancel_requested_at = build.finished_at = None
        states.settle_build(build_id=build.pk, now=now, locked=build)
        if reopened:  # its commit status goes back to pending; it finishes (build.finished) again later
            notifications.record_build_event(build_id=build.pk, event=notifications.REOPENED, now=now)
    return new


def retry_after_end(*, job_id: uuid.UUID, rule: str, now: datetime) -> Job:
    """An automatic retry, in the transaction that just ended the job `retried` (builds.services.jobs.finish_job).

    The caller holds the build's lock. The job's dependents were not skipped
    (no follow-up ran in between), so only the new attempt and the roll-up are
    written: the build stays running.
    """
    old = Job.objects.get(pk=job_id)
    used = dict(old.automatic_retries or {})
    used[rule] = used.get(rule, 0) + 1
    new = _add_attempt(old=old, graph=states.read_graph(old.build_id), now=now, automatic_retries=used)
    states.settle_build(build_id=old.build_id, now=now)
    return new


def _add_attempt(*, old: Job, graph: states.BuildGraph, now: datetime, automatic_retries: dict[str, int]) -> Job:
    """Insert the next attempt of `old`'s step, move its edges over, and reopen what waited for it.

    `graph` is the build as read before `old` was marked retried.
    """
    new = Job(**step_fields(old), id=uuid.uuid4(), attempt=old.attempt + 1, retry_of_id=old.pk, retried=False,
              automatic_retries=automatic_retries, state=J.PENDING, created_at=now)
    Job.objects.bulk_create([new])
    JobDependency.objects.bulk_create(
        JobDependency(job=new, prerequisite_id=edge.prerequisite_id, kind=edge.kind)
        for edge in JobDependency.objects.filter(job=old))
    # Older attempts of the dependents keep their edges as they ran.
    JobDependency.objects.filter(prerequisite=old, job__retried=False).update(prerequisite=new)
    after = states.downstream([old.pk], graph.states, graph.prerequisites, graph.segments, graph.waits_for)
    if after:
        # A dependent canceled after an agent took it keeps its cancel: it never waited for this job alone.
        reopen = Job.objects.filter(pk__in=after, retried=False).filter(
            Q(state=J.SKIPPED) | Q(state=J.CANCELED, assigned_at__isnull=True)).values_list("id", flat=True)
        states.transition_jobs(list(reopen), to=J.PENDING, now=now, only_from=(J.SKIPPED, J.CANCELED),
                               error_code=None, error_message=None)
    return new


def _check_retryable(build: Build, job: Job, graph: states.BuildGraph) -> None:
    why = refusal(job, build)
    if why is not None:
        raise _not_retryable(job, why)
    waited = set(graph.prerequisites.get(job.pk, ()))
    if job.after_segment is not None:
        waited |= {other for other, segment in graph.segments.items() if segment == job.after_segment}
    blocking = [other for other in waited if graph.states.get(other) in states.BLOCKING_STATES]
    if blocking:
        first = Job.objects.filter(pk__in=blocking).order_by("position").values_list("pk", "step_key", "state")[0]
        raise _not_retryable(job, f"its prerequisite {first[1]} ({first[0]}) ended {first[2]}; retry that job first")


def _not_retryable(job: Job, why: str) -> ApiError:
    return ApiError("job_not_retryable", f"Job {job.pk} ({job.step_key}) can't be retried: {why}.")
