"""End to end: agent queues and concurrency groups with a live server and real `manage.py runagent` processes."""

from __future__ import annotations

import pytest

from builds.models import Agent
from tests.e2e import create_build, finished, jobs_by_key, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("e2e_server")]


def step(key: str, cmd: str, **fields: object) -> dict[str, object]:
    return {"type": "command", "key": key, "cmd": cmd, **fields}


def test_each_job_runs_on_an_agent_whose_tags_match(e2e_settings, api, pipeline, agents):
    agents.start("arm", options=("--tags", "queue=arm64,os=linux"))
    # Tags from the environment; without a queue tag this agent is in queue `default`.
    agents.start("plain", env={"HARMONT_AGENT_TAGS": "os=linux"})
    wait_for(lambda: Agent.objects.count() == 2 or None, 20, what="both agents to register")
    assert dict(Agent.objects.values_list("name", "tags")) == {"arm": {"queue": "arm64", "os": "linux"},
                                                                "plain": {"os": "linux"}}
    ir = {"version": "0", "steps": [
        *[step(f"arm-{i}", "uname -m; sleep 0.2", agents={"queue": "arm64"}) for i in range(3)],
        *[step(f"any-{i}", "sleep 0.2", agents=["os=lin*"]) for i in range(3)],
    ]}
    build = create_build(api, pipeline, ir)

    wait_for(lambda: finished(build), 60, what="the build to finish")
    assert build.state == "passed"
    ran_on = {key: job.agent.name for key, job in jobs_by_key(build).items()}
    assert ran_on == {**{f"arm-{i}": "arm" for i in range(3)}, **{f"any-{i}": "plain" for i in range(3)}}


def test_a_group_of_concurrency_one_never_runs_two_at_once(e2e_settings, api, pipeline, agents):
    agents.start("a1")
    agents.start("a2")
    ir = {"version": "0", "steps": [
        step(f"deploy-{i}", "sleep 0.5", concurrency_group="deploy", concurrency=1) for i in range(3)]}
    build = create_build(api, pipeline, ir)

    wait_for(lambda: finished(build), 60, what="the build to finish")
    assert build.state == "passed"
    runs = sorted((job.started_at, job.finished_at, job.agent.name) for job in jobs_by_key(build).values())
    assert all(started < ended for started, ended, _ in runs)
    # Each job started only after the one before it had ended.
    assert all(later[0] >= earlier[1] for earlier, later in zip(runs, runs[1:])), runs
