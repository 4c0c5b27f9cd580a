"""The job/build state machine (builds.states) and the services that drive it."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest

from builds import services as build_services
from builds import states
from builds.models import Build, BuildState, Job, JobState
from builds.states import (
    JOB_TRANSITIONS,
    TERMINAL_JOB_STATES,
    can_transition,
    follow_ups,
    roll_up,
    sources_for,
    transition_jobs,
)
from tests.helpers import four_job_ir, make_build

J = JobState
B = BuildState
T0 = datetime(2026, 6, 4, 12, 0, tzinfo=dt_timezone.utc)
WAITING = (J.PENDING, J.SCHEDULED)
ACTIVE = (J.ASSIGNED, J.RUNNING, J.CANCELING, J.TIMING_OUT)


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


# ===================================================================== roll_up, rule by rule


class TestRollUp:
    # Rule 1: cancel requested -> canceled, whatever the jobs did.
    @pytest.mark.parametrize("jobs", [[], [J.PASSED], [J.FAILED, J.PASSED], [J.RUNNING], [J.CANCELING, J.CANCELED],
                                      [J.SKIPPED]])
    def test_rule_1_cancel_requested_is_canceled(self, jobs):
        assert roll_up(jobs, cancel_requested=True) == B.CANCELED

    # Rule 2: no jobs, or all terminal and all skipped -> skipped.
    def test_rule_2_no_jobs_is_skipped(self):
        assert roll_up([]) == B.SKIPPED

    def test_rule_2_all_skipped_is_skipped(self):
        assert roll_up([J.SKIPPED, J.SKIPPED]) == B.SKIPPED

    def test_rule_2_needs_every_job_skipped(self):
        assert roll_up([J.SKIPPED, J.PASSED]) == B.PASSED
        assert roll_up([J.SKIPPED, J.PENDING]) == B.RUNNING

    # Rule 3: all terminal -> failed if any failed/timed_out, else passed.
    @pytest.mark.parametrize("jobs", [[J.FAILED], [J.TIMED_OUT], [J.PASSED, J.FAILED], [J.SKIPPED, J.TIMED_OUT],
                                      [J.PASSED, J.CANCELED, J.FAILED]])
    def test_rule_3_any_failure_among_terminal_jobs_is_failed(self, jobs):
        assert roll_up(jobs) == B.FAILED

    @pytest.mark.parametrize("jobs", [[J.PASSED], [J.PASSED, J.SKIPPED]])
    def test_rule_3_terminal_without_failure_is_passed(self, jobs):
        assert roll_up(jobs) == B.PASSED

    # A canceled job outlives its build's cancel only when a retry lifted it: never passed.
    @pytest.mark.parametrize("jobs", [[J.CANCELED], [J.PASSED, J.CANCELED], [J.SKIPPED, J.CANCELED]])
    def test_a_canceled_job_without_a_cancel_request_is_canceled(self, jobs):
        assert roll_up(jobs) == B.CANCELED
        assert roll_up([*jobs, J.FAILED]) == B.FAILED

    # Rule 4: any job past pending/scheduled -> running.
    @pytest.mark.parametrize("active", [*ACTIVE, J.PASSED, J.FAILED, J.SKIPPED, J.TIMED_OUT, J.CANCELED])
    def test_rule_4_any_job_past_waiting_is_running(self, active):
        assert roll_up([active, J.PENDING]) == B.RUNNING
        assert roll_up([J.SCHEDULED, active]) == B.RUNNING

    @pytest.mark.parametrize("active", ACTIVE)
    def test_rule_4_active_alone_is_running(self, active):
        assert roll_up([active]) == B.RUNNING

    # A build waiting for approval: held until its held jobs are scheduled, canceled or anything runs.
    @pytest.mark.parametrize("jobs", [[J.HELD], [J.HELD, J.PENDING], [J.HELD, J.SCHEDULED, J.PENDING]])
    def test_waiting_jobs_with_one_held_is_held(self, jobs):
        assert roll_up(jobs) == B.HELD
        assert roll_up(jobs, cancel_requested=True) == B.CANCELED

    # Rule 5: otherwise scheduled.
    @pytest.mark.parametrize("jobs", [[J.PENDING], [J.SCHEDULED], [J.SCHEDULED, J.PENDING, J.PENDING]])
    def test_rule_5_only_waiting_jobs_is_scheduled(self, jobs):
        assert roll_up(jobs) == B.SCHEDULED

    def test_every_single_job_state_rolls_up(self):
        expected = {
            J.PENDING: B.SCHEDULED, J.SCHEDULED: B.SCHEDULED, J.ASSIGNED: B.RUNNING, J.RUNNING: B.RUNNING,
            J.PASSED: B.PASSED, J.FAILED: B.FAILED, J.SKIPPED: B.SKIPPED, J.CANCELING: B.RUNNING,
            J.CANCELED: B.CANCELED, J.TIMING_OUT: B.RUNNING, J.TIMED_OUT: B.FAILED, J.HELD: B.HELD,
        }
        assert set(expected) == set(J.values)
        assert {state: roll_up([state]) for state in J.values} == expected

    # Precedence between the rules and the build-level error.
    def test_cancel_beats_build_error(self):
        assert roll_up([], cancel_requested=True, build_error=True) == B.CANCELED
        assert roll_up([J.FAILED], cancel_requested=True, build_error=True) == B.CANCELED

    @pytest.mark.parametrize("jobs", [[], [J.SKIPPED], [J.PASSED], [J.RUNNING], [J.PENDING]])
    def test_build_error_beats_every_job_rule(self, jobs):
        assert roll_up(jobs, build_error=True) == B.FAILED

    def test_skipped_beats_passed_and_terminal_beats_running(self):
        assert roll_up([J.SKIPPED, J.SKIPPED]) == B.SKIPPED  # rule 2 before rule 3's "else passed"
        assert roll_up([J.PASSED, J.PASSED]) == B.PASSED  # rule 3 before rule 4 (passed is past waiting)

    def test_accepts_any_iterable(self):
        assert roll_up(iter([J.PASSED, J.FAILED])) == B.FAILED
        assert roll_up(s for s in [J.SKIPPED]) == B.SKIPPED


# ===================================================================== follow_ups


def ids(*names: str) -> dict[str, uuid.UUID]:
    return {name: uuid.uuid4() for name in names}


def named(changes: dict[uuid.UUID, str], job_ids: dict[str, uuid.UUID]) -> dict[str, str]:
    names = {v: k for k, v in job_ids.items()}
    return {names[job]: state for job, state in changes.items()}


class TestFollowUps:
    def test_promotes_when_every_prerequisite_passed(self):
        n = ids("a", "b", "c")
        result = follow_ups({n["a"]: J.PASSED, n["b"]: J.PASSED, n["c"]: J.PENDING}, {n["c"]: [n["a"], n["b"]]})
        assert named(result, n) == {"c": J.SCHEDULED}

    def test_skipped_prerequisite_counts_as_satisfied(self):
        n = ids("a", "b", "c")
        result = follow_ups({n["a"]: J.SKIPPED, n["b"]: J.PASSED, n["c"]: J.PENDING}, {n["c"]: [n["a"], n["b"]]})
        assert named(result, n) == {"c": J.SCHEDULED}

    @pytest.mark.parametrize("other", [J.PENDING, J.SCHEDULED, J.ASSIGNED, J.RUNNING, J.CANCELING, J.TIMING_OUT])
    def test_waits_while_a_prerequisite_is_unfinished(self, other):
        n = ids("a", "b", "c")
        result = follow_ups({n["a"]: J.PASSED, n["b"]: other, n["c"]: J.PENDING}, {n["c"]: [n["a"], n["b"]]})
        assert "c" not in named(result, n)

    def test_pending_root_is_scheduled(self):
        n = ids("a")
        assert named(follow_ups({n["a"]: J.PENDING}, {}), n) == {"a": J.SCHEDULED}

    @pytest.mark.parametrize("blocking", [J.FAILED, J.TIMED_OUT, J.CANCELED])
    def test_failure_skips_transitive_dependents(self, blocking):
        n = ids("a", "b", "c")  # a -> b -> c
        result = follow_ups({n["a"]: blocking, n["b"]: J.PENDING, n["c"]: J.PENDING},
                            {n["b"]: [n["a"]], n["c"]: [n["b"]]})
        assert named(result, n) == {"b": J.SKIPPED, "c": J.SKIPPED}

    def test_failure_in_a_fork_leaves_the_other_branch_running(self):
        n = ids("root", "left", "left2", "right", "right2")
        prerequisites = {n["left"]: [n["root"]], n["left2"]: [n["left"]], n["right"]: [n["root"]],
                         n["right2"]: [n["right"]]}
        result = follow_ups({n["root"]: J.PASSED, n["left"]: J.FAILED, n["left2"]: J.PENDING,
                             n["right"]: J.PASSED, n["right2"]: J.PENDING}, prerequisites)
        assert named(result, n) == {"left2": J.SKIPPED, "right2": J.SCHEDULED}

    def test_failure_wins_over_a_satisfied_prerequisite(self):
        n = ids("a", "b", "c")  # a and b both feed c
        result = follow_ups({n["a"]: J.FAILED, n["b"]: J.PASSED, n["c"]: J.PENDING}, {n["c"]: [n["a"], n["b"]]})
        assert named(result, n) == {"c": J.SKIPPED}

    def test_skip_cascades_through_a_diamond_once(self):
        n = ids("a", "b", "c", "d")  # a -> b, a -> c, b -> d, c -> d
        result = follow_ups({n["a"]: J.FAILED, n["b"]: J.PENDING, n["c"]: J.PENDING, n["d"]: J.PENDING},
                            {n["b"]: [n["a"]], n["c"]: [n["a"]], n["d"]: [n["b"], n["c"]]})
        assert named(result, n) == {"b": J.SKIPPED, "c": J.SKIPPED, "d": J.SKIPPED}

    def test_never_touches_jobs_that_left_waiting(self):
        n = ids("a", "b", "c")
        result = follow_ups({n["a"]: J.FAILED, n["b"]: J.RUNNING, n["c"]: J.PASSED},
                            {n["b"]: [n["a"]], n["c"]: [n["a"]]})
        assert result == {}

    def test_nothing_to_do(self):
        assert follow_ups({}, {}) == {}
        n = ids("a", "b")
        assert follow_ups({n["a"]: J.RUNNING, n["b"]: J.PENDING}, {n["b"]: [n["a"]]}) == {}


# ===================================================================== transition table


class TestTransitionTable:
    def test_table_covers_every_state(self):
        assert set(JOB_TRANSITIONS) == set(J.values)
        assert all(targets <= set(J.values) for targets in JOB_TRANSITIONS.values())

    def test_terminal_states_are_the_specs(self):
        assert TERMINAL_JOB_STATES == {J.PASSED, J.FAILED, J.SKIPPED, J.CANCELED, J.TIMED_OUT}

    @pytest.mark.parametrize("terminal", sorted(TERMINAL_JOB_STATES))
    def test_terminal_states_have_no_exits_but_a_retry_reopening_a_dependent(self, terminal):
        # Only a retry moves an ended job: a skipped (or canceled, never-claimed) dependent waits again.
        reopened = {J.PENDING} if terminal in (J.SKIPPED, J.CANCELED) else set()
        assert JOB_TRANSITIONS[terminal] == reopened
        assert {target for target in J.values if can_transition(terminal, target)} == reopened

    @pytest.mark.parametrize("state", sorted(set(J.values) - TERMINAL_JOB_STATES))
    def test_every_live_state_can_end(self, state):
        assert JOB_TRANSITIONS[state] & TERMINAL_JOB_STATES

    @pytest.mark.parametrize(("source", "target"), [
        (J.PASSED, J.RUNNING), (J.PENDING, J.RUNNING), (J.PENDING, J.ASSIGNED), (J.HELD, J.PASSED),
        (J.SCHEDULED, J.RUNNING), (J.SCHEDULED, J.PASSED), (J.RUNNING, J.SCHEDULED), (J.RUNNING, J.PENDING),
        (J.CANCELING, J.PASSED), (J.CANCELING, J.RUNNING), (J.TIMING_OUT, J.PASSED), (J.FAILED, J.PASSED),
        (J.CANCELED, J.SCHEDULED), (J.RUNNING, J.SKIPPED), (J.RUNNING, J.CANCELED),
        # A held job reaches an agent only through approval; nothing goes back to held.
        (J.HELD, J.ASSIGNED), (J.HELD, J.RUNNING), (J.SCHEDULED, J.HELD), (J.PENDING, J.HELD),
        (J.ASSIGNED, J.HELD),
    ])
    def test_illegal_transitions(self, source, target):
        assert not can_transition(source, target)

    @pytest.mark.parametrize(("source", "target"), [
        (J.PENDING, J.SCHEDULED), (J.PENDING, J.SKIPPED), (J.PENDING, J.CANCELED), (J.SCHEDULED, J.ASSIGNED),
        (J.SCHEDULED, J.CANCELED), (J.ASSIGNED, J.RUNNING), (J.ASSIGNED, J.SCHEDULED), (J.ASSIGNED, J.CANCELING),
        (J.RUNNING, J.PASSED), (J.RUNNING, J.FAILED), (J.RUNNING, J.CANCELING), (J.RUNNING, J.TIMING_OUT),
        (J.RUNNING, J.TIMED_OUT), (J.CANCELING, J.CANCELED), (J.TIMING_OUT, J.TIMED_OUT),
        (J.HELD, J.SCHEDULED), (J.HELD, J.CANCELED),
        (J.PENDING, J.PASSED),  # a step cache hit, once its prerequisites are met
    ])
    def test_legal_transitions(self, source, target):
        assert can_transition(source, target)

    def test_sources_for_inverts_the_table(self):
        assert sources_for(J.RUNNING) == {J.ASSIGNED}
        # An agent's report (of a job it started, or whose start rode on the report), or a step cache hit.
        assert sources_for(J.PASSED) == {J.RUNNING, J.ASSIGNED, J.PENDING}
        assert sources_for(J.CANCELED) == {J.HELD, J.PENDING, J.SCHEDULED, J.ASSIGNED, J.CANCELING}
        assert sources_for(J.PENDING) == {J.SKIPPED, J.CANCELED, J.HELD}  # a retry's reopened dependents; a held job approved while no concurrency slot is free
        for target in J.values:
            assert sources_for(target) == {s for s in J.values if can_transition(s, target)}


# ===================================================================== compare-and-set


@pytest.mark.django_db
class TestCompareAndSet:
    def test_finish_on_terminal_job_returns_false_and_changes_nothing(self, build):
        job = Job.objects.get(build=build, step_key="a")
        build_services.move_job(job=job, state=J.ASSIGNED, now=at(1))
        build_services.move_job(job=job, state=J.RUNNING, now=at(2))
        assert build_services.finish_job(job=job, state=J.PASSED, exit_code=0, now=at(3))
        build.refresh_from_db()
        before_build = (build.state, build.started_at, build.finished_at)

        stale = Job.objects.get(pk=job.pk)
        assert build_services.finish_job(job=stale, state=J.FAILED, exit_code=1, error_code="x", now=at(9)) is False

        job.refresh_from_db()
        assert (job.state, job.exit_code, job.error_code, job.finished_at) == (J.PASSED, 0, None, at(3))
        build.refresh_from_db()
        assert (build.state, build.started_at, build.finished_at) == before_build
        assert Job.objects.get(build=build, step_key="b").state == J.SCHEDULED

    def test_finish_twice_second_loses(self, build):
        job = Job.objects.get(build=build, step_key="a")
        build_services.move_job(job=job, state=J.ASSIGNED)
        build_services.move_job(job=job, state=J.RUNNING)

        results = [build_services.finish_job(job=job, state=J.FAILED, exit_code=1),
                   build_services.finish_job(job=job, state=J.PASSED, exit_code=0)]

        assert results == [True, False]
        job.refresh_from_db()
        assert (job.state, job.exit_code) == (J.FAILED, 1)

    def test_finish_from_a_waiting_state_is_refused(self, build):
        job = Job.objects.get(build=build, step_key="a")  # scheduled, never ran
        assert build_services.finish_job(job=job, state=J.PASSED, exit_code=0) is False
        job.refresh_from_db()
        assert (job.state, job.exit_code, job.finished_at) == (J.SCHEDULED, None, None)

    def test_move_pending_to_running_is_refused(self, build):
        job = Job.objects.get(build=build, step_key="b")
        assert build_services.move_job(job=job, state=J.RUNNING) is False
        assert build_services.move_job(job=job, state=J.ASSIGNED) is False
        job.refresh_from_db()
        assert (job.state, job.started_at) == (J.PENDING, None)
        build.refresh_from_db()
        assert build.state == B.SCHEDULED

    def test_services_refuse_the_wrong_kind_of_state(self, build):
        job = Job.objects.get(build=build, step_key="a")
        with pytest.raises(ValueError):
            build_services.finish_job(job=job, state=J.RUNNING)
        with pytest.raises(ValueError):
            build_services.move_job(job=job, state=J.PASSED)

    def test_transition_jobs_only_moves_allowed_rows(self, build, pipeline):
        other = make_build(pipeline)
        a, b = Job.objects.get(build=build, step_key="a"), Job.objects.get(build=build, step_key="b")
        c = Job.objects.get(build=other, step_key="a")

        changed = transition_jobs([a.pk, b.pk, c.pk], to=J.ASSIGNED, now=at(1))  # b is pending

        assert changed == 2
        assert [Job.objects.get(pk=j.pk).state for j in (a, b, c)] == [J.ASSIGNED, J.PENDING, J.ASSIGNED]
        assert transition_jobs([], to=J.ASSIGNED, now=at(1)) == 0

    def test_transition_jobs_stamps_times(self, build):
        a, b = Job.objects.get(build=build, step_key="a"), Job.objects.get(build=build, step_key="b")
        transition_jobs([a.pk], to=J.ASSIGNED, now=at(1))
        transition_jobs([a.pk], to=J.RUNNING, now=at(2))
        transition_jobs([b.pk], to=J.SCHEDULED, now=at(3))
        transition_jobs([a.pk], to=J.PASSED, now=at(4), build_id=build.pk)
        a.refresh_from_db()
        b.refresh_from_db()
        assert (a.started_at, a.finished_at, b.scheduled_at) == (at(2), at(4), at(3))


# ===================================================================== end to end through the services


def jobs_of(build: Build) -> dict[str, Job]:
    return {job.step_key: job for job in Job.objects.filter(build=build)}


def states_of(build: Build) -> dict[str, str]:
    return {key: job.state for key, job in jobs_of(build).items()}


def run(build: Build, key: str, *, start: int, end: int, state: str = J.PASSED, exit_code: int = 0) -> None:
    job = jobs_of(build)[key]
    assert build_services.move_job(job=job, state=J.ASSIGNED, now=at(start))
    assert build_services.move_job(job=job, state=J.RUNNING, now=at(start))
    assert build_services.finish_job(job=job, state=state, exit_code=exit_code, now=at(end))


def build_row(build: Build) -> tuple:
    build.refresh_from_db()
    return build.state, build.started_at, build.finished_at


@pytest.fixture
def four(pipeline) -> Build:
    # deps -> build (builds_in); lint; wait; deploy after deps, build and lint.
    request = build_services.validate_build_request(branch="main", commit="abc123", pipeline_ir=four_job_ir())
    return build_services.create_build(pipeline=pipeline, request=request, now=T0)


@pytest.mark.django_db
class TestEndToEnd:
    def test_a_four_job_build_passes(self, four):
        assert states_of(four) == {"deps": J.SCHEDULED, "build": J.PENDING, "lint": J.SCHEDULED,
                                   "deploy": J.PENDING}
        assert build_row(four) == (B.SCHEDULED, None, None)

        deps = jobs_of(four)["deps"]
        build_services.move_job(job=deps, state=J.ASSIGNED, now=at(1))
        assert build_row(four) == (B.RUNNING, None, None)  # claimed, not yet started
        build_services.move_job(job=deps, state=J.RUNNING, now=at(2))
        assert build_row(four) == (B.RUNNING, at(2), None)
        build_services.finish_job(job=deps, state=J.PASSED, exit_code=0, now=at(3))
        assert states_of(four) == {"deps": J.PASSED, "build": J.SCHEDULED, "lint": J.SCHEDULED,
                                   "deploy": J.PENDING}
        assert jobs_of(four)["build"].scheduled_at == at(3)

        run(four, "lint", start=4, end=5)
        assert states_of(four)["deploy"] == J.PENDING  # build still to go
        run(four, "build", start=6, end=7)
        assert states_of(four)["deploy"] == J.SCHEDULED
        assert build_row(four) == (B.RUNNING, at(2), None)

        run(four, "deploy", start=8, end=9)
        assert states_of(four) == dict.fromkeys(("deps", "build", "lint", "deploy"), J.PASSED)
        assert build_row(four) == (B.PASSED, at(2), at(9))

    def test_a_failure_skips_its_dependents_and_the_build_fails_at_the_end(self, four):
        run(four, "deps", start=1, end=2, state=J.FAILED, exit_code=1)

        assert states_of(four) == {"deps": J.FAILED, "build": J.SKIPPED, "lint": J.SCHEDULED,
                                   "deploy": J.SKIPPED}
        skipped = jobs_of(four)["build"]
        assert (skipped.finished_at, skipped.started_at, skipped.exit_code) == (at(2), None, None)
        assert build_row(four) == (B.RUNNING, at(1), None)  # lint still to run

        run(four, "lint", start=3, end=4)
        assert build_row(four) == (B.FAILED, at(1), at(4))

    def test_a_failure_on_one_branch_lets_the_other_finish(self, four):
        run(four, "lint", start=1, end=2, state=J.FAILED, exit_code=2)
        assert states_of(four) == {"deps": J.SCHEDULED, "build": J.PENDING, "lint": J.FAILED,
                                   "deploy": J.SKIPPED}

        run(four, "deps", start=3, end=4)
        assert states_of(four)["build"] == J.SCHEDULED
        run(four, "build", start=5, end=6)

        assert states_of(four) == {"deps": J.PASSED, "build": J.PASSED, "lint": J.FAILED, "deploy": J.SKIPPED}
        assert build_row(four) == (B.FAILED, at(1), at(6))

    def test_a_timed_out_job_fails_the_build(self, four):
        run(four, "deps", start=1, end=2)
        run(four, "build", start=3, end=4)
        run(four, "lint", start=3, end=5, state=J.TIMED_OUT, exit_code=-9)

        assert states_of(four)["deploy"] == J.SKIPPED
        assert build_row(four) == (B.FAILED, at(1), at(5))

    def test_timing_out_keeps_the_build_running(self, four):
        lint = jobs_of(four)["lint"]
        build_services.move_job(job=lint, state=J.ASSIGNED, now=at(1))
        build_services.move_job(job=lint, state=J.RUNNING, now=at(1))
        assert build_services.move_job(job=lint, state=J.TIMING_OUT, now=at(2))

        assert build_row(four) == (B.RUNNING, at(1), None)
        assert build_services.finish_job(job=lint, state=J.TIMED_OUT, now=at(3))
        assert states_of(four)["deploy"] == J.SKIPPED

    def test_started_at_is_the_first_job_start(self, four):
        run(four, "lint", start=5, end=6)
        run(four, "deps", start=7, end=8)
        assert build_row(four)[1] == at(5)

    def test_every_job_skipped_after_root_failure(self, pipeline):
        request = build_services.validate_build_request(branch="main", commit="abc123")  # stored a -> b
        build = build_services.create_build(pipeline=pipeline, request=request, now=T0)

        run(build, "a", start=1, end=2, state=J.FAILED, exit_code=1)

        assert states_of(build) == {"a": J.FAILED, "b": J.SKIPPED}
        assert build_row(build) == (B.FAILED, at(1), at(2))

    def test_cancel_then_agent_report_finishes_the_build(self, four):
        deps = jobs_of(four)["deps"]
        build_services.move_job(job=deps, state=J.ASSIGNED, now=at(1))
        build_services.move_job(job=deps, state=J.RUNNING, now=at(2))

        canceled = build_services.cancel_build(build=four, now=at(3))

        assert (canceled.state, canceled.finished_at) == (B.CANCELED, None)
        assert states_of(four) == {"deps": J.CANCELING, "build": J.CANCELED, "lint": J.CANCELED,
                                   "deploy": J.CANCELED}
        # A normal finish is no longer what the agent may report.
        assert build_services.finish_job(job=deps, state=J.PASSED, exit_code=0, now=at(4)) is False
        assert build_services.finish_job(job=deps, state=J.CANCELED, exit_code=143, now=at(5))
        assert build_row(four) == (B.CANCELED, at(2), at(5))

    def test_settle_build_is_idempotent(self, four):
        run(four, "deps", start=1, end=2)
        before = (states_of(four), build_row(four))

        settled = states.settle_build(build_id=four.pk, now=at(30))

        assert (states_of(four), build_row(four)) == before
        assert settled.state == B.RUNNING
