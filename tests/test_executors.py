"""The executors without a container engine: the command lines they give podman and docker, the job's
environment file, what reaches the engine's CLI, the options of `runagent`, the guard's containers.

A fake engine (a shell script that records its arguments and answers as the test says) stands in
where the executor must call one. tests/test_container_executor_e2e.py runs the real podman.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from builds.agent import runner
from builds.agent.executors import AgentContext, make_executor
from builds.agent.executors.container import (
    LAUNCHER,
    ContainerExecutor,
    SaveStream,
    SnapshotTooLarge,
    agent_key,
    engine_environment,
    env_file_text,
)
from builds.agent.executors.host import HostExecutor
from builds.agent.logs import META, LogShipper
from builds.agent.spec import JobSpec

JOB_ID = "0b6f6a3c-6a43-4a3e-9c0e-3f1d2e4b5a60"
GUARD = Path(runner.__file__).with_name("guard.py")


class QuietTransport:
    """Answers every report as a running job's directive."""

    def json(self, method: str, path: str, *, token: str, body: Any = None, ok: tuple[int, ...] = (200,)) -> Any:
        return {"state": "running", "cancel": False, "timeout": False}


def job(**fields: Any) -> JobSpec:
    spec = {"id": JOB_ID, "command": "make test", "env": {}, "timeout_seconds": 60, "step_key": "test",
            "image": "ubuntu:24.04", "cancel_grace_seconds": 10, **fields}
    return JobSpec.from_claim({"job": spec, "job_token": "hmj_x"})


def context(workdir: Path, lines: list[str] | None = None) -> AgentContext:
    return AgentContext(transport=QuietTransport(), workdir=workdir, abort=threading.Event(),  # type: ignore[arg-type]
                        tell_guard=(lines.append if lines is not None else lambda line: None))


def executor(tmp_path: Path, engine: str = "podman", **options: Any) -> ContainerExecutor:
    return ContainerExecutor(context(tmp_path / "agent"), engine=engine, binary=f"/usr/bin/{engine}",
                             environ={"PATH": "/usr/bin:/bin"}, **options)


# ------------------------------------------------------------------ command lines


def test_create_gives_podman_the_mounts_labels_launcher_and_the_agents_options(tmp_path):
    workdir = tmp_path / "agent"
    container = executor(tmp_path, default_image="debian:12", network="none", memory="2g", cpus="1.5",
                         options=["--ulimit=nofile=1024:1024", "--runtime", "runc"])
    key = agent_key(workdir)

    argv = container.create_command(job(), image="ubuntu:24.04", workspace=workdir / JOB_ID,
                                    artifacts=workdir / "artifacts" / JOB_ID)

    assert argv == [
        "/usr/bin/podman", "create", "--pull=missing", "--name", f"harmont-{key}-{JOB_ID}",
        "--label", f"harmont.agent={workdir}", "--label", f"harmont.job={JOB_ID}",
        "--volume", f"{workdir / JOB_ID}:/workspace", "--volume", f"{workdir}/artifacts/{JOB_ID}:/harmont/artifacts",
        "--volume", f"{workdir}/containers/{JOB_ID}:/harmont/run", "--workdir", "/workspace",
        "--entrypoint", "/bin/sh", "--http-proxy=false", "--network", "none", "--memory", "2g", "--cpus", "1.5",
        "--ulimit=nofile=1024:1024", "--runtime", "runc",
        "ubuntu:24.04", "-c", LAUNCHER, "harmont", "make test",
    ]


def test_docker_gets_the_same_flags_but_podmans_own(tmp_path):
    docker = executor(tmp_path, engine="docker")
    podman = executor(tmp_path, engine="podman")
    spec = job()

    docker_argv = docker.create_command(spec, image="alpine", workspace=tmp_path, artifacts=tmp_path)
    podman_argv = podman.create_command(spec, image="alpine", workspace=tmp_path, artifacts=tmp_path)

    assert docker_argv[0] == "/usr/bin/docker" and "--http-proxy=false" not in docker_argv
    assert [a for a in podman_argv[1:] if a != "--http-proxy=false"] == docker_argv[1:]
    # Without --network, --memory or --cpus the engine's defaults hold.
    assert not {"--network", "--memory", "--cpus"} & set(docker_argv)


def test_the_jobs_environment_is_on_no_command_line(tmp_path):
    spec = job(env={"API_KEY": "k-123-secret", "CI": "true"})
    argv = executor(tmp_path).create_command(spec, image="alpine", workspace=tmp_path, artifacts=tmp_path)
    assert not [arg for arg in argv if "k-123-secret" in arg or arg in ("-e", "--env", "--env-file")]


def test_the_other_engine_calls(tmp_path):
    container = executor(tmp_path)
    name = container.container_name(job())
    spec = job(cancel_grace_seconds=2.4)

    assert container.start_command(spec) == ["/usr/bin/podman", "start", "--attach", name]
    assert container.stop_command(spec) == ["/usr/bin/podman", "stop", "--time", "2", name]
    assert container.remove_command(name) == ["/usr/bin/podman", "rm", "--force", name]
    assert container.commit_command(spec) == ["/usr/bin/podman", "commit", name,
                                              f"localhost/harmont-snapshot-{container.key}:{JOB_ID}"]
    # Saved by id: the archive names no image, and the agent that loads it tags it with its own name.
    assert container.save_command("9936f4d1") == ["/usr/bin/podman", "save", "9936f4d1"]
    assert container.load_command() == ["/usr/bin/podman", "load"]
    assert container.guard_arguments() == ["--engine", "/usr/bin/podman"]


def test_two_agents_of_one_host_never_share_a_name(tmp_path):
    assert agent_key(tmp_path / "a1") != agent_key(tmp_path / "a2")
    assert agent_key(tmp_path / "a1") == agent_key(tmp_path / "a1")
    assert (executor(tmp_path).snapshot_name("x")
            != ContainerExecutor(context(tmp_path / "b"), engine="podman", binary="podman").snapshot_name("x"))


# ------------------------------------------------------------------ environments


def test_the_env_file_gives_a_shell_every_value_exactly(tmp_path):
    env = {"PLAIN": "value", "QUOTES": "it's \"quoted\"", "LINES": "line 1\nline 2\n", "DOLLAR": "$HOME `id` $(id)",
           "EMPTY": "", "UNICODE": "héllo ☃"}
    text, skipped = env_file_text({**env, "BAD-NAME": "x", "1X": "y"})
    assert skipped == ["BAD-NAME", "1X"]
    (tmp_path / "env").write_text(text)

    printed = subprocess.run(["sh", "-c", '. "$0" && for n in PLAIN QUOTES LINES DOLLAR EMPTY UNICODE; do '
                              'eval "printf \'%s\\0\' \\"\\$$n\\""; done', str(tmp_path / "env")],
                             capture_output=True, env={"PATH": os.defpath}, check=True).stdout

    assert printed.decode().split("\0")[:-1] == list(env.values())


def test_the_engines_cli_gets_only_what_it_needs_of_the_agents_environment():
    environ = {"PATH": "/usr/bin", "HOME": "/root", "AWS_SECRET_ACCESS_KEY": "nope", "DOCKER_HOST": "unix:///d.sock",
               "HTTPS_PROXY": "http://proxy:3128", "LANG": "C.UTF-8"}

    podman = engine_environment(environ, engine="podman")
    docker = engine_environment(environ, engine="docker")

    # podman pulls through the proxy itself (and is told not to pass it into containers);
    # docker's daemon has its own.
    assert podman == {"PATH": "/usr/bin", "HOME": "/root", "DOCKER_HOST": "unix:///d.sock",
                      "HTTPS_PROXY": "http://proxy:3128"}
    assert docker == {"PATH": "/usr/bin", "HOME": "/root", "DOCKER_HOST": "unix:///d.sock"}


# ------------------------------------------------------------------ a fake engine


def fake_engine(tmp_path: Path, script: str) -> tuple[str, Path]:
    """An executable `podman` that appends its arguments to calls.log, then runs `script` (with "$@")."""
    calls = tmp_path / "calls.log"
    engine = tmp_path / "bin" / "podman"
    engine.parent.mkdir(exist_ok=True)
    engine.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n{script}\n')
    engine.chmod(0o755)
    return str(engine), calls


def test_an_image_that_cant_be_had_fails_the_job_image_unavailable_with_the_engines_message(tmp_path):
    binary, calls = fake_engine(tmp_path, 'case "$1" in create) echo "Error: pull access denied" >&2; exit 125;; '
                                          'esac')
    lines: list[str] = []
    workdir = tmp_path / "agent"
    container = ContainerExecutor(context(workdir, lines), engine="podman", binary=binary, environ={})
    spec = job(env={"TOKEN": "t0ken"})
    shipper = LogShipper(QuietTransport(), spec)  # type: ignore[arg-type]

    result = container.execute(spec, workspace=tmp_path, artifacts=tmp_path, shipper=shipper)

    assert result == {"exit_code": None, "error_code": "image_unavailable",
                      "error_message": "Error: pull access denied"}
    meta = "".join(chunk["content"] for chunk in shipper.pending if chunk["stream_kind"] == META)
    assert "the job's container could not be started: Error: pull access denied" in meta
    name = container.container_name(spec)
    assert [line.split()[0] for line in calls.read_text().splitlines()] == ["create", "rm"]
    assert lines == [f"+container {name}", f"-container {name}"]
    assert not (workdir / "containers" / JOB_ID).exists()  # the environment file went with it


def test_a_step_without_image_on_an_agent_without_default_fails_without_calling_the_engine(tmp_path):
    binary, calls = fake_engine(tmp_path, "exit 0")
    container = ContainerExecutor(context(tmp_path / "agent"), engine="podman", binary=binary, environ={})
    spec = job(image=None)
    shipper = LogShipper(QuietTransport(), spec)  # type: ignore[arg-type]

    result = container.execute(spec, workspace=tmp_path, artifacts=tmp_path, shipper=shipper)

    assert result["error_code"] == "image_unavailable"
    assert result["error_message"] == "the step names no image and this agent has no --default-image"
    assert not calls.exists()


def test_a_restarted_agent_removes_its_own_containers_and_snapshots_only(tmp_path):
    workdir = tmp_path / "agent"
    mine = f"localhost/harmont-snapshot-{agent_key(workdir)}"
    binary, calls = fake_engine(tmp_path, f'''case "$1" in
  ps) echo c1; echo c2;;
  images) echo {mine}:job-1; echo localhost/harmont-snapshot-0123456789ab:job-2; echo ubuntu:24.04;;
esac''')
    (workdir / "containers" / JOB_ID).mkdir(parents=True)
    container = ContainerExecutor(context(workdir), engine="podman", binary=binary, environ={})

    removed = container.clean_up_after_crash()

    assert calls.read_text().splitlines() == [
        f"ps --all --quiet --filter label=harmont.agent={workdir}",
        "kill c1", "rm --force c1", "kill c2", "rm --force c2",
        "images --format {{.Repository}}:{{.Tag}}", f"rmi {mine}:job-1",
    ]
    assert removed == 4 and not (workdir / "containers" / JOB_ID).exists()


def test_the_snapshot_cache_keeps_the_newest_few(tmp_path):
    binary, calls = fake_engine(tmp_path, "exit 0")
    container = ContainerExecutor(context(tmp_path / "agent"), engine="podman", binary=binary, environ={})
    for job_id in ("j1", "j2", "j3", "j1", "j4"):
        container._keep_snapshot(job_id, container.snapshot_name(job_id))

    assert list(container.snapshots) == ["j3", "j1", "j4"]
    assert calls.read_text().splitlines() == [f"rmi {container.snapshot_name('j2')}"]
    container.close()
    assert container.snapshots == {} and len(calls.read_text().splitlines()) == 4


def test_the_guard_removes_the_containers_of_an_agent_that_died(tmp_path):
    binary, calls = fake_engine(tmp_path, "exit 0")
    guard = subprocess.Popen([sys.executable, "-I", str(GUARD), "--engine", binary], stdin=subprocess.PIPE,
                             cwd="/", env={"PATH": os.defpath})
    assert guard.stdin is not None
    guard.stdin.write(b"+container harmont-a-1\n+container harmont-a-2\n-container harmont-a-1\n")
    guard.stdin.close()  # what the kernel does when the agent dies

    assert guard.wait(timeout=30) == 0
    assert calls.read_text().splitlines() == ["kill harmont-a-2", "rm --force harmont-a-2"]


# ------------------------------------------------------------------ snapshot streams


def test_a_save_stream_reads_as_made_and_starts_again_on_seek():
    stream = SaveStream(["sh", "-c", "printf abc; printf def"], env={"PATH": os.defpath}, limit=None)
    try:
        assert stream.read(4) == b"abcd"
        stream.seek(0)  # a retried request: `save` runs again
        assert b"".join(iter(lambda: stream.read(2), b"")) == b"abcdef"
        assert stream.sent == 6
    finally:
        stream.close()


def test_a_save_stream_stops_past_the_servers_limit_and_reports_a_failed_save():
    big = SaveStream(["sh", "-c", "printf 0123456789"], env={"PATH": os.defpath}, limit=5)
    failing = SaveStream(["sh", "-c", "printf ab; echo no such image >&2; exit 125"], env={"PATH": os.defpath},
                         limit=None)
    try:
        with pytest.raises(SnapshotTooLarge):
            while big.read(4):
                pass
        with pytest.raises(OSError, match="save failed: no such image"):
            while failing.read(4):
                pass
    finally:
        big.close()
        failing.close()


# ------------------------------------------------------------------ runagent


def test_make_executor_picks_by_name(tmp_path, monkeypatch):
    assert isinstance(make_executor("host", context(tmp_path)), HostExecutor)
    with pytest.raises(ValueError, match="unknown executor 'lxc'"):
        make_executor("lxc", context(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no engine there
    with pytest.raises(ValueError, match="--executor docker: no docker program on PATH"):
        make_executor("docker", context(tmp_path))


class CapturedAgent:
    created: dict[str, Any] = {}

    def __init__(self, **kwargs: Any) -> None:
        CapturedAgent.created = kwargs

    def handle_signal(self, signum: int, frame: object) -> None:  # pragma: no cover - never signalled here
        pass

    def run(self) -> int:
        return 0


def run_main(monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    monkeypatch.setattr(runner, "Agent", CapturedAgent)
    monkeypatch.setattr(runner.signal, "signal", lambda *args: None)
    monkeypatch.setattr(runner, "forbid_inspection", lambda: None)
    for name, value in {"HARMONT_AGENT_TOKEN": "hma_x", **env}.items():
        monkeypatch.setenv(name, value)
    assert runner.main(["--server", "http://127.0.0.1:9", *argv]) == 0
    return CapturedAgent.created


def test_runagent_takes_the_executors_options(monkeypatch):
    created = run_main(monkeypatch, ["--executor", "podman", "--default-image", "debian:12", "--network", "none",
                                     "--memory", "2g", "--cpus", "2", "--container-option=--ulimit=nofile=1024:1024",
                                     "--container-option", "--runtime runc"], {})
    assert {key: created[key] for key in ("executor", "default_image", "network", "memory", "cpus",
                                          "container_options")} == {
        "executor": "podman", "default_image": "debian:12", "network": "none", "memory": "2g", "cpus": "2",
        "container_options": ("--ulimit=nofile=1024:1024", "--runtime", "runc")}


def test_runagent_takes_the_executors_options_from_the_environment(monkeypatch):
    created = run_main(monkeypatch, [], {"HARMONT_AGENT_EXECUTOR": "podman", "HARMONT_AGENT_DEFAULT_IMAGE": "alpine",
                                         "HARMONT_AGENT_NETWORK": "none", "HARMONT_AGENT_MEMORY": "1g",
                                         "HARMONT_AGENT_CPUS": "0.5",
                                         "HARMONT_AGENT_CONTAINER_OPTIONS": "--ulimit nofile=1024:1024 --label 'a=b c'"})
    assert (created["executor"], created["default_image"], created["network"], created["memory"], created["cpus"],
            created["container_options"]) == ("podman", "alpine", "none", "1g", "0.5",
                                              ("--ulimit", "nofile=1024:1024", "--label", "a=b c"))


def test_runagent_refuses_run_as_with_a_container_executor(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exited:
        run_main(monkeypatch, ["--executor", "docker", "--run-as", "nobody"], {})
    assert exited.value.code == 2
    assert "--run-as applies to the host executor only" in capsys.readouterr().err


def test_the_executors_options_survive_the_agents_clean_restart():
    # The restart drops HARMONT_* from the environment: what they said must be on the new command line.
    args = argparse.Namespace(server="http://s", poll_interval=1.0, heartbeat_interval=5.0, claim_wait=12.0,
                              name=None, workdir=None,
                              run_as=None, tags="", once=False, executor="podman", default_image="alpine",
                              network="none", memory="1g", cpus="2",
                              container_options=["--ulimit", "nofile=1024:1024", "--label", "a=b c"])

    options = runner._options_without_token(args)

    assert options[:8] == ["--server", "http://s", "--poll-interval", "1.0", "--heartbeat-interval", "5.0",
                           "--claim-wait", "12.0"]
    assert options[8:] == ["--executor", "podman", "--default-image", "alpine", "--network", "none", "--memory", "1g",
                           "--cpus", "2", "--container-option=--ulimit", "--container-option=nofile=1024:1024",
                           "--container-option=--label", "--container-option='a=b c'"]
    assert runner.container_options([option.split("=", 1)[1] for option in options[18:]], "") == \
        args.container_options
