"""The roll-up's fast paths agree with `settle_build`, for every state the build's other jobs can be in.

`mark_build_running` (a claim) and `settle_after_job_end` (a job's end) settle
a build from what they already know instead of reading all of its jobs. Each
case below builds the same situation twice, settles one copy through the fast
path and the other through `settle_build`, and compares the builds and jobs.
"""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest

from builds import services, states
from builds.models import Build, BuildState, EdgeKind, Job, JobDependency, JobState
from builds.states import RollUpInputs

J = JobState
T0 = datetime(2026, 6, 4, 12, 0, tzinfo=dt_timezone.utc)
NOW = T0 + timedelta(minutes=5)
ALL_JOB_STATES = list(J.values)
# What a build may carry besides its jobs: nothing, a requested cancel, a build-level error.
FLAGS = ("none", "cancel", "error")
# A fourth job `w`, ended: none, an older attempt (retried, failed), or a soft failure `z` also waits for.
EXTRAS = ("none", "retried", "soft_failed")
# Every way a job can end: (the state it ends from, the terminal state it ends in). A pending
# job here has no prerequisites, so the first roll-up schedules it: its endings are the
# scheduled job's.
ENDINGS = sorted((source, target) for source, targets in states.JOB_TRANSITIONS.items()
                 for target in targets if target in states.TERMINAL_JOB_STATES and source != J.PENDING)


def situation(pipeline, *, ending_from: str, other: str, flag: str, number: int, link: str = "edge",
              extra: str = "none") -> dict[str, Job]:
    """A build with `x` (in `ending_from`), `y` (in `other`) and `z` (pending, after `x`), rolled up once.

    `link`: how `z` waits for `x`, an edge or a wait (`x` alone in the segment `z` waits for).
    `extra`: see EXTRAS; a soft-failed `w` is in `x`'s segment for a wait.
    """
    build = Build.objects.create(pipeline=pipeline, number=number, branch="main", commit="abc123", created_at=T0,
                                 started_at=T0 if ending_from not in states.WAITING_JOB_STATES else None,
                                 cancel_requested_at=T0 if flag == "cancel" else None,
                                 error_code="pipeline_timeout" if flag == "error" else None)
    jobs = {}
    for position, (key, state) in enumerate((("x", ending_from), ("y", other), ("z", J.PENDING))):
        started = T0 if state not in states.WAITING_JOB_STATES else None
        jobs[key] = Job.objects.create(build=build, organization_id=pipeline.organization_id, position=position,
                                       step_key=key, command="true", timeout_seconds=60, state=state,
                                       started_at=started, created_at=T0)
    if extra != "none":
        jobs["w"] = Job.objects.create(build=build, organization_id=pipeline.organization_id, position=3,
                                       step_key="w", command="false", timeout_seconds=60, state=J.FAILED,
                                       exit_code=1, started_at=T0, finished_at=T0, created_at=T0,
                                       retried=extra == "retried", soft_failed=extra == "soft_failed")
    if link == "edge":
        JobDependency.objects.create(job=jobs["z"], prerequisite=jobs["x"], kind=EdgeKind.DEPENDS_ON)
        if extra == "soft_failed":
            JobDependency.objects.create(job=jobs["z"], prerequisite=jobs["w"], kind=EdgeKind.DEPENDS_ON)
    else:
        Job.objects.filter(pk__in=[j.pk for k, j in jobs.items() if k in ("x", "w")]).update(segment=0)
        Job.objects.filter(pk=jobs["z"].pk).update(after_segment=0)
    states.settle_build(build_id=build.pk, now=T0)  # the build row as the roll-up has it before the change
    return jobs


def test_an_ended_extra_job_changes_what_the_roll_up_sees():
    # The situations above would prove little if `w` were invisible by construction.
    assert states.roll_up([J.PASSED, J.FAILED]) == BuildState.FAILED
    assert states.roll_up([J.PASSED, states.SOFT_FAILED]) == BuildState.PASSED
    assert states.roll_up([J.PASSED, states.RETRIED]) == BuildState.PASSED


@pytest.mark.parametrize("size", [1, 2, 3])
def test_retried_and_soft_failed_jobs_roll_up_by_their_rules_over_every_combination(size):
    for jobs in itertools.combinations_with_replacement(ALL_JOB_STATES, size):
        for flags in itertools.product((False, True), repeat=2):
            cancel, error = flags
            plain = states.roll_up(jobs, cancel_requested=cancel, build_error=error)
            # A soft failure counts as a pass.
            assert (states.roll_up([*jobs, states.SOFT_FAILED], cancel_requested=cancel, build_error=error)
                    == states.roll_up([*jobs, J.PASSED], cancel_requested=cancel, build_error=error)), jobs
            # An older attempt counts for nothing but that the build ran: waiting builds are running.
            with_retried = states.roll_up([*jobs, states.RETRIED], cancel_requested=cancel, build_error=error)
            expected = BuildState.RUNNING if plain in (BuildState.SCHEDULED, BuildState.HELD) else plain
            assert with_retried == expected, (jobs, flags)
            # The fast path's distinct states decide as every job's list does.
            build = RollUpInputs(BuildState.RUNNING, cancel, error, T0, None)
            everyone = [*jobs, states.RETRIED, states.SOFT_FAILED]
            assert (states.rolled_up_columns(build, set(everyone), now=NOW)
                    == states.rolled_up_columns(build, everyone, now=NOW))


def test_follow_ups_treat_a_soft_failure_as_a_pass_and_never_see_a_retried_job():
    a, b, c, old = (f"00000000-0000-0000-0000-00000000000{i}" for i in range(4))
    prerequisites = {c: [a, b]}
    for ended in ALL_JOB_STATES:
        soft = states.follow_ups({a: states.SOFT_FAILED, b: ended, c: J.PENDING}, prerequisites)
        passed = states.follow_ups({a: J.PASSED, b: ended, c: J.PENDING}, prerequisites)
        assert soft == passed, ended
        # An older attempt in the build (failed, in c's segment even) changes nothing.
        with_old = states.follow_ups({a: J.PASSED, b: ended, c: J.PENDING, old: states.RETRIED}, prerequisites,
                                     {a: 0, old: 0}, {c: 0})
        assert with_old == states.follow_ups({a: J.PASSED, b: ended, c: J.PENDING}, prerequisites, {a: 0}, {c: 0})
        assert old not in with_old


def outcome(jobs: dict[str, Job]) -> tuple:
    build = Build.objects.get(pk=jobs["x"].build_id)
    by_key = dict(Job.objects.filter(build=build).values_list("step_key", "state"))
    return build.state, build.started_at, build.finished_at, by_key


@pytest.mark.django_db
@pytest.mark.parametrize("extra", EXTRAS)
@pytest.mark.parametrize("link", ["edge", "wait"])
@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize(("source", "ended"), ENDINGS)
def test_a_job_ending_settles_as_settle_build_would(pipeline, source, ended, flag, link, extra):
    compared = 0
    for number, other in enumerate(ALL_JOB_STATES, start=1):
        fast = situation(pipeline, ending_from=source, other=other, flag=flag, number=2 * number, link=link,
                         extra=extra)
        full = situation(pipeline, ending_from=source, other=other, flag=flag, number=2 * number + 1, link=link,
                         extra=extra)
        if Job.objects.get(pk=fast["x"].pk).state != source:
            continue  # the first roll-up already moved it (a cancel, or a skip after a failed `y`)

        assert services.finish_job(job=fast["x"], state=ended, now=NOW)  # the fast path where it applies
        assert states.transition_jobs([full["x"].pk], to=ended, now=NOW, build_id=full["x"].build_id) == 1
        states.settle_build(build_id=full["x"].build_id, now=NOW)

        assert outcome(fast) == outcome(full), (source, ended, other, flag)
        compared += 1
    assert compared


@pytest.mark.django_db
@pytest.mark.parametrize("extra", EXTRAS)
@pytest.mark.parametrize("flag", FLAGS)
def test_a_claim_settles_as_settle_build_would(pipeline, flag, extra):
    for number, other in enumerate(ALL_JOB_STATES, start=1):
        fast = situation(pipeline, ending_from=J.SCHEDULED, other=other, flag=flag, number=2 * number, extra=extra)
        full = situation(pipeline, ending_from=J.SCHEDULED, other=other, flag=flag, number=2 * number + 1,
                         extra=extra)

        for jobs in (fast, full):
            assert states.transition_jobs([jobs["x"].pk], to=J.ASSIGNED, now=NOW) == 1
        states.mark_build_running(fast["x"].build_id)
        states.settle_build(build_id=full["x"].build_id, now=NOW)

        assert outcome(fast) == outcome(full), (other, flag)


def test_the_claim_roll_up_holds_for_any_other_job_states():
    # Any set of states the other jobs may hold, with an assigned job among them.
    for size in range(len(ALL_JOB_STATES) + 1):
        for others in itertools.combinations(ALL_JOB_STATES, size):
            assert states.roll_up([*others, J.ASSIGNED]) == states.CLAIMED_ROLL_UP == BuildState.RUNNING


def test_the_passed_job_roll_up_reads_only_which_states_are_present():
    # The fast path hands roll_up the distinct states; the full path hands it every job's.
    build = RollUpInputs(BuildState.RUNNING, False, False, T0, None)
    for size in range(1, 4):
        for jobs in itertools.product(ALL_JOB_STATES, repeat=size):
            everyone = [*jobs, J.PASSED]
            assert (states.rolled_up_columns(build, set(everyone), now=NOW)
                    == states.rolled_up_columns(build, everyone, now=NOW)), everyone


def test_the_fast_path_is_taken_only_for_a_pass_in_a_started_build_without_cancel_or_error():
    for state, cancel, error, started in itertools.product(ALL_JOB_STATES, (False, True), (False, True),
                                                           (None, T0)):
        build = RollUpInputs(BuildState.RUNNING, cancel, error, started, None)
        expected = state == J.PASSED and not cancel and not error and started is not None
        assert states.passed_job_fast_path(build, state) is expected
