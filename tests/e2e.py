"""Helpers for the end-to-end agent tests: a live server, real agent processes, a reaper thread.

Agents are `python manage.py runagent` subprocesses talking HTTP to a live server
running in a thread of the test process, so settings changed with the `settings`
fixture reach the server (and the reaper thread) too. Tests using these fixtures need
a transactional database: the server's threads must see what the test commits. The
agents' output goes to files printed at teardown, which pytest shows only when the
test failed. The fixtures are loaded for every module by tests/conftest.py (`pytest_plugins`).

`db_worker` is a real `manage.py db_worker` process on the server's database, for the tasks
(webhook deliveries, commit statuses, outbound webhooks); its settings come from its
environment, which mirrors the test's `settings` (`worker_environment`).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import pytest
from django.db import connections
from django.test.testcases import LiveServerThread, _StaticFilesHandler

from builds.models import Build, Job, LogChunk, StreamKind
from builds.reaper import run_reaper
from organizations import services as org_services
from pipelines.models import Pipeline
from tests.helpers import builds_url

if TYPE_CHECKING:  # imported by pytest as the plugin below, so that its asserts are rewritten
    from tests.fake_github import FakeReceiver

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The fake GitHub and webhook receiver: `db_worker` posts to the former.
pytest_plugins = ["tests.fake_github"]

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, *, interval: float = 0.1, what: str = "") -> T:
    """Poll `predicate` until it returns something truthy (returned) or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


# ------------------------------------------------------------------ builds through the API, and their results


def create_build(api: Any, pipeline: Pipeline, ir: dict[str, Any], **body: Any) -> Build:
    """A build of `pipeline` with this IR, created through the REST API (201), re-read from the database."""
    response = api.post(builds_url(pipeline), {"branch": "main", "commit": "abc123",
                                               "pipeline_ir": json.dumps(ir), **body}, format="json")
    assert response.status_code == 201, response.content[:500]
    return Build.objects.get(pk=response.json()["id"])


def finished(build: Build) -> Build | None:
    """The build, re-read, once it and all its jobs are terminal."""
    build.refresh_from_db()
    return build if build.finished_at is not None else None


def job_in(job: Job, *states: str) -> Job | None:
    """The job, re-read, once it is in one of `states`."""
    job.refresh_from_db()
    return job if job.state in states else None


def job_log(job: Job, *, kinds: tuple[int, ...] = (StreamKind.STDOUT, StreamKind.STDERR, StreamKind.META)) -> str:
    """The job's stored log: chunk contents in seq order, of the given stream kinds."""
    return "".join(LogChunk.objects.filter(job=job, stream_kind__in=kinds).order_by("seq")
                   .values_list("content", flat=True))


def stdout_of(job: Job) -> str:
    return job_log(job, kinds=(StreamKind.STDOUT,))


def stderr_of(job: Job) -> str:
    return job_log(job, kinds=(StreamKind.STDERR,))


def jobs_by_key(build: Any) -> dict[str, Job]:
    return {job.step_key: job for job in Job.objects.filter(build_id=build.pk)}


def pid_from_log(job: Job, timeout: float = 10) -> int:
    """A command started with `echo pid=$$; exec ...` prints its pid; wait until it is stored."""
    def find() -> int | None:
        for line in stdout_of(job).splitlines():
            if line.startswith("pid="):
                return int(line[4:])
        return None
    return wait_for(find, timeout, what=f"the pid line of job {job.step_key}")


def process_exists(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie counts as gone: it no longer runs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------ agent processes


@dataclass
class AgentProcess:
    name: str
    workdir: Path
    process: subprocess.Popen
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def output(self) -> str:
        return (f"--- agent {self.name} (pid {self.pid}, exit {self.process.poll()}) stdout:\n"
                f"{self.stdout_path.read_text(errors='replace')}"
                f"--- stderr:\n{self.stderr_path.read_text(errors='replace')}")


@dataclass
class Agents:
    """Starts agents against the live server; `close()` kills them and whatever they left running."""

    server: str
    token: str
    base: Path
    started: list[AgentProcess] = field(default_factory=list)

    def start(self, name: str, *, poll_interval: float | None = 0.2, options: tuple[str, ...] = (),
              env: dict[str, str] | None = None, workdir: Path | None = None) -> AgentProcess:
        """Start `manage.py runagent` as `name`; `poll_interval=None` keeps the agent's default.

        The token goes in `HARMONT_AGENT_TOKEN` unless `options` pass it (`--token-file`, `--token`);
        `env` is added to the test process's environment for the agent.
        """
        workdir = workdir or self.base / name
        command = [sys.executable, "manage.py", "runagent", "--server", self.server,
                   "--workdir", str(workdir), "--name", name, *options]
        if poll_interval is not None:
            command += ["--poll-interval", str(poll_interval)]
        passed = any(option.startswith("--token") for option in options)
        token_env = {} if passed else {"HARMONT_AGENT_TOKEN": self.token}
        return self.start_command(name, command, env={**os.environ, "PYTHONUNBUFFERED": "1", **token_env,
                                                      **(env or {})}, workdir=workdir)

    def start_command(self, name: str, command: list[str], *, env: dict[str, str], workdir: Path,
                      user: str | None = None, cwd: Path = PROJECT_ROOT) -> AgentProcess:
        """Start an agent with exactly this command line and environment (its commands run under
        `workdir`), as `user` if given, from `cwd` (the checkout by default)."""
        stdout_path, stderr_path = self.base / f"{name}.stdout", self.base / f"{name}.stderr"
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                       env=env, user=user)
        agent = AgentProcess(name, workdir, process, stdout_path, stderr_path)
        self.started.append(agent)
        return agent

    def close(self) -> None:
        for agent in self.started:
            if agent.process.poll() is None:
                agent.process.kill()
                agent.process.wait(timeout=10)
        # Commands run in their own process groups, so killing an agent leaves them
        # running: find them by their working directory (inside an agent's workdir).
        roots = {str(self.base), *(str(agent.workdir) for agent in self.started)}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cwd = os.readlink(proc / "cwd")
            except OSError:
                continue
            if any(cwd.startswith(root + os.sep) for root in roots):
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for agent in self.started:
            print(agent.output())


def database_quiet(timeout: float = 10.0) -> None:
    """PostgreSQL: wait until no other session on the test database runs a statement or holds a
    transaction open. A request the server is still answering for an agent just killed would
    otherwise race the teardown's TRUNCATE of every table for their locks (PostgreSQL then cancels
    one of the two as a deadlock)."""
    connection = connections["default"]
    if connection.vendor != "postgresql":
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                           " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
                           " AND state IS DISTINCT FROM 'idle'")
            if cursor.fetchone()[0] == 0:
                return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def e2e_database(django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[None]:
    """SQLite only: run the module on a file copy of the in-memory test database.

    Each connection to an in-memory SQLite database would be a database of its own, so
    Django's live server shares the test thread's one connection with every request
    thread. Concurrent agents then interleave transactions on it ("no such savepoint").
    A file gives every thread its own connection, serialised by SQLite's own locking
    (WAL, and the settings' busy timeout). The in-memory database stays alive (its
    connection is kept, not closed) and is put back for the rest of the session.
    """
    conn = connections["default"]
    if conn.vendor != "sqlite" or not conn.is_in_memory_db():
        yield
        return
    path = tmp_path_factory.mktemp("e2e-db") / "db.sqlite3"
    with django_db_blocker.unblock():
        conn.ensure_connection()
        memory, name = conn.connection, conn.settings_dict["NAME"]
        copy = sqlite3.connect(path)
        memory.backup(copy)
        copy.execute("PRAGMA journal_mode=WAL")
        copy.close()
        conn.connection = None  # forget it without closing: closing would destroy the database
        conn.settings_dict["NAME"] = str(path)
    try:
        yield
    finally:
        with django_db_blocker.unblock():
            conn.close()
            conn.settings_dict["NAME"] = name
            conn.connection = memory


@pytest.fixture(scope="module")
def e2e_server(e2e_database: None) -> Iterator[str]:
    """A threaded live server for the module (Django's LiveServerThread); its base URL.

    Not pytest-django's `live_server`: that one is session-wide and, once started,
    keeps serving whatever database connection it was given at the time.
    """
    thread = LiveServerThread("localhost", _StaticFilesHandler, connections_override={})
    thread.daemon = True
    thread.start()
    thread.is_ready.wait()
    if thread.error:
        raise thread.error
    try:
        yield f"http://{thread.host}:{thread.port}"
    finally:
        thread.terminate()


@pytest.fixture
def agents(e2e_server: str, transactional_db: None, e2e_settings: Any,
           agent_token: org_services.IssuedAgentToken, tmp_path: Path, pipeline: Pipeline) -> Iterator[Agents]:
    """Agents of the `org` fixture's organization; killed at teardown, with what they left running.

    The `pipeline` fixture's repository is cleared: its builds run their commands in
    an empty workspace instead of cloning a repository these machines can't reach
    (tests/test_checkout_e2e.py covers checkouts, with local repositories).
    """
    pipeline.repository = ""
    pipeline.save(update_fields=["repository"])
    pool = Agents(server=e2e_server, token=agent_token.raw, base=tmp_path / "agents")
    pool.base.mkdir()
    try:
        yield pool
    finally:
        pool.close()
        database_quiet()


@pytest.fixture
def reaper(e2e_server: str, transactional_db: None) -> Iterator[threading.Thread]:
    """The reaper loop in a thread of the test process, every 0.5 s, for the test's duration."""
    stop = threading.Event()

    def loop() -> None:
        try:
            run_reaper(stop=stop, interval=0.5)
        finally:
            connections.close_all()

    thread = threading.Thread(target=loop, name="reaper", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(timeout=10)


@pytest.fixture
def e2e_settings(settings: Any, tmp_path: Path) -> Any:
    """Stored workspaces go to the test's directory; a canceled command gets 2 s before SIGKILL."""
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.AGENT_CANCEL_GRACE_SECONDS = 2
    return settings


# ------------------------------------------------------------------ a task worker process

# The settings a worker's tasks read, and the environment variable each comes from.
WORKER_SETTINGS = {
    "SECRET_KEY": "HARMONT_SECRET_KEY",
    "SECRETS_KEYS": "HARMONT_SECRETS_KEY",  # decrypts GitHub tokens and webhook secrets
    "PUBLIC_URL": "HARMONT_PUBLIC_URL",  # the build page links of the events a task records
    "MEDIA_ROOT": "HARMONT_MEDIA_ROOT",
    "GITHUB_API_URL": "HARMONT_GITHUB_API_URL",
    "DELIVERY_RETRY_SECONDS": "HARMONT_DELIVERY_RETRY_SECONDS",
    "DELIVERY_TIMEOUT_SECONDS": "HARMONT_DELIVERY_TIMEOUT",
    "TASK_LEASE_SECONDS": "HARMONT_TASK_LEASE_SECONDS",
}


def database_url() -> str:
    """The DATABASE_URL of the database this test runs on (the e2e file copy on SQLite)."""
    settings_dict = connections["default"].settings_dict
    if connections["default"].vendor == "sqlite":
        return f"sqlite:///{settings_dict['NAME']}"
    credentials = settings_dict["USER"] + (f":{quote(settings_dict['PASSWORD'], safe='')}"
                                           if settings_dict["PASSWORD"] else "")
    return (f"postgres://{credentials}@{settings_dict['HOST'] or '127.0.0.1'}:{settings_dict['PORT'] or 5432}/"
            f"{settings_dict['NAME']}")


def worker_environment(settings: Any) -> dict[str, str]:
    """A process's environment that gives it this test's database and these `settings` (WORKER_SETTINGS)."""
    env = {**os.environ, "DATABASE_URL": database_url(), "HARMONT_DEBUG": "0", "PYTHONUNBUFFERED": "1"}
    for name, variable in WORKER_SETTINGS.items():
        value = getattr(settings, name)
        env[variable] = ",".join(value) if isinstance(value, list) else str(value)
    return env


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    output_path: Path

    def output(self) -> str:
        return (f"--- db_worker (pid {self.process.pid}, exit {self.process.poll()}):\n"
                f"{self.output_path.read_text(errors='replace')}")

    def stop(self) -> None:
        """SIGTERM to its process group (a graceful stop between tasks), SIGKILL if that takes over 10 s."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill_group(self.process.pid)
                self.process.wait(timeout=10)


@pytest.fixture
def db_worker(e2e_server: str, transactional_db: None, e2e_settings: Any, fake_github: FakeReceiver,
              tmp_path: Path) -> Iterator[WorkerProcess]:
    """`manage.py db_worker --interval 0.2` on the e2e server's database, stopped at teardown.

    The test's settings point at the e2e server (build page links) and the fake GitHub,
    with retries 0.3 s apart (doubling); the worker gets the same through its environment.
    Change `settings` the worker reads before this fixture starts it (in a fixture it uses).
    """
    e2e_settings.PUBLIC_URL = e2e_server
    e2e_settings.GITHUB_API_URL = fake_github.url
    e2e_settings.DELIVERY_RETRY_SECONDS = 0.3
    e2e_settings.DELIVERY_TIMEOUT_SECONDS = 5.0
    output_path = tmp_path / "db_worker.log"
    with open(output_path, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "db_worker", "--interval", "0.2", "--no-startup-delay", "--no-reload"],
            cwd=PROJECT_ROOT, env=worker_environment(e2e_settings), stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
    worker = WorkerProcess(process, output_path)
    try:
        yield worker
    finally:
        worker.stop()
        print(worker.output())
