"""End to end: retries and soft fail with a live server and real `manage.py runagent` processes.

A step that must fail once and then pass keeps a marker file in a directory of
the test, outside every workspace (a new attempt starts from a fresh one).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from builds.models import Job
from tests.e2e import create_build, finished, job_in, kill_group, pid_from_log, stdout_of, wait_for
from tests.helpers import builds_url

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("e2e_server")]


def step(key: str, cmd: str, **fields: Any) -> dict[str, Any]:
    return {"type": "command", "key": key, "cmd": cmd, **fields}


def fails_once(marker: Path, exit_code: int) -> str:
    """A command failing with `exit_code` the first time it runs, passing after."""
    return (f'if [ -e "{marker}" ]; then echo second-run; else touch "{marker}"; echo first-run; '
            f"exit {exit_code}; fi")


def attempts(build: Any, key: str) -> list[Job]:
    return list(Job.objects.filter(build_id=build.pk, step_key=key).order_by("attempt"))


def latest(build: Any, key: str) -> Job:
    return Job.objects.get(build_id=build.pk, step_key=key, retried=False)


def test_an_automatic_retry_on_its_exit_status_makes_a_flaky_step_pass(e2e_settings, api, pipeline, agents,
                                                                       tmp_path):
    agents.start("a1")
    ir = {"version": "0", "steps": [
        step("flaky", fails_once(tmp_path / "flaky", 3), retry={"automatic": [{"exit_status": 3, "limit": 1}]}),
        step("after", "echo after", depends_on=["flaky"]),
    ]}
    build = create_build(api, pipeline, ir)

    wait_for(lambda: finished(build), 60, what="the build to finish")
    assert build.state == "passed"
    first, second = attempts(build, "flaky")
    assert (first.attempt, first.state, first.exit_code, first.retried) == (1, "failed", 3, True)
    assert (second.attempt, second.state, second.retry_of_id, second.retried) == (2, "passed", first.pk, False)
    assert stdout_of(first) == "first-run\n" and stdout_of(second) == "second-run\n"
    assert (latest(build, "after").state, stdout_of(latest(build, "after"))) == ("passed", "after\n")
    # The API's job list shows the latest attempts, and with include_retried the first one too.
    url = builds_url(pipeline, f"/{build.number}/jobs")
    assert [(j["step_key"], j["attempt"]) for j in api.get(url).json()["data"]] == [("flaky", 2), ("after", 1)]
    assert [(j["step_key"], j["attempt"], j["retried"]) for j in
            api.get(url + "?include_retried=true").json()["data"]] == [
        ("flaky", 1, True), ("flaky", 2, False), ("after", 1, False)]


def test_a_retry_through_the_api_runs_the_skipped_dependent_and_the_build_passes(e2e_settings, api, pipeline,
                                                                                 agents, tmp_path):
    agents.start("a1")
    ir = {"version": "0", "steps": [
        step("build", fails_once(tmp_path / "build", 1) + "; echo built > out.txt"),
        step("test", "cat out.txt", builds_in="build"),
    ]}
    build = create_build(api, pipeline, ir)
    wait_for(lambda: finished(build), 60, what="the build to fail")
    assert build.state == "failed"
    failed = latest(build, "build")
    assert (failed.state, latest(build, "test").state) == ("failed", "skipped")

    response = api.post(builds_url(pipeline, f"/{build.number}/jobs/{failed.pk}/retry"))
    assert response.status_code == 201, response.content
    assert response.json()["attempt"] == 2 and response.json()["retry_of"] == str(failed.pk)
    build.refresh_from_db()
    assert (build.state, build.finished_at) == ("running", None)

    wait_for(lambda: finished(build), 60, what="the retried build to finish")
    assert build.state == "passed"
    assert [(j.attempt, j.state) for j in attempts(build, "build")] == [(1, "failed"), (2, "passed")]
    # The dependent ran on the new attempt's files.
    assert (latest(build, "test").state, stdout_of(latest(build, "test"))) == ("passed", "built\n")


def test_a_soft_failed_step_lets_its_dependent_run_and_the_build_pass(e2e_settings, api, pipeline, agents):
    agents.start("a1")
    ir = {"version": "0", "steps": [
        step("lint", "echo warnings; exit 42", soft_fail=[{"exit_status": 42}]),
        step("deploy", "echo deployed", depends_on=["lint"]),
    ]}
    build = create_build(api, pipeline, ir)

    wait_for(lambda: finished(build), 60, what="the build to finish")
    assert build.state == "passed"
    lint = latest(build, "lint")
    assert (lint.state, lint.exit_code, lint.soft_failed) == ("failed", 42, True)
    body = api.get(builds_url(pipeline, f"/{build.number}/jobs/{lint.pk}")).json()
    assert (body["soft_failed"], body["soft_fail_policy"]) == (True, {"exit_status": [42]})
    assert (latest(build, "deploy").state, stdout_of(latest(build, "deploy"))) == ("passed", "deployed\n")


def test_a_lost_agents_job_is_retried_once_on_another_agent(e2e_settings, api, pipeline, agents, reaper, tmp_path):
    e2e_settings.AGENT_HEARTBEAT_TIMEOUT_SECONDS = 6  # above the agent's 5 s heartbeat interval
    doomed = agents.start("doomed")
    # The first run hangs on the agent that will be killed; the second passes.
    marker = tmp_path / "lost"
    ir = {"version": "0", "steps": [
        step("work", f'if [ -e "{marker}" ]; then echo again; else touch "{marker}"; echo pid=$$; exec sleep 600; fi'),
        step("after", "echo after", depends_on=["work"]),
    ]}
    build = create_build(api, pipeline, ir)
    first = latest(build, "work")
    pid = pid_from_log(first)
    doomed.send(signal.SIGKILL)
    doomed.wait(timeout=5)
    agents.start("healthy")
    try:
        wait_for(lambda: job_in(first, "failed"), 20, what="the reaper to fail the lost agent's job")
        assert (first.error_code, first.retried) == ("agent_heartbeat_lost", True)
        wait_for(lambda: finished(build), 60, what="the build to finish on the other agent")
        assert build.state == "passed"
        second = latest(build, "work")
        assert (second.attempt, second.state, second.agent.name) == (2, "passed", "healthy")
        assert stdout_of(second) == "again\n"
        assert latest(build, "after").state == "passed"
    finally:
        kill_group(pid)  # the killed agent's command has its own process group
