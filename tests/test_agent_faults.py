"""End to end: what goes wrong on an agent's host fails one job, never the agent or the fleet.

Real `manage.py runagent` processes against the live server (tests/e2e.py): a job the
host can't start, an agent killed outright with its commands and what it leaves
behind, heartbeats while the code is still downloading, output the database can't
store as it is.
"""

from __future__ import annotations

import http.server
import io
import signal
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builds import agent_api
from builds.models import Agent, Job
from tests.dsl import hm
from tests.e2e import (
    create_build,
    finished,
    job_in,
    job_log,
    jobs_by_key,
    kill_group,
    pid_from_log,
    process_exists,
    stderr_of,
    stdout_of,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("e2e_server")]


# ------------------------------------------------------------------ a job the host can't start


def test_an_env_value_too_large_to_exec_fails_its_job_and_the_agent_runs_the_next(e2e_settings, api, pipeline,
                                                                                   agents):
    big = Job.objects.get(build=create_build(api, pipeline, hm.pipeline([hm.sh("echo never", key="big")])))
    # Linux refuses one environment string over 128 KiB (E2BIG). Written to the job itself, past
    # whatever limits the API puts on a build's env: what reaches an agent is what is tested here.
    Job.objects.filter(pk=big.pk).update(env={**big.env, "HUGE": "x" * (200 * 1024)})
    after = Job.objects.get(build=create_build(api, pipeline, hm.pipeline([hm.sh("echo next", key="next")])))
    agent = agents.start("a1")

    wait_for(lambda: job_in(big, "failed"), 20, what="the oversized job to fail")
    assert (big.error_code, big.exit_code) == ("job_start_failed", None)
    assert "Argument list too long" in big.error_message
    assert "harmont-agent: the job could not run: could not start the command: [Errno 7] Argument list too long" \
        in job_log(big)
    assert wait_for(lambda: finished(big.build), 5).state == "failed"
    assert wait_for(lambda: job_in(after, "passed"), 20, what="the next job").agent.name == "a1"
    assert stdout_of(after) == "next\n"
    assert agent.process.poll() is None


def test_a_missing_shell_fails_the_job_with_job_start_failed(e2e_settings, api, pipeline, agents):
    job = Job.objects.get(build=create_build(api, pipeline, hm.pipeline([hm.sh("echo never", key="t")])))
    # No bash on the job's PATH (the agent resolves `bash` through it).
    Job.objects.filter(pk=job.pk).update(env={**job.env, "PATH": "/nonexistent"})
    agent = agents.start("a1")

    wait_for(lambda: job_in(job, "failed"), 20, what="the job to fail")
    assert job.error_code == "job_start_failed"
    assert "could not start the command: [Errno 2] No such file or directory: 'bash'" in job_log(job)
    assert agent.process.poll() is None


# ------------------------------------------------------------------ an agent killed outright


def test_the_commands_of_a_sigkilled_agent_die_with_it(e2e_settings, api, pipeline, agents):
    # `sleep 75` is the shell's child, not the shell itself: the whole group must go.
    command = "echo pid=$$; sleep 75 & echo sleeper=$!; wait"
    agent = agents.start("a1")
    job = Job.objects.get(build=create_build(api, pipeline, hm.pipeline([hm.sh(command, key="sleep")])))
    shell = pid_from_log(job)
    sleeper = int(wait_for(lambda: [line for line in stdout_of(job).splitlines() if line.startswith("sleeper=")],
                           10, what="the sleeper's pid")[0].split("=")[1])
    assert process_exists(shell) and process_exists(sleeper)
    try:
        agent.send(signal.SIGKILL)
        agent.wait(timeout=5)
        killed_at = time.monotonic()
        wait_for(lambda: not process_exists(shell) and not process_exists(sleeper), 5,
                 what="the commands to die with their agent")
        assert time.monotonic() - killed_at < 5
    finally:
        kill_group(shell)


def test_an_agent_starting_ends_what_a_crashed_run_left_in_its_workdir(e2e_settings, agents, tmp_path):
    workdir = tmp_path / "agents" / "a1"
    stale = workdir / str(uuid.uuid4())
    (stale / "src").mkdir(parents=True)
    (workdir / "artifacts" / str(uuid.uuid4())).mkdir(parents=True)
    (workdir / f"{uuid.uuid4()}.pipeline.json").write_text("{}")
    (workdir / "keep-me").write_text("not the agent's")
    # A command of the crashed run, still running in its workspace, with a child of its own.
    left = subprocess.Popen(["bash", "-c", "sleep 75 & wait"], cwd=stale / "src", start_new_session=True)
    try:
        agents.start("a1", workdir=workdir)
        wait_for(lambda: left.poll() is not None, 10, what="the leftover command to be ended")
        wait_for(lambda: sorted(path.name for path in workdir.iterdir()) == [".agent.lock", "artifacts", "keep-me"],
                 10, what="the stale workspaces to be removed")
        assert list((workdir / "artifacts").iterdir()) == []
        wait_for(lambda: Agent.objects.filter(name="a1").exists(), 10, what="the agent to register")
    finally:
        kill_group(left.pid)
        left.wait(timeout=5)


def test_a_second_agent_on_the_same_workdir_is_refused(e2e_settings, agents, tmp_path):
    workdir = tmp_path / "agents" / "shared"
    first = agents.start("first", workdir=workdir)
    wait_for(lambda: Agent.objects.filter(name="first").exists(), 10, what="the first agent to register")

    second = agents.start("second", workdir=workdir)

    assert second.wait(timeout=20) == 2
    assert "another agent is using the work directory" in second.stderr_path.read_text()
    assert first.process.poll() is None


# ------------------------------------------------------------------ heartbeats while the code downloads


@pytest.fixture
def slow_tarball(tmp_path: Path) -> Iterator[str]:
    """A local HTTP server that answers its one source tarball after 4 s: its URL."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = b"slowly\n"
        info = tarfile.TarInfo("NOTE.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    archive = buffer.getvalue()

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(4)
            self.send_response(200)
            self.send_header("Content-Length", str(len(archive)))
            self.end_headers()
            self.wfile.write(archive)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/src.tar.gz"
    finally:
        server.shutdown()


def test_a_download_longer_than_the_heartbeat_timeout_keeps_its_job(e2e_settings, api, pipeline, agents, reaper,
                                                                    slow_tarball):
    # 4 s of download against 2 s of allowed silence: only heartbeats sent meanwhile keep the job.
    e2e_settings.AGENT_HEARTBEAT_TIMEOUT_SECONDS = 2
    agents.start("a1", options=("--heartbeat-interval", "0.3"))
    build = create_build(api, pipeline, hm.pipeline([hm.sh("cat NOTE.txt", key="read")]), source_url=slow_tarball)

    wait_for(lambda: finished(build), 30, what="the build to finish")
    job = jobs_by_key(build)["read"]
    assert (build.state, job.state, job.error_code) == ("passed", "passed", None)
    assert stdout_of(job) == "slowly\n"


# ------------------------------------------------------------------ output the database can't hold as it is


def test_output_with_nul_bytes_is_stored_with_replacement_characters(e2e_settings, api, pipeline, agents):
    agents.start("a1")
    command = r"printf 'a\0b\n'; cat /proc/self/environ >&2"
    build = create_build(api, pipeline, hm.pipeline([hm.sh(command, key="nul")]))

    wait_for(lambda: finished(build), 20, what="the build to finish")
    job = jobs_by_key(build)["nul"]
    assert (build.state, job.state) == ("passed", "passed")
    assert stdout_of(job) == "a\ufffdb\n"
    environ = stderr_of(job)
    assert f"\ufffdHARMONT_JOB_ID={job.pk}\ufffd" in "\ufffd" + environ


def test_a_slow_log_shipment_does_not_hold_up_the_heartbeats(e2e_settings, api, pipeline, agents, reaper,
                                                              monkeypatch):
    e2e_settings.AGENT_HEARTBEAT_TIMEOUT_SECONDS = 2
    real_post = agent_api.LogsView.post
    slowed: list[float] = []

    def slow_post(self: Any, request: Any, job_id: str) -> Any:
        # The live server runs in this process: its first log request takes 4 s (a database
        # under load, a proxy buffering), the job's output arriving only afterwards.
        if not slowed:
            slowed.append(time.monotonic())
            time.sleep(4)
        return real_post(self, request, job_id)

    monkeypatch.setattr(agent_api.LogsView, "post", slow_post)
    agents.start("a1", options=("--heartbeat-interval", "0.3"))
    build = create_build(api, pipeline, hm.pipeline([hm.sh("echo first; sleep 6; echo last", key="slow")]))

    wait_for(lambda: finished(build), 30, what="the build to finish")
    job = jobs_by_key(build)["slow"]
    assert slowed, "the log route was never called"
    assert (build.state, job.state, job.error_code) == ("passed", "passed", None)
    assert stdout_of(job) == "first\nlast\n"
