"""End to end with a live server and real `manage.py runagent` processes: a superseded build's running
command is stopped by its agent, `max_concurrent_builds: 1` runs builds one after the other, and a due
schedule is built by the reaper's tick and run by an agent."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from django.utils import timezone

from builds.models import Build, Job
from pipelines import schedules as schedule_services
from pipelines.models import PipelineSchedule
from tests.dsl import hm
from tests.e2e import create_build, finished, job_in, job_log, pid_from_log, stdout_of, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("e2e_server")]

PID_THEN = "echo pid=$$; exec "  # the command's pid, then the real work in the same process


def test_a_newer_build_on_the_branch_stops_the_older_ones_running_job(e2e_settings, api, pipeline, agents):
    pipeline.cancel_intermediate_builds = True
    pipeline.save(update_fields=["cancel_intermediate_builds"])
    agents.start("a1")
    first = create_build(api, pipeline, hm.pipeline([hm.sh(PID_THEN + "sleep 600", key="sleep")]),
                         branch="feature/x")
    job = Job.objects.get(build=first)
    pid = pid_from_log(job)

    second = create_build(api, pipeline, hm.pipeline([hm.sh("echo second", key="quick")]), branch="feature/x")
    first.refresh_from_db()
    assert (first.state, first.error_code, first.error_message) == (
        "canceled", "superseded", f"Superseded by build #{second.number} on branch feature/x.")
    # Its agent hears of the cancel at its next heartbeat and stops the command.
    wait_for(lambda: job_in(job, "canceled"), 20, what="the superseded job to end canceled")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "harmont-agent: canceled; stopping the command" in job_log(job)
    done = wait_for(lambda: finished(second), 30, what="the newer build to finish")
    assert done.state == "passed"
    assert stdout_of(Job.objects.get(build=second)) == "second\n"


def test_with_one_slot_the_second_builds_jobs_start_after_the_first_finished(e2e_settings, api, pipeline, agents):
    pipeline.max_concurrent_builds = 1
    pipeline.save(update_fields=["max_concurrent_builds"])
    # Two agents: without the limit the two builds would run side by side.
    agents.start("a1")
    agents.start("a2")
    ir = hm.pipeline([hm.sh("sleep 2; echo one", key="one"), hm.sh("sleep 2; echo two", key="two")])
    first = create_build(api, pipeline, ir)
    second = create_build(api, pipeline, ir)
    assert second.waiting_reason is not None and first.waiting_reason is None

    first = wait_for(lambda: finished(first), 30, what="the first build to finish")
    second = wait_for(lambda: finished(second), 30, what="the second build to finish")
    assert (first.state, second.state) == ("passed", "passed")
    assert second.waiting_reason is None
    second_start = min(job.started_at for job in Job.objects.filter(build=second))
    assert second_start >= max(job.finished_at for job in Job.objects.filter(build=first))
    assert second_start >= first.finished_at


def test_a_due_schedule_is_built_by_the_reaper_and_run_by_an_agent(e2e_settings, api, pipeline, owner, agents,
                                                                   reaper):
    pipeline.allow_manual = False  # schedules build anyway: the server's own path
    pipeline.save(update_fields=["allow_manual"])
    schedule = schedule_services.create_schedule(pipeline=pipeline, cron="0 0 1 1 *", created_by=owner,
                                                 env={"FROM_SCHEDULE": "yes"})
    # Yearly, and due a moment ago (the service counts the first run from now): the due time is this
    # year's 1 January, the one missed run it catches up on; the next is next year's.
    PipelineSchedule.objects.filter(pk=schedule.pk).update(next_run_at=timezone.now() - timedelta(seconds=1))
    agents.start("a1")

    build = wait_for(lambda: Build.objects.filter(pipeline=pipeline).first(), 10, what="the tick to build")
    done = wait_for(lambda: finished(build), 30, what="the scheduled build to finish")
    assert (done.state, done.source, done.created_by, done.env) == ("passed", "schedule", owner,
                                                                    {"FROM_SCHEDULE": "yes"})
    assert {job.step_key: job.state for job in Job.objects.filter(build=build)} == {"a": "passed", "b": "passed"}
    schedule.refresh_from_db()
    assert schedule.last_build_id == build.pk
    assert (schedule.next_run_at.year, schedule.next_run_at.month, schedule.next_run_at.day) == (
        timezone.now().year + 1, 1, 1)
    # One build for that due time, however many reaper passes ran meanwhile.
    assert Build.objects.filter(pipeline=pipeline).count() == 1
