"""End to end: real agents with `--executor podman` run real builds in containers of an image made here.

The image, the agents and why the server is the production entry point: tests/containers.py.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from builds.models import Artifact, Job, StreamKind
from tests.containers import MARKER, MARKER_TEXT, ContainerAgents, containers_of, in_image, meta_of, podman
from tests.dsl import hm
from tests.e2e import create_build, finished, job_in, job_log, jobs_by_key, stdout_of, wait_for
from tests.helpers import builds_url

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def agents(container_agents: ContainerAgents) -> ContainerAgents:
    return container_agents

# ------------------------------------------------------------------ the step's image


def test_a_step_runs_in_its_image_with_its_workspace_artifacts_and_exit_status(api, pipeline, agents):
    agents.start_podman("p1")
    ir = in_image(hm.pipeline([
        hm.sh(f'cat {MARKER}; pwd; echo "$HARMONT_WORKSPACE $HARMONT_ARTIFACTS"; '
              'echo report > "$HARMONT_ARTIFACTS/report.txt"; ls /harmont/run | wc -l', key="inside"),
        hm.sh("echo failing >&2; exit 7", key="fails"),
    ]), agents.image)
    build = create_build(api, pipeline, ir)

    wait_for(lambda: finished(build), 60, what="the build to finish")
    jobs = jobs_by_key(build)
    assert (jobs["inside"].state, jobs["inside"].exit_code) == ("passed", 0)
    # The marker, the fixed workspace, where artifacts go, and the environment file already gone.
    assert stdout_of(jobs["inside"]) == f"{MARKER_TEXT}\n/workspace\n/workspace /harmont/artifacts\n0\n"
    assert f"running inside in a podman container of {agents.image}" in meta_of(jobs["inside"])
    assert Artifact.objects.get(job=jobs["inside"]).path == "report.txt"
    assert (jobs["fails"].state, jobs["fails"].exit_code) == ("failed", 7)
    assert "failing\n" in job_log(jobs["fails"], kinds=(StreamKind.STDERR,))
    assert containers_of(f"harmont.agent={agents.started[0].workdir.resolve()}") == []


def test_a_missing_image_fails_the_job_image_unavailable_with_the_engines_message(api, pipeline, agents):
    agents.start_podman("p1")
    build = create_build(api, pipeline, in_image(hm.pipeline([hm.sh("echo never", key="a")]),
                                                 "localhost/harmont-missing:never"))

    job = wait_for(lambda: job_in(Job.objects.get(build=build), "failed"), 60, what="the job to fail")

    assert (job.error_code, job.exit_code) == ("image_unavailable", None)
    assert "localhost/harmont-missing" in job.error_message
    assert "the job's container could not be started" in meta_of(job)
    assert "localhost/harmont-missing" in meta_of(job)
    assert stdout_of(job) == ""
    assert containers_of(f"harmont.job={job.pk}") == []


# ------------------------------------------------------------------ builds_in: the parent's filesystem


def parent_and_child(image: str) -> dict[str, Any]:
    parent = hm.sh("mkdir -p /opt/tool && echo installed > /opt/tool/version && echo ws > ws.txt", key="install")
    ir = in_image(hm.pipeline([parent.sh('cat /opt/tool/version ws.txt; echo "parent_only=${PARENT_ONLY:-unset}"',
                                         key="use")]), image)
    # The parent's own environment must not travel in its snapshot (it would, through `--env-file`).
    ir["graph"]["nodes"][0]["env"]["PARENT_ONLY"] = "parent-value"
    return ir


def test_a_builds_in_child_on_the_same_agent_starts_from_its_parents_filesystem(api, pipeline, agents):
    agents.start_podman("p1")
    build = create_build(api, pipeline, parent_and_child(agents.image))

    wait_for(lambda: finished(build), 60, what="the build to finish")
    jobs = jobs_by_key(build)
    assert build.state == "passed", {key: job_log(job) for key, job in jobs.items()}
    assert stdout_of(jobs["use"]) == "installed\nws\nparent_only=unset\n"
    assert "starting from the builds_in parent's filesystem (kept on this agent)" in meta_of(jobs["use"])
    assert "uploaded the filesystem snapshot" in meta_of(jobs["install"])
    assert jobs["install"].snapshot_image.name == f"snapshots/{jobs['install'].pk}.tar"


def test_a_builds_in_child_on_another_agent_loads_its_parents_snapshot_from_the_server(api, pipeline, agents):
    first = agents.start_podman("p1", options=("--once",))  # runs the parent, then exits (its snapshots go)
    build = create_build(api, pipeline, parent_and_child(agents.image))
    assert first.wait(timeout=60) == 0
    agents.start_podman("p2")

    wait_for(lambda: finished(build), 60, what="the build to finish")
    jobs = jobs_by_key(build)
    assert build.state == "passed", {key: job_log(job) for key, job in jobs.items()}
    assert (jobs["install"].agent.name, jobs["use"].agent.name) == ("p1", "p2")
    assert stdout_of(jobs["use"]) == "installed\nws\nparent_only=unset\n"
    assert "loaded the builds_in parent's filesystem snapshot" in meta_of(jobs["use"])


# ------------------------------------------------------------------ stopping


def test_cancel_stops_the_container_and_removes_it(api, pipeline, agents):
    agents.start_podman("p1")
    build = create_build(api, pipeline, in_image(hm.pipeline([hm.sh("echo started; sleep 600", key="sleep")]),
                                                 agents.image))
    job = Job.objects.get(build=build)
    wait_for(lambda: stdout_of(job) == "started\n", 30, what="the command to start")
    assert len(containers_of(f"harmont.job={job.pk}")) == 1

    response = api.put(f"{builds_url(pipeline)}/{build.number}/cancel")
    assert response.status_code == 200, response.content[:500]

    # The next heartbeat (5 s) tells the agent; `stop --time 2` (the grace here) then SIGKILLs sleep.
    wait_for(lambda: job_in(job, "canceled"), 15, what="the job to end canceled")
    assert "harmont-agent: canceled; stopping the command" in meta_of(job)
    assert containers_of(f"harmont.job={job.pk}") == []


def test_an_agent_killed_mid_job_leaves_no_container_once_it_is_back(api, pipeline, agents):
    agent = agents.start_podman("p1")
    workdir = agent.workdir.resolve()
    build = create_build(api, pipeline, in_image(hm.pipeline([hm.sh("echo started; sleep 600", key="sleep")]),
                                                 agents.image))
    job = Job.objects.get(build=build)
    wait_for(lambda: stdout_of(job) == "started\n", 30, what="the command to start")
    # One more, as if an earlier crash had left it and its guard had died too: only the restart finds it.
    stray = podman("create", "--label", f"harmont.agent={workdir}", "--label", "harmont.job=stray",
                   agents.image, "sleep", "600").stdout.strip()

    agent.send(signal.SIGKILL)
    agent.wait(timeout=10)
    # The guard removes the job's container as soon as the agent is gone.
    wait_for(lambda: containers_of(f"harmont.job={job.pk}") == [], 30, what="the guard to remove the container")
    assert containers_of(f"harmont.agent={workdir}") == [stray[:12]]
    agents.start_podman("p1-again", workdir=agent.workdir)

    wait_for(lambda: containers_of(f"harmont.agent={workdir}") == [], 30, what="the restart to clean up")


# ------------------------------------------------------------------ what the container sees


def test_the_container_sees_the_jobs_env_through_no_command_line_and_none_of_the_agents(api, pipeline, agents):
    agents.start_podman("p1", env={"AGENT_ONLY_SECRET": "agent-side-value"})
    value = "job-value-7d1f0c2e"
    script = ('echo "job=$JOB_VALUE agent=${AGENT_ONLY_SECRET:-unset}"; env | grep -c agent-side-value; '
              'echo ready; sleep 600')
    build = create_build(api, pipeline, in_image(hm.pipeline([hm.sh(script, key="env")]), agents.image),
                         env={"JOB_VALUE": value})
    job = Job.objects.get(build=build)

    wait_for(lambda: "ready" in stdout_of(job), 30, what="the command to start")
    # Nor in the container's configuration, which `commit` would copy into a snapshot.
    container, = containers_of(f"harmont.job={job.pk}")
    configured = podman("container", "inspect", "--format", "{{.Config.Env}}", container).stdout
    cmdlines = []
    for proc in Path("/proc").iterdir():
        try:
            cmdlines.append((proc / "cmdline").read_bytes())
        except OSError:
            continue
    api.put(f"{builds_url(pipeline)}/{build.number}/cancel")
    wait_for(lambda: finished(build), 20, what="the build to end")

    assert stdout_of(job) == f"job={value} agent=unset\n0\nready\n"
    assert not [line for line in cmdlines if value.encode() in line]
    assert value not in configured and "HARMONT_BUILD_ID" not in configured


def test_network_none_gives_the_container_no_network(api, pipeline, agents):
    agents.start_podman("p1", options=("--network", "none"))
    build = create_build(api, pipeline, in_image(hm.pipeline([
        hm.sh("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '", key="net")]), agents.image))

    wait_for(lambda: finished(build), 60, what="the build to finish")
    job = Job.objects.get(build=build)
    assert (job.state, stdout_of(job)) == ("passed", "lo\n")
