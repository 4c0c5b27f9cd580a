"""A job's command can't read its agent's credentials: the agent token, the server's settings.

Real `manage.py runagent` processes against a live server (tests/e2e.py), running
commands that look where a process on the agent's host would look: the agent's
command line and environment under /proc/$PPID (the agent is the command's
parent), and the command's own environment, and an agent's memory. The `--run-as`
tests and the memory test run commands (and an agent) as a throwaway user and need
the suite to run as root; they are skipped otherwise.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from builds.agent import runner
from builds.agent.isolation import job_environment
from builds.agent.logs import LogShipper
from builds.agent.runner import Agent, JobStartFailed
from builds.agent.spec import JobSpec
from builds.models import Agent as AgentRow
from builds.models import Artifact, Job
from harmont import run
from tests.dsl import hm
from tests.e2e import (
    PROJECT_ROOT,
    create_build,
    finished,
    job_log,
    jobs_by_key,
    pid_from_log,
    process_exists,
    stderr_of,
    stdout_of,
    wait_for,
)

T = TypeVar("T")


def e2e(test: T) -> T:
    """Marks of a test with a live server and agent processes (the option checks need neither)."""
    for mark in (pytest.mark.slow, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("e2e_server")):
        test = mark(test)
    return test


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="--run-as needs the suite to run as root")

# What a command on the agent's host reads of its agent (its parent) and of itself.
SNOOP = ("tr '\\0' ' ' < /proc/$PPID/cmdline; echo; echo '--- environ'; tr '\\0' '\\n' < /proc/$PPID/environ; "
         "echo '--- env'; env")
# The server's settings, as a local agent would inherit them from the server's environment.
SERVER_SECRETS = {
    "HARMONT_SECRET_KEY": "canary-secret-key-5b1e0c",
    "HARMONT_SECRETS_KEY": "canary-fernet-key-77d2a9",
    "HARMONT_LOG_TOKEN_SECRET": "canary-log-token-secret-0e4f",
    "DATABASE_URL": "postgres://harmont:canary-db-password-91c3@db/harmont",
}
TOKEN_WARNING = "warning: --token puts the agent token on the command line"


def write_token_file(path: Path, token: str, mode: int = 0o600) -> Path:
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


def assert_no_credentials(text: str, token: str) -> None:
    assert token not in text
    assert token.removeprefix("hma_") not in text
    for name, value in SERVER_SECRETS.items():
        assert value not in text
        assert f"{name}=" not in text


def run_snoop(api, pipeline) -> Job:
    build = create_build(api, pipeline, hm.pipeline([hm.sh(SNOOP, key="snoop")]))
    wait_for(lambda: finished(build), 30, what="the build to finish")
    job = Job.objects.get(build=build)
    assert (build.state, job.state) == ("passed", "passed"), job_log(job)
    return job


def proc_text(pid: int, name: str) -> str:
    return Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b"\n").decode(errors="replace")


def run_agent_command(*args: str, env: dict[str, str] | None = None, timeout: float = 30
                      ) -> subprocess.CompletedProcess[str]:
    """`manage.py runagent ARGS` to its end, with the test's environment minus the token variable plus `env`."""
    base = {name: value for name, value in os.environ.items() if name != "HARMONT_AGENT_TOKEN"}
    return subprocess.run([sys.executable, "manage.py", "runagent", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, env={**base, **(env or {})})


# ------------------------------------------------------------------ the token and the server's settings


@e2e
@pytest.mark.parametrize("given", ["environment", "file", "option"])
def test_a_job_reads_no_token_nor_server_secret_from_its_agent(given, e2e_settings, api, pipeline, agents,
                                                                agent_token, tmp_path):
    options = {
        "environment": (),
        "file": ("--token-file", str(write_token_file(tmp_path / "agent-token", agent_token.raw))),
        "option": ("--token", agent_token.raw),
    }[given]
    agents.start("a1", options=options, env=SERVER_SECRETS)

    job = run_snoop(api, pipeline)
    output = stdout_of(job)
    # The command did read the agent's command line and its own environment, and the agent's
    # environment too where it may (a root command; see the memory test for the others).
    assert "runagent" in output and "--- environ\n" in output and "--- env\n" in output, output
    assert output.count("\nPATH=") == (2 if os.geteuid() == 0 else 1), output
    assert_no_credentials(job_log(job), agent_token.raw)


@e2e
def test_the_token_variable_is_gone_from_the_running_agents_environment(e2e_settings, agents, agent_token):
    agent = agents.start("a1", env=SERVER_SECRETS)

    wait_for(lambda: AgentRow.objects.filter(name="a1").exists(), 20, what="the agent to register")
    if os.geteuid() != 0:
        # Only root may read a running agent's environment (see the memory test below).
        with pytest.raises(PermissionError):
            proc_text(agent.pid, "environ")
        return
    environ, cmdline = proc_text(agent.pid, "environ"), proc_text(agent.pid, "cmdline")
    assert "runagent" in cmdline and "PATH=" in environ
    assert "HARMONT_AGENT_TOKEN=" not in environ
    assert_no_credentials(environ + cmdline, agent_token.raw)


@e2e
def test_the_token_option_warns_and_still_works(e2e_settings, agents, agent_token):
    agent = agents.start("a1", options=("--token", agent_token.raw, "--once"))

    assert agent.wait(timeout=30) == 0, agent.output()
    assert TOKEN_WARNING in agent.stderr_path.read_text()
    assert AgentRow.objects.filter(name="a1").exists()


@e2e
def test_a_token_file_readable_by_others_warns(e2e_settings, agents, agent_token, tmp_path):
    path = write_token_file(tmp_path / "agent-token", agent_token.raw, mode=0o644)
    agent = agents.start("a1", options=("--token-file", str(path), "--once"))

    assert agent.wait(timeout=30) == 0, agent.output()
    stderr = agent.stderr_path.read_text()
    assert f"--token-file {path} is readable by other users (mode 644)" in stderr
    assert TOKEN_WARNING not in stderr


def test_a_missing_token_file_is_a_clear_error(tmp_path):
    done = run_agent_command("--server", "http://127.0.0.1:9", "--token-file", str(tmp_path / "nothing-here"))

    assert done.returncode == 2
    assert f"--token-file {tmp_path / 'nothing-here'}: No such file or directory" in done.stderr


def test_an_empty_token_file_is_a_clear_error(tmp_path):
    path = write_token_file(tmp_path / "agent-token", "")
    done = run_agent_command("--server", "http://127.0.0.1:9", "--token-file", str(path))

    assert done.returncode == 2
    assert f"--token-file {path} is empty" in done.stderr


def test_no_token_at_all_is_a_clear_error():
    done = run_agent_command("--server", "http://127.0.0.1:9")

    assert done.returncode == 2
    assert "the agent token is missing: pass --token-file PATH or set HARMONT_AGENT_TOKEN" in done.stderr


def test_a_personal_api_token_in_the_variable_is_refused():
    done = run_agent_command("--server", "http://127.0.0.1:9", env={"HARMONT_AGENT_TOKEN": "hm_personal"})

    assert done.returncode == 2
    assert "must be an agent token (hma_...)" in done.stderr


def test_a_jobs_environment_is_its_own_plus_the_agents_basics():
    agent_env = {"PATH": "/usr/bin", "HOME": "/home/agent", "LANG": "de_DE.UTF-8", "LC_TIME": "C", "USER": "agent",
                 "TMPDIR": "/tmp/agent", "AWS_SECRET_ACCESS_KEY": "aws-canary", "SSH_AUTH_SOCK": "/run/ssh",
                 "HARMONT_AGENT_TOKEN": "hma_canary", **SERVER_SECRETS}
    job_env = {"PATH": "/opt/job/bin", "CI": "true", "HARMONT_BUILD_ID": "b-1", "HARMONT_BRANCH": "main"}

    assert job_environment(job_env, agent_env=agent_env, run_as=None, default_home="/ws") == {
        "PATH": "/opt/job/bin", "HOME": "/home/agent", "LANG": "de_DE.UTF-8", "LC_TIME": "C", "USER": "agent",
        "TMPDIR": "/tmp/agent", "CI": "true", "HARMONT_BUILD_ID": "b-1", "HARMONT_BRANCH": "main"}
    assert job_environment({}, agent_env={}, run_as=None, default_home="/ws") == {
        "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/ws"}


# ------------------------------------------------------------------ make run's local agent


def test_make_runs_agent_gets_no_secret_on_its_command_line_or_in_its_environment(tmp_path):
    server_env = {**os.environ, **SERVER_SECRETS, "PORT": "8791", "HOME": "/home/demo", "LANG": "C.UTF-8"}
    processes = run.server_processes(server_env, "hma_local-demo-token")

    agent_command, agent_env = next((command, env) for command, env in processes if "runagent" in command)
    assert "hma_local-demo-token" not in " ".join(agent_command)
    assert agent_command[agent_command.index("--server") + 1] == "http://127.0.0.1:8791"
    assert agent_env == {"PATH": os.environ["PATH"], "HOME": "/home/demo", "LANG": "C.UTF-8",
                         "HARMONT_AGENT_TOKEN": "hma_local-demo-token"}
    # The server's own processes keep their settings.
    gunicorn_env = next(env for command, env in processes if "gunicorn" in command)
    assert gunicorn_env["HARMONT_SECRET_KEY"] == SERVER_SECRETS["HARMONT_SECRET_KEY"]


@e2e
def test_make_runs_agent_leaks_nothing_to_a_job(e2e_server, e2e_settings, api, pipeline, agents, agent_token,
                                               tmp_path):
    workdir = tmp_path / "agents" / "local-agent"
    command, env = run.agent_process(server=e2e_server, token=agent_token.raw, workdir=workdir,
                                     environ={**os.environ, **SERVER_SECRETS})
    agents.start_command("local-agent", command, env=env, workdir=workdir)

    job = run_snoop(api, pipeline)
    assert "runagent" in stdout_of(job)
    assert_no_credentials(job_log(job), agent_token.raw)
    assert os.environ["HARMONT_SECRET_KEY"] not in job_log(job)


# ------------------------------------------------------------------ an agent's memory

# Looks through the writable memory of process `argv[1]` (the agent) for agent tokens.
MEMORY_SCAN = r"""
import re, sys
pid = int(sys.argv[1])
try:
    maps = open(f"/proc/{pid}/maps").read().splitlines()
    memory = open(f"/proc/{pid}/mem", "rb", 0)
except OSError as exc:
    raise SystemExit(f"scan: {exc.strerror}")
found = set()
for line in maps:
    span, perms = line.split()[:2]
    if perms.startswith("rw"):
        start, end = (int(address, 16) for address in span.split("-"))
        try:
            memory.seek(start)
            found.update(re.findall(rb"hma_[A-Za-z0-9_-]{20,}", memory.read(end - start)))
        except OSError:
            pass
print("found:", b" ".join(sorted(found)).decode())
"""
# The host's own Python, which any user may run (the virtualenv's may live in root's home);
# the agent program needs nothing but the standard library.
SYSTEM_PYTHON = Path("/usr/bin/python3")
# What `manage.py runagent` loads (the agent needs no Django): copied where another user can read
# it, since the checkout may sit in a directory only root may enter (a fresh clone in mktemp -d).
AGENT_PROGRAM = ("manage.py", "builds/__init__.py", "builds/agent", "harmont/__init__.py", "harmont/redaction.py")


def agent_program_for_everyone(target: Path) -> Path:
    for relative in AGENT_PROGRAM:
        source, copy = PROJECT_ROOT / relative, target / relative
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, copy)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


@needs_root
@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="no /usr/bin/python3 to run an agent as another user")
@e2e
def test_a_command_of_the_agents_own_user_cant_read_its_memory(e2e_server, e2e_settings, api, pipeline, agents,
                                                              agent_token, job_user, open_workdir):
    # An agent run by an ordinary user, without --run-as: its commands run as that user too.
    program = agent_program_for_everyone(open_workdir / "program")
    os.chown(open_workdir, job_user.pw_uid, job_user.pw_gid)
    workdir = open_workdir / "a1"
    command = [str(SYSTEM_PYTHON), "manage.py", "runagent", "--server", e2e_server, "--name", "a1",
               "--workdir", str(workdir), "--poll-interval", "0.2"]
    agents.start_command("a1", command, workdir=workdir, user=job_user.pw_name, cwd=program, env={
        "PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONUNBUFFERED": "1",
        "HARMONT_AGENT_TOKEN": agent_token.raw})
    build = create_build(api, pipeline, hm.pipeline([hm.sh(
        f"id -u; {SYSTEM_PYTHON} -c '{MEMORY_SCAN}' $PPID; tr '\\0' '\\n' < /proc/$PPID/environ", key="scan")]))

    wait_for(lambda: finished(build), 30, what="the build to finish")
    job = Job.objects.get(build=build)
    assert stdout_of(job).splitlines()[0] == str(job_user.pw_uid), job_log(job)
    assert "scan: Permission denied" in stderr_of(job), job_log(job)
    assert "/environ: Permission denied" in stderr_of(job), job_log(job)
    assert_no_credentials(job_log(job), agent_token.raw)


# ------------------------------------------------------------------ --run-as


def test_run_as_without_root_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)

    with pytest.raises(SystemExit) as exited:
        runner.main(["--server", "http://127.0.0.1:9", "--run-as", "nobody"])

    assert exited.value.code == 2
    assert "--run-as nobody: the agent must run as root to start commands as another user" in capsys.readouterr().err


def test_run_as_an_unknown_user_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 0)

    with pytest.raises(SystemExit) as exited:
        runner.main(["--server", "http://127.0.0.1:9", "--run-as", "no-such-user-7f3a"])

    assert exited.value.code == 2
    assert "--run-as no-such-user-7f3a: no such user" in capsys.readouterr().err


class QuietTransport:
    """Answers every report as a running job's directive; the command here never gets that far."""

    def json(self, method: str, path: str, *, token: str, body: Any = None, ok: tuple[int, ...] = (200,)) -> Any:
        return {"state": "running", "cancel": False, "timeout": False}


def test_a_program_that_cant_be_started_fails_the_job_not_the_agent(tmp_path):
    # What --run-as's user meets when it may not run the agent's Python (the renderer).
    program = tmp_path / "not-executable"
    program.write_text("#!/bin/sh\n")
    agent = Agent(server="http://127.0.0.1:9", token="hma_x", workdir=str(tmp_path / "agent"))
    job = JobSpec.from_claim({"job": {"id": "job-1", "command": "true", "env": {}, "timeout_seconds": 60,
                                      "step_key": "a"}, "job_token": "hmj_x"})
    shipper = LogShipper(QuietTransport(), job)  # type: ignore[arg-type]

    with pytest.raises(JobStartFailed) as failed:
        agent._execute(job, tmp_path, shipper, argv=[str(program)])

    # run_job fails the job with job_start_failed and this reason (tests/test_agent_faults.py).
    assert str(failed.value) == f"could not start the command: [Errno 13] Permission denied: '{program}'"
    assert shipper.pending == []


@pytest.fixture
def job_user() -> Iterator[pwd.struct_passwd]:
    """A throwaway user of its own for the jobs, removed afterwards."""
    name = f"hmjob{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/bin/false",
                    name], check=True, capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
        # The signal is sent, not yet done: userdel refuses a user with a process left (status 8)
        # until the killed ones are gone and reaped.
        deadline = time.monotonic() + 10
        while (subprocess.run(["pgrep", "-u", name], capture_output=True).returncode == 0
               and time.monotonic() < deadline):
            time.sleep(0.05)
        subprocess.run(["userdel", name], check=True, capture_output=True)


@pytest.fixture
def open_workdir() -> Iterator[Path]:
    """A work directory every user can get to (pytest's own temporary directories are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="harmont-run-as-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@needs_root
@e2e
def test_run_as_runs_commands_as_that_user_who_cant_read_the_agent(e2e_settings, api, pipeline, agents, agent_token,
                                                                   job_user, open_workdir, tmp_path):
    token_file = write_token_file(tmp_path / "agent-token", agent_token.raw)
    agents.start("a1", options=("--token-file", str(token_file), "--run-as", job_user.pw_name),
                 workdir=open_workdir / "a1")
    write = hm.sh(
        "id -u; id -G; echo \"home=$HOME user=$USER\"\n"
        "cat /proc/$PPID/environ && echo READ-ENVIRON\n"
        f"cat {token_file} && echo READ-TOKEN-FILE\n"
        "echo from-parent > out.txt && mkdir -p sub && echo nested > sub/n.txt\n"
        "echo report > \"$HARMONT_ARTIFACTS/report.txt\"", key="write")
    ir = hm.pipeline([write, write.sh("cat out.txt sub/n.txt && echo more >> out.txt && id -un", key="read")])
    build = create_build(api, pipeline, ir)

    wait_for(lambda: finished(build), 30, what="the build to finish")
    jobs = jobs_by_key(build)
    assert build.state == "passed", {key: job_log(job) for key, job in jobs.items()}
    lines = stdout_of(jobs["write"]).splitlines()
    assert lines[0] == str(job_user.pw_uid)
    # Its own groups, none of the agent's (root's).
    assert set(map(int, lines[1].split())) == set(os.getgrouplist(job_user.pw_name, job_user.pw_gid))
    assert lines[2] == f"home=/nonexistent user={job_user.pw_name}"
    log = job_log(jobs["write"])
    assert "READ-ENVIRON" not in log and "READ-TOKEN-FILE" not in log
    assert stderr_of(jobs["write"]).count("Permission denied") == 2, stderr_of(jobs["write"])
    assert_no_credentials(log, agent_token.raw)
    # The workspace it inherited is its own too: the child read and changed its parent's files.
    assert stdout_of(jobs["read"]) == f"from-parent\nnested\n{job_user.pw_name}\n"
    assert Artifact.objects.get(job=jobs["write"]).path == "report.txt"


@needs_root
@e2e
def test_run_as_kills_what_a_command_left_running(e2e_settings, api, pipeline, agents, job_user, open_workdir):
    agents.start("a1", options=("--run-as", job_user.pw_name), workdir=open_workdir / "a1")
    # Out of the command's process group and session, so stopping the command alone would miss it.
    left = "setsid sleep 300 > /dev/null 2>&1 < /dev/null & echo pid=$!"
    build = create_build(api, pipeline, hm.pipeline([hm.sh(left, key="leave")]))

    wait_for(lambda: finished(build), 30, what="the build to finish")
    job = Job.objects.get(build=build)
    assert job.state == "passed", job_log(job)
    pid = int(stdout_of(job).strip().removeprefix("pid="))
    wait_for(lambda: not process_exists(pid), 5, what=f"the left-over process {pid} to be gone")


@needs_root
@e2e
def test_run_as_commands_even_out_of_their_group_die_with_a_sigkilled_agent(e2e_settings, api, pipeline, agents,
                                                                             job_user, open_workdir):
    agent = agents.start("a1", options=("--run-as", job_user.pw_name), workdir=open_workdir / "a1")
    # One in the command's group, one that left it (its own session): both are the user's.
    command = "setsid sleep 75 > /dev/null 2>&1 < /dev/null & echo escaped=$!; echo pid=$$; sleep 75"
    job = Job.objects.get(build=create_build(api, pipeline, hm.pipeline([hm.sh(command, key="sleep")])))
    shell = pid_from_log(job)
    escaped = int(next(line for line in stdout_of(job).splitlines() if line.startswith("escaped="))[8:])
    assert process_exists(shell) and process_exists(escaped)

    agent.send(signal.SIGKILL)
    agent.wait(timeout=5)

    wait_for(lambda: not process_exists(shell) and not process_exists(escaped), 5,
             what="the user's commands to die with their agent")


def test_run_as_root_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 0)

    with pytest.raises(SystemExit) as exited:
        runner.main(["--server", "http://127.0.0.1:9", "--run-as", "root"])

    assert exited.value.code == 2
    assert "--run-as root: commands would run as root; choose an unprivileged user" in capsys.readouterr().err


@needs_root
def test_run_as_a_user_who_cant_reach_the_workdir_is_a_clear_error(job_user, tmp_path):
    tmp_path.chmod(0o700)  # closed to everyone but root
    done = run_agent_command("--server", "http://127.0.0.1:9", "--run-as", job_user.pw_name,
                             "--workdir", str(tmp_path / "a1"), env={"HARMONT_AGENT_TOKEN": "hma_x"})

    assert done.returncode == 2
    assert f"user {job_user.pw_name} can't get to the work directory {tmp_path / 'a1'}" in done.stderr
