"""The reaper (builds.services.reap): lost agents, overdue jobs, overdue builds. Every call passes `now=`."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone as dt_timezone
from typing import Any

import pytest

from builds import services as build_services
from builds.models import Agent, Build, BuildState, Job, JobState
from builds.services import ReapReport, reaping
from harmont.timestamps import ns_from_datetime
from tests.dsl import hm
from tests.helpers import build_at, job_states, make_agent

J = JobState
B = BuildState
T0 = datetime(2026, 6, 4, 12, 0, tzinfo=dt_timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def agent(org) -> Agent:
    return make_agent(org)


@pytest.fixture
def lost_after(settings) -> int:
    return settings.AGENT_HEARTBEAT_TIMEOUT_SECONDS


@pytest.fixture
def grace(settings) -> int:
    return settings.JOB_TIMEOUT_GRACE_SECONDS


def claim_key(agent: Agent, build: Build, key: str, *, now: datetime) -> Job:
    claim = build_services.claim_job(agent=agent, now=now)
    assert claim is not None and claim.job.step_key == key and claim.job.build_id == build.pk
    return claim.job


def start_key(agent: Agent, build: Build, key: str, *, now: datetime) -> Job:
    job = claim_key(agent, build, key, now=now)
    assert build_services.start_job(job=job, now=now) == J.RUNNING
    return job


def snapshot(build: Build) -> list[tuple[Any, ...]]:
    """Everything the reaper may write, for 'nothing changed' checks."""
    build_row = Build.objects.values_list("state", "error_code", "error_message", "started_at",
                                          "finished_at").get(pk=build.pk)
    job_rows = list(Job.objects.filter(build=build).order_by("position").values_list(
        "step_key", "state", "error_code", "error_message", "finished_at", "exit_code"))
    return [build_row, *job_rows]


def reap(now: datetime) -> ReapReport:
    return build_services.reap(now=now)


# ===================================================================== lost agents


@pytest.mark.django_db
def test_a_running_job_silent_past_the_heartbeat_timeout_fails_and_the_build_rolls_up(agent, pipeline, lost_after):
    build = build_at(pipeline, T0)
    a = start_key(agent, build, "a", now=at(0))

    report = reap(at(lost_after + 1))

    assert report == ReapReport(heartbeat_lost=1)
    a.refresh_from_db()
    assert (a.state, a.error_code, a.finished_at) == (J.FAILED, "agent_heartbeat_lost", at(lost_after + 1))
    assert a.error_message
    # A lost agent's job is retried once by default (builds.services.retries): b waits for the new attempt.
    assert a.retried and job_states(build) == {"a": J.SCHEDULED, "b": J.PENDING}
    build.refresh_from_db()
    assert (build.state, build.finished_at) == (B.RUNNING, None)

    second = start_key(agent, build, "a", now=at(lost_after + 2))
    assert reap(at(2 * lost_after + 3)) == ReapReport(heartbeat_lost=1)
    second.refresh_from_db()
    assert (second.attempt, second.state, second.error_code, second.retried) == (
        2, J.FAILED, "agent_heartbeat_lost", False)
    assert job_states(build) == {"a": J.FAILED, "b": J.SKIPPED}
    build.refresh_from_db()
    assert (build.state, build.finished_at) == (B.FAILED, at(2 * lost_after + 3))


@pytest.mark.django_db
def test_an_assigned_job_whose_agent_vanished_fails_too(agent, pipeline, lost_after):
    build = build_at(pipeline, T0)
    a = claim_key(agent, build, "a", now=at(0))

    assert reap(at(lost_after + 1)) == ReapReport(heartbeat_lost=1)

    a.refresh_from_db()
    assert (a.state, a.error_code, a.started_at, a.retried) == (J.FAILED, "agent_heartbeat_lost", None, True)
    build.refresh_from_db()
    assert build.state == B.RUNNING  # its new attempt waits for an agent


@pytest.mark.django_db
def test_a_canceling_job_whose_agent_vanished_fails_and_the_build_stays_canceled(agent, pipeline, lost_after):
    build = build_at(pipeline, T0)
    a = start_key(agent, build, "a", now=at(0))
    build_services.cancel_build(build=build, now=at(1))

    assert reap(at(lost_after + 1)) == ReapReport(heartbeat_lost=1)

    a.refresh_from_db()
    assert (a.state, a.error_code) == (J.FAILED, "agent_heartbeat_lost")
    build.refresh_from_db()
    assert (build.state, build.finished_at) == (B.CANCELED, at(lost_after + 1))


@pytest.mark.django_db
def test_nothing_happens_before_the_heartbeat_deadline(agent, pipeline, lost_after):
    build = build_at(pipeline, T0)
    start_key(agent, build, "a", now=at(0))
    before = snapshot(build)

    assert reap(at(lost_after)) == ReapReport()   # exactly at the deadline: still alive
    assert snapshot(build) == before


@pytest.mark.django_db
@pytest.mark.parametrize("sign_of_life", ["heartbeat", "logs"])
def test_signs_of_life_push_the_heartbeat_deadline(agent, pipeline, lost_after, sign_of_life):
    build = build_at(pipeline, T0)
    a = start_key(agent, build, "a", now=at(0))
    if sign_of_life == "heartbeat":
        build_services.heartbeat(job=a, now=at(lost_after - 1))
    else:
        build_services.append_log(job=a, chunks=[build_services.ChunkIn(1, 0, "x\n", ns_from_datetime(at(lost_after - 1)))],
                                  now=at(lost_after - 1))

    assert reap(at(lost_after + 5)) == ReapReport()
    a.refresh_from_db()
    assert a.state == J.RUNNING
    assert reap(at(2 * lost_after)) == ReapReport(heartbeat_lost=1)


@pytest.mark.django_db
def test_a_heartbeat_arriving_between_the_reapers_read_and_its_write_keeps_the_job(agent, pipeline, lost_after,
                                                                                   monkeypatch):
    build = build_at(pipeline, T0)
    a = start_key(agent, build, "a", now=at(0))
    real_finish = reaping.finish_job

    def heartbeat_first(**kwargs: Any) -> bool:
        # The reaper has read `a` as silent; the agent's heartbeat lands before the reaper writes.
        build_services.heartbeat(job=a, now=at(lost_after + 1))
        return real_finish(**kwargs)

    monkeypatch.setattr(reaping, "finish_job", heartbeat_first)
    assert reap(at(lost_after + 1)) == ReapReport()
    a.refresh_from_db()
    assert (a.state, a.error_code, a.last_heartbeat_at) == (J.RUNNING, None, at(lost_after + 1))
    monkeypatch.setattr(reaping, "finish_job", real_finish)
    assert reap(at(2 * lost_after + 2)) == ReapReport(heartbeat_lost=1)  # silent again: now it is lost


@pytest.mark.django_db
def test_finished_and_waiting_jobs_are_never_heartbeat_lost(agent, pipeline, lost_after):
    done = build_at(pipeline, T0)
    a = start_key(agent, done, "a", now=at(0))
    build_services.report_finish(job=a, exit_code=0, now=at(1))
    waiting = build_at(pipeline, T0)  # its `a` is scheduled, never claimed
    before = snapshot(done), snapshot(waiting)

    assert reap(at(10 * lost_after)).heartbeat_lost == 0
    assert (snapshot(done), snapshot(waiting)) == before


# ===================================================================== job timeouts


def timeout_ir(job_timeout: int) -> dict[str, Any]:
    """Hand-written graph IR: `slow` (with its own timeout), then `after` building in its files."""
    return {"version": "0", "graph": {
        "nodes": [{"step": {"key": "slow", "cmd": "sleep 1000", "timeout_seconds": job_timeout}, "env": {}},
                  {"step": {"key": "after", "cmd": "true"}, "env": {}}],
        "edges": [[0, 1, "builds_in"]], "node_holes": [], "edge_property": "directed"}}


@pytest.mark.django_db
def test_a_running_job_past_its_timeout_and_grace_is_timing_out(agent, pipeline, grace, lost_after):
    build = build_at(pipeline, T0, pipeline_ir=timeout_ir(60))
    slow = start_key(agent, build, "slow", now=at(0))
    deadline = 60 + grace
    build_services.heartbeat(job=slow, now=at(deadline))  # the agent is alive, just not stopping it

    assert reap(at(deadline)) == ReapReport()
    slow.refresh_from_db()
    assert slow.state == J.RUNNING

    assert reap(at(deadline + 1)) == ReapReport(job_timeouts=1)

    slow.refresh_from_db()
    assert (slow.state, slow.finished_at) == (J.TIMING_OUT, None)
    build.refresh_from_db()
    assert build.state == B.RUNNING
    # The agent's next heartbeat hears it; its report then ends the job timed out.
    assert build_services.heartbeat(job=slow, now=at(deadline + 2)) == J.TIMING_OUT
    assert build_services.report_finish(job=slow, exit_code=143, signal=15, now=at(deadline + 3)) == J.TIMED_OUT
    slow.refresh_from_db()
    assert (slow.state, slow.error_code, slow.exit_code) == (J.TIMED_OUT, "job_timeout", 143)
    assert "60 s" in slow.error_message
    assert job_states(build) == {"slow": J.TIMED_OUT, "after": J.SKIPPED}
    build.refresh_from_db()
    assert (build.state, build.error_code, build.finished_at) == (B.FAILED, None, at(deadline + 3))


@pytest.mark.django_db
def test_job_timeout_defaults_to_the_setting(agent, pipeline, settings, grace):
    build = build_at(pipeline, T0)
    a = start_key(agent, build, "a", now=at(0))
    assert a.timeout_seconds == settings.DEFAULT_JOB_TIMEOUT_SECONDS
    deadline = settings.DEFAULT_JOB_TIMEOUT_SECONDS + grace
    build_services.heartbeat(job=a, now=at(deadline))

    assert reap(at(deadline)).job_timeouts == 0
    assert reap(at(deadline + 1)).job_timeouts == 1


@pytest.mark.django_db
def test_an_assigned_job_has_no_job_timeout(agent, pipeline, grace):
    build = build_at(pipeline, T0, pipeline_ir=timeout_ir(5))
    slow = claim_key(agent, build, "slow", now=at(0))
    build_services.heartbeat(job=slow, now=at(100))

    assert reap(at(101)) == ReapReport()
    slow.refresh_from_db()
    assert slow.state == J.ASSIGNED


# ===================================================================== pipeline timeouts


def dsl_pipeline_with_timeout() -> dict[str, Any]:
    """`a` then `b` (builds in a's files), pipeline timeout 30 s, rendered by the real harmont package."""
    first = hm.sh("echo a", key="a")
    return hm.pipeline([first.sh("echo b", key="b")], timeout="30s")


@pytest.mark.django_db
def test_a_build_past_its_pipeline_timeout_fails_and_its_jobs_time_out(agent, pipeline):
    ir = dsl_pipeline_with_timeout()
    assert ir["timeout_seconds"] == 30
    build = build_at(pipeline, T0, pipeline_ir=ir)
    a = start_key(agent, build, "a", now=at(10))   # the clock starts here, not at creation
    build_services.heartbeat(job=a, now=at(39))
    assert reap(at(40)) == ReapReport()

    report = reap(at(41))

    assert report == ReapReport(pipeline_timeouts=1)
    build.refresh_from_db()
    assert (build.state, build.error_code, build.finished_at) == (B.FAILED, "pipeline_timeout", None)
    assert "30 s" in build.error_message
    a.refresh_from_db()
    b = Job.objects.get(build=build, step_key="b")
    assert (a.state, a.finished_at) == (J.TIMING_OUT, None)
    assert (b.state, b.error_code, b.finished_at) == (J.TIMED_OUT, "pipeline_timeout", at(41))
    # The agent hears it at its next heartbeat, stops the command and reports.
    assert build_services.heartbeat(job=a, now=at(42)) == J.TIMING_OUT
    assert build_services.report_finish(job=a, exit_code=143, signal=15, outcome="timed_out", now=at(43)) == J.TIMED_OUT
    a.refresh_from_db()
    assert (a.state, a.error_code, a.finished_at) == (J.TIMED_OUT, "pipeline_timeout", at(43))
    assert "pipeline timeout" in a.error_message
    build.refresh_from_db()
    assert (build.state, build.error_code, build.finished_at) == (B.FAILED, "pipeline_timeout", at(43))


@pytest.mark.django_db
def test_pipeline_timeout_from_a_hand_written_flat_ir(agent, org, pipeline):
    ir = {"version": "0", "timeout_seconds": 60, "steps": [
        {"type": "command", "key": "run", "cmd": "make test"},
        {"type": "command", "key": "claimed", "cmd": "make lint"},
        {"type": "command", "key": "queued", "cmd": "make docs"},
        {"type": "wait"},
        {"type": "command", "key": "later", "cmd": "make deploy"},
    ]}
    build = build_at(pipeline, T0, pipeline_ir=ir)
    assert build.timeout_seconds == 60
    run = start_key(agent, build, "run", now=at(0))
    claimed = claim_key(make_agent(org, name="second"), build, "claimed", now=at(50))
    build_services.heartbeat(job=run, now=at(55))

    assert reap(at(61)) == ReapReport(pipeline_timeouts=1)

    assert job_states(build) == {"run": J.TIMING_OUT, "claimed": J.TIMED_OUT, "queued": J.TIMED_OUT,
                                 "later": J.TIMED_OUT}
    assert set(Job.objects.filter(build=build).values_list("error_code", flat=True)) == {"pipeline_timeout"}
    # The agent holding `claimed` is told not to run it.
    assert build_services.start_job(job=claimed, now=at(62)) == J.TIMED_OUT
    build.refresh_from_db()
    assert (build.state, build.error_code) == (B.FAILED, "pipeline_timeout")


@pytest.mark.django_db
def test_a_second_reap_pass_changes_nothing(agent, org, pipeline, lost_after):
    lost_build = build_at(pipeline, T0)
    start_key(agent, lost_build, "a", now=at(0))
    late_build = build_at(pipeline, T0, pipeline_ir=dsl_pipeline_with_timeout())
    late = start_key(make_agent(org, name="alive"), late_build, "a", now=at(0))
    build_services.heartbeat(job=late, now=at(lost_after + 1))
    first = reap(at(lost_after + 2))
    assert first == ReapReport(heartbeat_lost=1, pipeline_timeouts=1)
    after_first = snapshot(lost_build), snapshot(late_build)

    assert reap(at(lost_after + 2)) == ReapReport()
    assert (snapshot(lost_build), snapshot(late_build)) == after_first


@pytest.mark.django_db
def test_a_build_that_never_started_has_no_pipeline_deadline_yet(agent, pipeline):
    build = build_at(pipeline, T0, pipeline_ir=dsl_pipeline_with_timeout())
    before = snapshot(build)

    assert reap(at(3600)) == ReapReport()
    assert snapshot(build) == before


@pytest.mark.django_db
def test_finished_and_canceled_builds_are_never_timed_out(agent, pipeline):
    canceled = build_at(pipeline, T0, pipeline_ir=dsl_pipeline_with_timeout())
    a = start_key(agent, canceled, "a", now=at(0))
    build_services.cancel_build(build=canceled, now=at(1))
    build_services.report_finish(job=a, exit_code=143, now=at(2))
    ir = hm.pipeline([hm.sh("true", key="only")], timeout="30s")
    passed = build_at(pipeline, T0, pipeline_ir=ir)
    only = start_key(agent, passed, "only", now=at(0))
    build_services.report_finish(job=only, exit_code=0, now=at(3))
    before = snapshot(canceled), snapshot(passed)
    assert before[0][0][0] == B.CANCELED and before[1][0][0] == B.PASSED

    assert reap(at(3600)) == ReapReport()
    assert (snapshot(canceled), snapshot(passed)) == before


@pytest.mark.django_db
def test_heartbeat_loss_and_a_pipeline_timeout_in_one_pass(agent, pipeline, lost_after):
    build = build_at(pipeline, T0, pipeline_ir=dsl_pipeline_with_timeout())
    a = start_key(agent, build, "a", now=at(0))

    # Both deadlines passed: the lost agent is judged first, and the build still ends failed.
    report = reap(at(lost_after + 60))

    assert report.heartbeat_lost == 1
    a.refresh_from_db()
    assert (a.state, a.error_code) == (J.FAILED, "agent_heartbeat_lost")
    build.refresh_from_db()
    assert build.state == B.FAILED and build.finished_at is not None
