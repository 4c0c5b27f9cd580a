"""Faults: what clients see while the database is away, and what the agent and the reaper do about it.

The slow tests (marked) run real server processes: one killed mid-run, one whose database is a
throwaway PostgreSQL cluster stopped for a while.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.sessions.middleware import SessionMiddleware
from django.db import InterfaceError, OperationalError, connection, connections
from django.test import Client, RequestFactory
from django.utils import timezone

from builds import reaper as reaper_loop
from builds import services as build_services
from builds import stream
from builds.agent import transport as agent_transport
from builds.agent.transport import MAX_BACKOFF_SECONDS, Transport
from builds.models import Job, JobState
from builds.reaper import OutageGrace, run_reaper
from harmont.errors import CATALOG
from harmont.logtokens import mint_log_token
from tests.dsl import hm
from tests.e2e import PROJECT_ROOT, Agents, create_build, finished, jobs_by_key, stdout_of, wait_for
from tests.helpers import AGENT, assert_error, builds_url, job_url


@pytest.fixture
def database_down(db) -> Any:
    """From here on every query fails as it does while the server is stopped (until `.undo()`).

    Its own patch, undone before the test database's teardown needs the connection again.
    """
    patch = pytest.MonkeyPatch()

    def arm(error: type[Exception] = OperationalError) -> None:
        def refused(*args: Any, **kwargs: Any) -> Any:
            raise error("connection to server at \"127.0.0.1\", port 5432 failed: Connection refused")

        patch.setattr(connection, "cursor", refused)
        if hasattr(connection, "prepared_cursor"):  # the hot statements' cursor (harmont.prepared)
            patch.setattr(connection, "prepared_cursor", refused)

    arm.undo = patch.undo  # type: ignore[attr-defined]
    yield arm
    patch.undo()


def assert_unavailable(response: Any) -> None:
    error = assert_error(response, 503, "database_unavailable")
    assert error["type"] == "server_error"
    assert response["Retry-After"] == "2"


@pytest.mark.parametrize("error", [OperationalError, InterfaceError])
def test_rest_route_while_database_is_away_is_503_envelope(api, org, pipeline, database_down, error):
    database_down(error)
    assert_unavailable(api.get(builds_url(pipeline)))
    assert_unavailable(api.post(builds_url(pipeline), {"branch": "main", "commit": "HEAD"}, format="json"))


def test_an_outage_logs_one_warning_per_request_and_no_error(api, org, pipeline, database_down, caplog):
    database_down()
    with caplog.at_level("INFO"):
        assert_unavailable(api.get(builds_url(pipeline)))
    records = [(r.name, r.levelname) for r in caplog.records]
    assert records == [("harmont.errors", "WARNING")], records


def test_agent_routes_while_database_is_away_are_503_envelopes(session, running, database_down):
    spec, job_client = running
    database_down()
    assert_unavailable(session.post(f"{AGENT}/claim"))
    assert_unavailable(job_client.post(job_url(spec["id"], "heartbeat"), {}, format="json"))
    assert_unavailable(job_client.post(job_url(spec["id"], "logs"),
                                       {"chunks": [{"seq": 1, "stream_kind": 0, "content": "x\n"}]}, format="json"))


def test_nothing_is_written_by_a_request_the_outage_refused(session, running, database_down):
    spec, job_client = running
    before = Job.objects.get(pk=spec["id"]).last_heartbeat_at
    database_down()
    assert_unavailable(job_client.post(job_url(spec["id"], "heartbeat"), {}, format="json"))
    database_down.undo()
    assert Job.objects.get(pk=spec["id"]).last_heartbeat_at == before


def test_page_while_database_is_away_is_503_envelope_not_html(owner, org, database_down):
    browser = Client(raise_request_exception=False)
    browser.force_login(owner)
    database_down()
    assert_unavailable(browser.get(f"/orgs/{org.slug}/"))


def test_failure_in_a_middleware_while_database_is_away_is_503_envelope(owner, org, monkeypatch):
    """The session is loaded in a middleware, before any view: Django's own 500 page would answer it."""
    browser = Client(raise_request_exception=False)
    browser.force_login(owner)

    def refused(self: SessionMiddleware, request: Any) -> None:
        raise OperationalError("the database system is shutting down")

    monkeypatch.setattr(SessionMiddleware, "process_request", refused)
    assert_unavailable(browser.get(f"/orgs/{org.slug}/"))
    assert_unavailable(browser.get("/api/v0/ping"))


def test_other_middleware_failures_stay_500(owner, org, monkeypatch):
    browser = Client(raise_request_exception=False)

    def broken(self: SessionMiddleware, request: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(SessionMiddleware, "process_request", broken)
    assert_error(browser.get("/api/v0/ping"), 500, "server_error")
    page = browser.get(f"/orgs/{org.slug}/")
    assert page.status_code == 500 and not page["Content-Type"].startswith("application/json")


def test_live_log_stream_while_database_is_away_is_503_flat_json(build, running, monkeypatch):
    spec, _ = running
    token = mint_log_token(build_id=build.pk).token

    def refused(*args: Any) -> bool:
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(stream, "may_open", refused)
    request = RequestFactory().get(f"/v0/jobs/{spec['id']}/logs", {"token": token})
    response = asyncio.run(stream.job_log_stream(request, spec["id"]))
    assert response.status_code == 503
    assert response["Content-Type"].startswith("application/json")
    assert response["Retry-After"] == "2"
    body = json.loads(response.content)
    assert body == {"code": "database_unavailable", "message": "The database is unavailable; retry shortly."}


def test_database_unavailable_is_in_the_catalog_with_a_page(client, db):
    assert CATALOG["database_unavailable"].type == "server_error"
    assert client.get("/docs/errors/database_unavailable").status_code == 200


# ---------------------------------------------------------------- the agent's transport

class FlakyServer(http.server.ThreadingHTTPServer):
    """Answers 503 to its first `failures` requests, then 200; keeps connections alive between them
    and notes the client port of each request (one port, one connection)."""

    daemon_threads = True

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.ports: list[int] = []
        super().__init__(("127.0.0.1", 0), FlakyHandler)


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as gunicorn and uvicorn answer

    def do_POST(self) -> None:  # noqa: N802 — http.server's naming
        server: FlakyServer = self.server  # type: ignore[assignment]
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        server.ports.append(self.client_address[1])
        failing = len(server.ports) <= server.failures
        body = json.dumps({"error": {"code": "database_unavailable"}} if failing else {"ok": True}).encode()
        self.send_response(503 if failing else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def flaky() -> Iterator[Any]:
    servers: list[FlakyServer] = []

    def start(failures: int) -> FlakyServer:
        server = FlakyServer(failures)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The transport's backoff sleeps, recorded instead of slept."""
    slept: list[float] = []
    monkeypatch.setattr(agent_transport.time, "sleep", slept.append)
    return slept


def url_of(server: FlakyServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_transport_retries_a_5xx_on_a_new_connection(flaky, sleeps):
    server = flaky(failures=3)
    transport = Transport(url_of(server))
    assert transport.json("POST", "/api/v0/agent/claim", token="hms_x", body={}) == {"ok": True}
    assert len(server.ports) == 4
    assert len(set(server.ports)) == 4, "a retry went out on the connection the 5xx came on"
    assert len(sleeps) == 3


def test_transport_keeps_a_healthy_connection_alive(flaky, sleeps):
    server = flaky(failures=0)
    transport = Transport(url_of(server))
    for _ in range(3):
        transport.json("POST", "/api/v0/agent/claim", token="hms_x", body={})
    assert len(server.ports) == 3 and len(set(server.ports)) == 1
    assert sleeps == []


def test_transport_backoff_is_capped(flaky, sleeps):
    server = flaky(failures=12)
    transport = Transport(url_of(server))
    assert transport.json("POST", "/api/v0/agent/claim", token="hms_x", body={}) == {"ok": True}
    assert MAX_BACKOFF_SECONDS == 5.0
    assert len(sleeps) == 12
    assert max(sleeps) <= MAX_BACKOFF_SECONDS, sleeps
    assert sleeps[-1] == MAX_BACKOFF_SECONDS  # it got there: 0.5, 1, 2, 4, then the cap


# ---------------------------------------------------------------- the reaper after an outage

class ReaperPasses:
    """Reaper passes at chosen times on a fake clock, sharing what the loop knows between them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, t0: datetime) -> None:
        self.monkeypatch = monkeypatch
        self.t0 = t0
        self.grace = OutageGrace()
        self.reap = build_services.reap
        # The loop drops a connection that failed; here the fake failure leaves the test's own
        # (inside its transaction) sound, and closing it would end that transaction.
        monkeypatch.setattr(reaper_loop, "close_old_connections", lambda: None)

    def run(self, at: float, *, database_up: bool = True) -> None:
        if database_up:
            self.monkeypatch.setattr(reaper_loop.services, "reap", self.reap)
        else:
            def refused(**kwargs: Any) -> Any:
                raise OperationalError("connection to server failed: Connection refused")

            self.monkeypatch.setattr(reaper_loop.services, "reap", refused)
        run_reaper(stop=threading.Event(), interval=0, once=True, grace=self.grace,
                   clock=lambda: self.t0 + timedelta(seconds=at))


@pytest.fixture
def silent_job(running, settings) -> tuple[Job, datetime]:
    """A running job whose agent last got a heartbeat through at t0 (timeout 30 s)."""
    settings.AGENT_HEARTBEAT_TIMEOUT_SECONDS = 30
    spec, _ = running
    t0 = timezone.now()
    Job.objects.filter(pk=spec["id"]).update(last_heartbeat_at=t0)
    return Job.objects.get(pk=spec["id"]), t0


def test_reaper_without_an_outage_reaps_a_job_silent_past_the_timeout(silent_job, monkeypatch):
    job, t0 = silent_job
    passes = ReaperPasses(monkeypatch, t0)
    passes.run(at=31)
    job.refresh_from_db()
    assert (job.state, job.error_code) == (JobState.FAILED, "agent_heartbeat_lost")


def test_reaper_after_an_outage_gives_agents_a_full_timeout_from_when_the_database_came_back(silent_job,
                                                                                            monkeypatch):
    job, t0 = silent_job
    passes = ReaperPasses(monkeypatch, t0)
    passes.run(at=5, database_up=False)
    passes.run(at=10, database_up=False)
    passes.run(at=15)  # back: silent 15 s, counted from here
    passes.run(at=40)  # 40 s since the last heartbeat, but 25 s since the database answered
    passes.run(at=44)
    job.refresh_from_db()
    assert job.state == JobState.RUNNING

    passes.run(at=46)  # 31 s since the database came back
    job.refresh_from_db()
    assert (job.state, job.error_code) == (JobState.FAILED, "agent_heartbeat_lost")


def test_a_heartbeat_after_the_outage_keeps_the_job_past_the_grace(silent_job, monkeypatch):
    job, t0 = silent_job
    passes = ReaperPasses(monkeypatch, t0)
    passes.run(at=5, database_up=False)
    passes.run(at=15)
    Job.objects.filter(pk=job.pk).update(last_heartbeat_at=t0 + timedelta(seconds=20))
    passes.run(at=46)
    job.refresh_from_db()
    assert job.state == JobState.RUNNING


def test_a_failed_pass_during_the_grace_starts_it_over(silent_job, monkeypatch):
    job, t0 = silent_job
    passes = ReaperPasses(monkeypatch, t0)
    passes.run(at=5, database_up=False)
    passes.run(at=10)
    passes.run(at=20, database_up=False)
    passes.run(at=25)
    passes.run(at=50)  # 40 s after the first return, 25 s after the second
    job.refresh_from_db()
    assert job.state == JobState.RUNNING
    passes.run(at=56)
    job.refresh_from_db()
    assert job.state == JobState.FAILED


# ---------------------------------------------------------------- the app server killed mid-run

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def database_url_of_tests() -> str:
    """The test database, as a server process started by the test reaches it."""
    conn = connections["default"].settings_dict
    if conn["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{conn['NAME']}"
    host, port = conn.get("HOST") or "127.0.0.1", conn.get("PORT") or 5432
    return f"postgres://{conn.get('USER') or 'postgres'}@{host}:{port}/{conn['NAME']}"


class ServerProcess:
    """uvicorn serving the project on a fixed port, as `make run` does; killed and started again at will."""

    def __init__(self, *, port: int, env: dict[str, str], log: Path) -> None:
        self.port, self.env, self.log = port, env, log
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "harmont.asgi:application", "--host", "127.0.0.1",
                 "--port", str(self.port), "--timeout-keep-alive", "2"],
                cwd=PROJECT_ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(self._answers, 30, what="the server to answer")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


@pytest.fixture
def server_process(e2e_database: None, transactional_db: None, tmp_path: Path) -> Iterator[ServerProcess]:
    env = {**os.environ, "DATABASE_URL": database_url_of_tests(), "HARMONT_MEDIA_ROOT": str(tmp_path / "media"),
           "PYTHONUNBUFFERED": "1"}
    server = ServerProcess(port=free_port(), env=env, log=tmp_path / "server.log")
    server.start()
    try:
        yield server
    finally:
        server.close()
        print((tmp_path / "server.log").read_text(errors="replace")[-5000:])


LINES = 60
# Output spread over ~6 s, so the server's death falls in the middle of every job.
COUNTING = f"for i in $(seq 1 {LINES}); do echo line-$i; sleep 0.1; done"


def every_line_once(job: Job) -> bool:
    return stdout_of(job).splitlines() == [f"line-{i}" for i in range(1, LINES + 1)]


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
# First: on SQLite, what the other fixtures write must go to the file the server process reads.
def test_killing_the_app_server_mid_run_loses_nothing(server_process, api, pipeline, agent_token, tmp_path):
    pipeline.repository = ""  # an empty workspace, no clone (as tests/e2e.py's `agents`)
    pipeline.save(update_fields=["repository"])
    agents = Agents(server=server_process.url, token=agent_token.raw, base=tmp_path / "agents")
    (tmp_path / "agents").mkdir()
    try:
        for name in ("one", "two"):
            agents.start(name)
        ir = hm.pipeline([hm.sh(COUNTING, key=f"count-{n}") for n in range(4)])
        builds = [create_build(api, pipeline, ir) for _ in range(2)]
        running = lambda: sum(j.state == "running" for b in builds for j in jobs_by_key(b).values())  # noqa: E731
        try:
            wait_for(lambda: running() == 2, 20, what="both agents to be running a job")
        except AssertionError:
            raise AssertionError([(k, j.state, j.error_code) for b in builds for k, j in jobs_by_key(b).items()])
        time.sleep(2)
        server_process.kill()
        time.sleep(3)  # the agents' requests fail meanwhile; they retry
        server_process.start()
        for build in builds:
            done = wait_for(lambda build=build: finished(build), 60, what="the build to finish")
            assert done.state == "passed", {k: (j.state, j.error_code) for k, j in jobs_by_key(build).items()}
            for job in jobs_by_key(build).values():
                assert every_line_once(job), stdout_of(job)[-500:]
        for agent in agents.started:
            assert agent.process.poll() is None  # carried on through it
    finally:
        agents.close()


# ---------------------------------------------------------------- a database outage

POSTGRES_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
HEARTBEAT_TIMEOUT = 15  # the least the setting takes
# Past the heartbeat timeout, so that the reaper's first pass after the outage sees every job
# silent for longer than it: only the grace it gives after an outage keeps them.
OUTAGE_SECONDS = HEARTBEAT_TIMEOUT + 1

SEED = """
import json
from organizations.services import create_agent_token, create_organization, create_personal_token, get_or_create_user
from pipelines.services import create_pipeline
user, _ = get_or_create_user(email="outage@example.com", name="Outage")
org = create_organization(name="Outage", owner=user)
pipeline = create_pipeline(org=org, name="web", repository="", default_branch="main")
print(json.dumps({"org": org.slug, "pipeline": pipeline.slug,
                  "api": create_personal_token(user=user).raw,
                  "agent": create_agent_token(organization=org).raw}))
"""


class ThrowawayCluster:
    """A PostgreSQL cluster of the test's own, in a temporary directory on a free port (never the shared one)."""

    def __init__(self) -> None:
        self.bin = POSTGRES_BINS[-1].parent
        # Outside pytest's own temporary directories: as root the server runs as `postgres`
        # (initdb refuses root), which can't enter those.
        self.base = Path(tempfile.mkdtemp(prefix="harmont-outage-"))
        self.base.chmod(0o777)
        self.data = self.base / "pgdata"
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None

    def run(self, *command: str) -> None:
        subprocess.run([str(self.bin / command[0]), *command[1:]], check=True, user=self.user,
                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=60)

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        self.run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.base / "pg.log"), "-o",
                 f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop")


def http(method: str, url: str, path: str, *, token: str, body: Any = None) -> tuple[int, Any]:
    import http.client as client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    conn = client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    kind = response.getheader("Content-Type") or ""
    return response.status, json.loads(data) if kind.startswith("application/json") else data.decode()


@pytest.mark.slow
@pytest.mark.skipif(not POSTGRES_BINS, reason="needs the PostgreSQL server binaries (/usr/lib/postgresql/*/bin)")
def test_a_database_outage_reaps_nothing_and_every_build_finishes_with_every_line_once(tmp_path):
    base = tmp_path / "outage"
    base.mkdir()
    cluster = ThrowawayCluster()
    cluster.init()
    cluster.start()
    env = {**os.environ, "DATABASE_URL": cluster.url, "HARMONT_MEDIA_ROOT": str(base / "media"),
           "HARMONT_AGENT_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT), "HARMONT_CONN_MAX_AGE": "0",
           "PYTHONUNBUFFERED": "1"}
    manage = [sys.executable, "manage.py"]
    reaper: subprocess.Popen | None = None
    server = ServerProcess(port=free_port(), env=env, log=base / "server.log")
    agents = Agents(server=server.url, token="", base=base / "agents")
    (base / "agents").mkdir()
    try:
        subprocess.run([*manage, "migrate", "--noinput"], cwd=PROJECT_ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL, timeout=120)
        seeded = json.loads(subprocess.run([*manage, "shell", "-c", SEED], cwd=PROJECT_ROOT, env=env, check=True,
                                           capture_output=True, text=True, timeout=60).stdout.strip().splitlines()[-1])
        agents.token = seeded["agent"]
        server.start()
        with open(base / "reaper.log", "wb") as out:
            reaper = subprocess.Popen([*manage, "runreaper", "--interval", "1"], cwd=PROJECT_ROOT, env=env,
                                      stdout=out, stderr=subprocess.STDOUT)
        for name in ("one", "two"):
            agents.start(name)
        builds_path = f"/api/v0/organizations/{seeded['org']}/pipelines/{seeded['pipeline']}/builds"
        long_count = COUNTING.replace("sleep 0.1", "sleep 0.5")  # ~30 s: it runs through the outage
        ir = hm.pipeline([hm.sh(long_count, key="count-0"), hm.sh(long_count, key="count-1")])
        status, created = http("POST", server.url, builds_path, token=seeded["api"],
                               body={"branch": "main", "commit": "abc123", "pipeline_ir": json.dumps(ir)})
        assert status == 201, created
        build_path = f"{builds_path}/{created['number']}"

        def jobs() -> list[dict[str, Any]]:
            return http("GET", server.url, f"{build_path}/jobs", token=seeded["api"])[1]["data"]

        wait_for(lambda: all(job["state"] == "running" for job in jobs()), 30, what="both jobs to run")
        time.sleep(2)

        cluster.stop()
        down_at = time.monotonic()
        status, refused = http("GET", server.url, build_path, token=seeded["api"])
        assert (status, refused["error"]["code"]) == (503, "database_unavailable"), refused
        status, refused = http("POST", server.url, "/api/v0/agent/register", token=seeded["agent"],
                               body={"name": "late"})
        assert (status, refused["error"]["code"]) == (503, "database_unavailable"), refused
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
        cluster.start()
        back_at = time.monotonic()
        wait_for(lambda: http("GET", server.url, build_path, token=seeded["api"])[0] == 200, 20,
                 what="the server to answer again")
        answering = time.monotonic() - back_at

        def logged_lines() -> int:
            return sum(len(http("GET", server.url, f"{build_path}/jobs/{job['id']}/log",
                                token=seeded["api"])[1].splitlines()) for job in jobs())

        before = logged_lines()
        wait_for(lambda: logged_lines() > before, 30, what="new output after the outage")
        logging_again = time.monotonic() - back_at
        print(f"database back: the server answers after {answering:.1f} s, new output stored after "
              f"{logging_again:.1f} s")

        def done() -> dict[str, Any] | None:
            build = http("GET", server.url, build_path, token=seeded["api"])[1]
            return build if build["state"] in ("passed", "failed", "canceled") else None

        build = wait_for(done, 60, what="the build to finish")
        finished_jobs = jobs()
        assert build["state"] == "passed", [(job["step_key"], job["state"], job.get("error_code"))
                                            for job in finished_jobs]
        for job in finished_jobs:
            log = http("GET", server.url, f"{build_path}/jobs/{job['id']}/log", token=seeded["api"])[1]
            assert [line for line in log.splitlines() if line.startswith("line-")] == \
                [f"line-{i}" for i in range(1, LINES + 1)], log[-500:]
    finally:
        agents.close()
        server.close()
        if reaper is not None:
            reaper.terminate()
            reaper.wait(timeout=10)
        try:
            cluster.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(cluster.base, ignore_errors=True)
        for name in ("server.log", "reaper.log"):
            if (base / name).exists():
                print(f"--- {name}\n" + (base / name).read_text(errors="replace")[-3000:])
