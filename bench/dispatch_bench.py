"""Dispatch throughput: real agents running 1,000 trivial jobs through the HTTP API (see bench/README.md).

One run: a fresh PostgreSQL database `harmont_bench_dispatch`; the production
server (gunicorn `harmont.asgi:application`, 2 uvicorn workers); N real agent
processes (`manage.py runagent`); builds of independent one-line jobs created
through the REST API. Two phases, 1,000 jobs each:

- burst: all builds created back to back, as fast as one REST client can. Jobs/s
  from the first build's creation to the last job's `passed` is the capacity.
- paced: one build every (jobs per build / --rate) seconds, i.e. jobs arriving at
  the target rate. Time from `scheduled` to claimed is then dispatch latency, not
  time spent queueing behind 999 jobs created in the same second.

All figures are read from the database (server timestamps), so agents, server and
this script share one clock.

Usage: .venv/bin/python bench/dispatch_bench.py [--agents 8] [--poll-interval 0.5] [--rate 100] [--keep]

The helpers above `# ---- dispatch` are generic (PostgreSQL, the ASGI server,
CPU accounting) and `bench/stream_bench.py` imports them; this module sets no
environment and touches no database at import.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
BASE_DIR = BENCH_DIR.parent
# Run as a script, Python puts bench/ first on sys.path, where settings.py and urls.py
# would shadow top-level modules; import from the project root instead.
sys.path[:] = [str(BASE_DIR)] + [p for p in sys.path if p and Path(p).resolve() != BENCH_DIR]

import psycopg
from psycopg import sql

from builds.agent.runner import stop_process_group
from bench.harness import (  # noqa: F401 (stream_bench imports some of these from here)
    PG_HOST,
    PG_PORT,
    PG_USER,
    admin_connect,
    busy_cpu_seconds,
    children_of,
    ensure_postgres,
    free_port,
    own_cpu_seconds,
    process_cpu,
    say,
    stat_fields,
)

WORKERS = 2  # uvicorn workers, as `make run` starts them (HARMONT_WORKERS default)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# ------------------------------------------------------------------ PostgreSQL


def drop_database(name: str) -> None:
    with admin_connect() as conn:
        # FORCE: a leftover server from an interrupted run must not keep the database alive.
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def create_database(name: str) -> None:
    drop_database(name)
    with admin_connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def db_xacts(name: str) -> int:
    """Transactions committed/rolled back in `name` so far (read via `postgres`, so this doesn't count)."""
    with admin_connect() as conn:
        row = conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                           (name,)).fetchone()
    return int(row[0]) if row else 0


def db_backend_pids(name: str, conn: psycopg.Connection | None = None) -> list[int]:
    """Backends connected to `name`; pass a kept-open `conn` when connection slots may run out."""
    query = "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
    if conn is not None:
        return [int(pid) for (pid,) in conn.execute(query, (name,)).fetchall()]
    with admin_connect() as own:
        return [int(pid) for (pid,) in own.execute(query, (name,)).fetchall()]


def configure_django(db_name: str, *, media_root: Path) -> dict[str, str]:
    """Point this process (and, through the returned environment, the server) at the scratch database.

    The production settings module, not bench.settings: nothing here needs the
    baseline route, and the server should be exactly what `make run` serves.
    """
    env = dict(os.environ)
    env.update({
        "DJANGO_SETTINGS_MODULE": "harmont.settings",
        "DATABASE_URL": f"postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/{db_name}",
        "HARMONT_SECRET_KEY": os.environ.get("HARMONT_SECRET_KEY") or secrets.token_urlsafe(50),
        "HARMONT_DEBUG": "0",  # DEBUG keeps every query in memory; never measure that
        # testserver: the in-process query counts go through django.test.Client.
        "HARMONT_ALLOWED_HOSTS": "127.0.0.1,localhost,testserver",
        "HARMONT_LOG_LEVEL": os.environ.get("HARMONT_LOG_LEVEL", "WARNING"),
        "HARMONT_MEDIA_ROOT": str(media_root),
        "PYTHONUNBUFFERED": "1",
    })
    os.environ.update(env)
    return env


# ------------------------------------------------------------------ the server and other processes


def start_server(port: int, log_path: Path, env: dict[str, str], *, workers: int = WORKERS,
                 config: Path | None = None) -> subprocess.Popen:
    """gunicorn + uvicorn workers on `harmont.asgi:application`, as harmont/run.py starts it, access log off.

    `config`: a gunicorn config file (only the benchmarks' experiments use one).
    """
    cmd = [sys.executable, "-m", "gunicorn", "harmont.asgi:application", "--worker-class",
           "uvicorn_worker.UvicornWorker", "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
           "--graceful-timeout", "5", "--log-level", "warning"] + (["-c", str(config)] if config else [])
    with log_path.open("w") as log:
        # Its own session: cleanup can kill the whole group (master and workers) at once.
        proc = subprocess.Popen(cmd, cwd=BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            stop_group(proc)
            raise RuntimeError(f"gunicorn did not answer /healthz in 30 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    # /healthz answered from one worker; wait until every worker is up, so none is still
    # importing Django during the first measurement.
    deadline = time.monotonic() + 30
    while len(children_of(proc.pid)) < workers and time.monotonic() < deadline:
        time.sleep(0.2)
    return proc


def stop_group(proc: subprocess.Popen, *, grace: float = 10.0) -> None:
    """SIGTERM the process group `proc` leads, SIGKILL it after `grace` seconds (as the agent stops commands)."""
    stop_process_group(proc, grace=grace)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def raise_on_sigterm() -> None:
    """SIGTERM (e.g. a CI timeout) runs the `finally` cleanups, like Ctrl-C does."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


# ------------------------------------------------------------------ CPU accounting
#
# This box has 2 cores and is shared. Each phase records the CPU seconds of the server,
# of the PostgreSQL backends of the scratch database, of the load (agents, clients,
# this script) and what everything else on the machine used meanwhile.


@dataclass
class CpuSnapshot:
    wall: float
    busy: float
    groups: dict[str, dict[int, float]]


class CpuMeter:
    """CPU seconds per named group of processes between two snapshots.

    `groups` maps a name to a function returning either (pids, include reaped children)
    or CPU seconds so far (a float, e.g. this process's rusage). A process that appears
    between the snapshots counts whole (it started in the window); one that vanished
    counts what it had at the first snapshot (not negative).
    """

    def __init__(self, groups: dict[str, Any]) -> None:
        self.groups = groups

    def snapshot(self) -> CpuSnapshot:
        taken: dict[str, dict[int, float]] = {}
        for name, source in self.groups.items():
            found = source()
            if isinstance(found, float):
                taken[name] = {0: found}
                continue
            pids, with_children = found
            taken[name] = {pid: cpu for pid in pids if (cpu := process_cpu(pid, with_children=with_children))
                           is not None}
        return CpuSnapshot(time.monotonic(), busy_cpu_seconds(), taken)

    @staticmethod
    def delta(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
        spent: dict[str, float] = {}
        for name, now in after.groups.items():
            then = before.groups.get(name, {})
            spent[name] = sum(max(0.0, cpu - then.get(pid, 0.0)) for pid, cpu in now.items())
        wall = after.wall - before.wall
        spent["_wall"] = wall
        spent["_capacity"] = wall * (os.cpu_count() or 1)
        measured = sum(v for k, v in spent.items() if not k.startswith("_"))
        spent["others"] = max(0.0, (after.busy - before.busy) - measured)
        return spent


def tree_pids(root: int) -> list[int]:
    """`root` and its descendants."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields:
                parents[int(entry.name)] = int(fields[1])
    found, frontier = [root], [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent:
                found.append(pid)
                frontier.append(pid)
    return found


# ---- dispatch ------------------------------------------------------------------------------------

DB_NAME = "harmont_bench_dispatch"
THROUGHPUT_TARGET = 100.0  # jobs/s end to end
CLAIM_P95_TARGET = 1.0  # seconds from scheduled to assigned
ORG_NAME, PIPELINE_NAME = "bench", "dispatch"
PROBE_ORG = "probe"  # a second organization whose jobs the in-process query counts claim


def definition(jobs: int, command: str) -> dict[str, Any]:
    """`jobs` independent one-line steps, in the graph form `hm.pipeline([...])` renders."""
    return {
        "version": "0",
        "timeout_seconds": 600,
        "graph": {
            "nodes": [{"step": {"key": f"job-{i:03d}", "label": f"job {i}", "cmd": command}, "env": {}}
                      for i in range(jobs)],
            "edges": [],
            "node_holes": [],
            "edge_property": "directed",
        },
    }


@dataclass(frozen=True)
class Seed:
    org: str
    pipeline: str
    api_token: str
    agent_token: str


def migrate_and_seed(jobs_per_build: int, command: str) -> tuple[Seed, Seed]:
    from django.core.management import call_command

    from organizations.services import (
        create_agent_token,
        create_organization,
        create_personal_token,
        create_user,
    )
    from pipelines.services import create_pipeline

    call_command("migrate", interactive=False, verbosity=0)
    user = create_user(email="bench@example.com", name="Bench User")
    api_token = create_personal_token(user=user, description="dispatch bench").raw
    seeds = []
    for name in (ORG_NAME, PROBE_ORG):
        org = create_organization(name=name, owner=user)
        # No repository: root jobs then start from an empty workspace (no source to fetch),
        # so what is measured is dispatch, not a clone per job.
        pipeline = create_pipeline(org=org, name=PIPELINE_NAME, repository="", repo_name=f"{name}/app",
                                   default_branch="main", definition=definition(jobs_per_build, command))
        agent_token = create_agent_token(organization=org, created_by=user, description="dispatch bench").raw
        seeds.append(Seed(org=org.slug, pipeline=pipeline.slug, api_token=api_token, agent_token=agent_token))
    return seeds[0], seeds[1]


def build_body(index: int, runs_file: Path) -> dict[str, Any]:
    return {"branch": "main", "commit": f"{index:040x}", "message": f"dispatch bench build {index}",
            "env": {"BENCH_RUNS_FILE": str(runs_file)}}


# ------------------------------------------------------------------ in-process cost of each agent call


@dataclass
class CallCost:
    name: str
    queries: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    sample_sql: list[str] = field(default_factory=list)


def shorten_sql(statement: str) -> str:
    import re

    statement = re.sub(r'"([a-z_]+)"\."([a-z_]+)"', r"\2", statement)
    cte = re.match(r"WITH \w+ AS \((UPDATE|INSERT INTO|DELETE FROM) \"?([a-z_]+)", statement)
    if cte:  # a data-modifying WITH: what it changes, then what it reads
        read = re.findall(r"FROM \"?([a-z_]+)", statement.split("RETURNING", 1)[-1])
        tables = [t for t in read if t != "ended"]
        return f"WITH ({cte.group(1).split()[0]} {cte.group(2)}) SELECT {', '.join(dict.fromkeys(tables)) or '?'}"
    match = re.match(r"(SELECT|UPDATE|INSERT|DELETE|SAVEPOINT|RELEASE)\b(.*)", statement, re.DOTALL)
    if not match:
        return statement[:80]
    verb, rest = match.groups()
    if verb in ("SAVEPOINT", "RELEASE"):
        return verb
    table = re.search(r'(?:FROM|UPDATE|INTO)\s+"?([a-z_]+)"?', statement)
    tail = " FOR UPDATE" + (" SKIP LOCKED" if "SKIP LOCKED" in statement else "") if "FOR UPDATE" in statement else ""
    joins = re.findall(r'JOIN "?([a-z_]+)"?', rest)
    return f"{verb} {table.group(1) if table else '?'}" + (f" (+{','.join(joins)})" if joins else "") + tail


def measure_agent_calls(probe: Seed, jobs_per_build: int, runs_file: Path) -> dict[str, CallCost]:
    """Queries and in-process time of create-build, claim, start, finish (and an idle claim).

    Goes through the full middleware and DRF stack with django.test.Client, against the
    probe organization (its own agent token), so the measured agents never see these jobs.
    The first build's jobs go as an agent coming back from idle does them (claim, start,
    finish); the others as a busy agent does (start, then a finish that claims the next job).
    """
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client()
    costs = {name: CallCost(name) for name in ("create build (REST)", "claim (200)", "start", "finish",
                                               "finish + next claim", "claim (204, idle)")}

    def call(name: str, path: str, token: str, body: dict[str, Any] | None = None, expect: int = 200) -> Any:
        with CaptureQueriesContext(connection) as captured:
            began = time.perf_counter()
            response = client.post(path, data=json.dumps(body or {}), content_type="application/json",
                                   HTTP_AUTHORIZATION=f"Bearer {token}")
            elapsed = time.perf_counter() - began
        if response.status_code != expect:
            raise RuntimeError(f"in-process {path} -> {response.status_code} {response.content[:300]!r}")
        cost = costs[name]
        cost.queries.append(len(captured.captured_queries))
        cost.seconds.append(elapsed)
        if not cost.sample_sql:
            cost.sample_sql = [shorten_sql(q["sql"]) for q in captured.captured_queries]
        return response.json() if response.content else None

    builds_path = f"/api/v0/organizations/{probe.org}/pipelines/{probe.pipeline}/builds"
    for i in range(3):
        call("create build (REST)", builds_path, probe.api_token, build_body(i, runs_file), expect=201)
    register = client.post("/api/v0/agent/register", data=json.dumps({"name": "probe-agent"}),
                           content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {probe.agent_token}")
    session = register.json()["session_token"]
    handed_over = None
    for i in range(3 * jobs_per_build):
        busy = i >= jobs_per_build
        claimed = handed_over or call("claim (200)", "/api/v0/agent/claim", session)
        job_id, job_token = claimed["job"]["id"], claimed["job_token"]
        call("start", f"/api/v0/agent/jobs/{job_id}/start", job_token, {"agent_name": "probe-agent"})
        # What a real agent sends for a silent command: two meta lines riding on the finish.
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        chunks = [{"seq": 1, "stream_kind": 2, "content": "harmont-agent: running job on probe-agent\n", "ts": now},
                  {"seq": 2, "stream_kind": 2, "content": "harmont-agent: exit status 0\n", "ts": now}]
        answer = call("finish + next claim" if busy else "finish", f"/api/v0/agent/jobs/{job_id}/finish", job_token,
                      {"exit_code": 0, "chunks": chunks, "claim_next": busy})
        handed_over = answer.get("next")
    for _ in range(5):
        call("claim (204, idle)", "/api/v0/agent/claim", session, expect=204)
    return costs


# ------------------------------------------------------------------ diagnostics


class ActivitySampler:
    """Samples pg_stat_activity of one database every `interval` s, in a thread.

    Counts, per sample, the backends running a statement, waiting for a lock held by
    another transaction, and idle inside an open transaction (the app holds its locks
    while doing Python work or waiting for the CPU). Averages say how many
    transactions were in each condition at any moment. For lock waits it also records
    which table's row is waited for: a row-lock waiter holds or awaits a `tuple` lock
    on the contended row's table (pg_locks), named through `relations` (oid -> name,
    read once from the bench database, since this sampler sits in `postgres`).
    """

    def __init__(self, db_name: str, relations: dict[int, str], interval: float = 0.05) -> None:
        self.db_name, self.relations, self.interval = db_name, relations, interval
        self.samples = 0
        self.counts: Counter = Counter()
        self.lock_tables: Counter = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ActivitySampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        with admin_connect() as conn:
            while not self._stop.wait(self.interval):
                rows = conn.execute(
                    "SELECT a.state, a.wait_event_type, (SELECT array_agg(l.relation::bigint) FROM pg_locks l "
                    "WHERE l.pid = a.pid AND l.locktype = 'tuple') FROM pg_stat_activity a "
                    "WHERE a.datname = %s AND a.pid <> pg_backend_pid()", (self.db_name,)).fetchall()
                self.samples += 1
                for state, wait_type, tuple_relations in rows:
                    if state == "active" and wait_type == "Lock":
                        self.counts["lock wait"] += 1
                        names = sorted({self.relations.get(r, str(r)) for r in tuple_relations or []})
                        self.lock_tables[", ".join(names) or "(no tuple lock yet)"] += 1
                    elif state == "active":
                        self.counts["active"] += 1
                    elif state and state.startswith("idle in transaction"):
                        self.counts["idle in transaction"] += 1

    def mean(self, key: str) -> float:
        return self.counts[key] / self.samples if self.samples else 0.0


def table_oids() -> dict[int, str]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT oid::bigint, relname FROM pg_class WHERE relkind = 'r' AND relnamespace = "
                       "'public'::regnamespace")
        return {int(oid): name for oid, name in cursor.fetchall()}


def measure_spawn(work: Path, runs: int = 40) -> tuple[float, float]:
    """p50 wall ms and CPU ms (this process + child) of the agent's way of running a command.

    Same call as `Agent._execute`: `bash -c` in a new session with both pipes, read to
    the end, waited for. No server involved.
    """
    target = work / "spawn-runs.txt"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "BENCH_RUNS_FILE": str(target), "HARMONT_JOB_ID": "x"}
    walls = []
    cpu_before = own_cpu_seconds()
    for _ in range(runs):
        began = time.perf_counter()
        process = subprocess.Popen(["bash", "-c", 'echo "$HARMONT_JOB_ID" >> "$BENCH_RUNS_FILE"'], cwd=work, env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True)
        process.communicate()
        walls.append(time.perf_counter() - began)
    return percentile(walls, 50) * 1000, (own_cpu_seconds() - cpu_before) * 1000 / runs


def measure_http_stack(port: int, server_pid: int, path: str = "/api/v0/ping",
                       seconds: float = 4.0) -> tuple[float, float] | None:
    """Server CPU ms per request and req/s for `GET path` (ping: no auth, no query), wrk -c8.

    Every agent call pays this fixed cost (uvicorn's pure-Python HTTP parser, the ASGI
    to WSGI hop through a2wsgi's thread pool, Django's middleware, DRF) before any work.
    """
    if not shutil.which("wrk"):
        return None
    url = f"http://127.0.0.1:{port}{path}"
    subprocess.run(["wrk", "-t2", "-c8", "-d1s", url], capture_output=True, check=True)  # warm-up
    pids = tree_pids(server_pid)
    before = {pid: process_cpu(pid) or 0.0 for pid in pids}
    out = subprocess.run(["wrk", "-t2", "-c8", f"-d{seconds:.0f}s", url], capture_output=True, text=True,
                         check=True).stdout
    spent = sum((process_cpu(pid) or 0.0) - before[pid] for pid in pids)
    total = int(out.split(" requests in")[0].split()[-1])
    rps = float(out.split("Requests/sec:")[1].split()[0])
    return spent * 1000 / max(total, 1), rps


# ------------------------------------------------------------------ agents


@dataclass
class AgentProc:
    name: str
    process: subprocess.Popen
    log_path: Path


# Experiments, not the product: a gunicorn `post_worker_init` hook (a config file in the
# run's temp dir) replaces functions in every worker, to measure what a change to the
# server would buy before it is made. bench/stream_bench.py has a table of them
# (`--server-experiment`); the dispatch changes they measured here are in the code now.


def wait_for_experiment(log_path: Path, workers: int = WORKERS, timeout: float = 30) -> None:
    """Every worker prints a marker once its post_worker_init applied the experiment."""
    deadline = time.monotonic() + timeout
    while (applied := log_path.read_text().count("harmont-bench experiment applied")) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server experiment was applied in {applied} of {workers} workers:\n"
                               f"{log_path.read_text()[-2000:]}")
        time.sleep(0.2)


def experiment_config(names: list[str], table: dict[str, str]) -> str:
    """A gunicorn config file whose post_worker_init applies the named experiments and says so."""
    body = "".join(table[name] for name in names)
    marker = ("\n    import os, sys\n    print(f'harmont-bench experiment applied in pid {os.getpid()}', "
              "file=sys.stderr, flush=True)\n")
    return f"def post_worker_init(worker):\n{body}{marker}"


def start_agents(count: int, *, server: str, token: str, poll_interval: float, work: Path,
                 env: dict[str, str]) -> list[AgentProc]:
    agents = []
    # The agent needs no Django settings or database; give it none, as on a separate machine.
    agent_env = {k: v for k, v in env.items() if k not in ("DATABASE_URL", "HARMONT_SECRET_KEY")}
    for i in range(1, count + 1):
        name = f"bench-agent-{i}"
        log_path = work / f"{name}.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [sys.executable, "manage.py", "runagent", "--server", server, "--token", token, "--name", name,
                 "--workdir", str(work / name), "--poll-interval", str(poll_interval)],
                cwd=BASE_DIR, env=agent_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own group: cleanup kills it and anything it left behind
            )
        agents.append(AgentProc(name, process, log_path))
    return agents


def stop_agents(agents: list[AgentProc]) -> None:
    # First SIGTERM: the agent stops claiming, finishes its job, disconnects, exits 0.
    for agent in agents:
        if agent.process.poll() is None:
            try:
                agent.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    for agent in agents:
        try:
            agent.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for agent in agents:
        try:
            os.killpg(agent.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            agent.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def wait_for_agents(org_slug: str, count: int, agents: list[AgentProc], timeout: float = 30) -> None:
    from builds.models import Agent

    deadline = time.monotonic() + timeout
    while True:
        registered = Agent.objects.filter(organization__slug=org_slug, stopped_at__isnull=True).count()
        if registered >= count:
            return
        dead = [a for a in agents if a.process.poll() is not None]
        if dead or time.monotonic() > deadline:
            tails = "\n".join(f"--- {a.name}:\n{a.log_path.read_text()[-1500:]}" for a in (dead or agents[:2]))
            raise RuntimeError(f"only {registered} of {count} agents registered\n{tails}")
        time.sleep(0.2)


# ------------------------------------------------------------------ one phase


@dataclass
class Phase:
    name: str
    builds: int
    jobs_per_build: int
    interval: float  # seconds between build creations (0: back to back)
    numbers: list[int] = field(default_factory=list)
    create_seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    xacts: int = 0
    load_before: str = ""
    load_after: str = ""
    activity: dict[str, float] = field(default_factory=dict)
    lock_queries: list[tuple[str, int]] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def jobs(self) -> int:
        return self.builds * self.jobs_per_build


def create_builds(phase: Phase, *, port: int, seed: Seed, runs_file: Path, first_index: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    path = f"/api/v0/organizations/{seed.org}/pipelines/{seed.pipeline}/builds"
    headers = {"Authorization": f"Bearer {seed.api_token}", "Content-Type": "application/json"}
    began = time.monotonic()
    try:
        for i in range(phase.builds):
            if phase.interval:
                delay = began + i * phase.interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            conn.request("POST", path, body=json.dumps(build_body(first_index + i, runs_file)), headers=headers)
            response = conn.getresponse()
            data = response.read()
            if response.status != 201:
                raise RuntimeError(f"POST {path} -> {response.status} {data[:300]!r}")
            phase.numbers.append(json.loads(data)["number"])
    finally:
        conn.close()
    phase.create_seconds = time.monotonic() - began


def wait_until_done(phase: Phase, seed: Seed, agents: list[AgentProc], timeout: float) -> None:
    from builds.models import Job
    from builds.states import TERMINAL_JOB_STATES

    deadline = time.monotonic() + timeout
    jobs = Job.objects.filter(build__pipeline__organization__slug=seed.org, build__number__in=phase.numbers)
    while True:
        left = jobs.exclude(state__in=TERMINAL_JOB_STATES).count()
        if left == 0:
            return
        dead = [a for a in agents if a.process.poll() is not None]
        if dead:
            raise RuntimeError(f"agent {dead[0].name} exited with {dead[0].process.returncode}:\n"
                               f"{dead[0].log_path.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"phase {phase.name}: {left} jobs still unfinished after {timeout:.0f} s")
        time.sleep(0.1)


def analyse(phase: Phase, seed: Seed, runs: Counter) -> None:
    """Throughput, latencies and the exactly-once checks, from the database and the runs file."""
    from builds.models import Build, Job, JobState, LogChunk

    builds = Build.objects.filter(pipeline__organization__slug=seed.org, number__in=phase.numbers)
    rows = list(Job.objects.filter(build__in=builds).values_list(
        "id", "state", "exit_code", "agent_id", "scheduled_at", "assigned_at", "started_at", "finished_at"))
    first_created = min(builds.values_list("created_at", flat=True))
    last_finished = max(r[7] for r in rows)
    last_scheduled = max(r[4] for r in rows)
    span = (last_finished - first_created).total_seconds()
    claim = [(r[5] - r[4]).total_seconds() for r in rows]
    start = [(r[6] - r[5]).total_seconds() for r in rows]
    run = [(r[7] - r[6]).total_seconds() for r in rows]
    cycle: list[float] = []
    by_agent: dict[Any, list[tuple]] = {}
    for r in rows:
        by_agent.setdefault(r[3], []).append(r)
    for jobs in by_agent.values():
        jobs.sort(key=lambda r: r[5])
        # Agent's time from one claim to its next claim, while the queue was never empty.
        cycle += [(b[5] - a[5]).total_seconds() for a, b in zip(jobs, jobs[1:]) if b[4] <= a[7]]
    ids = [str(r[0]) for r in rows]
    ran = [runs.get(job_id, 0) for job_id in ids]
    starts = Counter(LogChunk.objects.filter(job__build__in=builds, stream_kind=2,
                                             content__startswith="harmont-agent: running ").values_list(
                                                 "job_id", flat=True))
    phase.result = {
        "jobs": len(rows),
        "span": span,
        "jobs_per_s": len(rows) / span if span else 0.0,
        "arrival_span": (last_scheduled - first_created).total_seconds(),
        "claim": claim, "start": start, "run": run, "cycle": cycle,
        "passed": sum(1 for r in rows if r[1] == JobState.PASSED and r[2] == 0),
        "ran_once": sum(1 for n in ran if n == 1),
        "ran_twice": sum(1 for n in ran if n > 1),
        "never_ran": sum(1 for n in ran if n == 0),
        "one_start_line": sum(1 for r in rows if starts.get(r[0], 0) == 1),
        "agents_used": len(by_agent),
        "builds_passed": builds.filter(state="passed").count(),
        "builds": builds.count(),
    }


def read_runs(path: Path) -> Counter:
    if not path.exists():
        return Counter()
    return Counter(line.strip() for line in path.read_text().splitlines() if line.strip())


# ------------------------------------------------------------------ report


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def cpu_per_job(phase: Phase) -> float:
    """CPU seconds per job of everything taking part (server, PostgreSQL, agents, this script)."""
    return sum(phase.cpu[name] for name in ("server", "db", "agents", "self")) / phase.jobs


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL  <<<"


def report(phases: list[Phase], costs: dict[str, CallCost], args: argparse.Namespace, conn_max_age: Any, *,
           stack: tuple[float, float] | None, spawn: tuple[float, float]) -> bool:
    say()
    say(f"Harmont dispatch bench, {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs, PostgreSQL "
        f"{PG_HOST}:{PG_PORT}/{DB_NAME}")
    say(f"server: gunicorn harmont.asgi:application, {WORKERS} uvicorn workers (REST via a2wsgi threads), "
        f"CONN_MAX_AGE={conn_max_age}, access log off")
    say(f"agents: {args.agents} x `manage.py runagent --poll-interval {args.poll_interval}`; jobs: "
        f"{args.builds} builds x {args.jobs_per_build} independent jobs per phase, cmd {args.command!r}")
    say()
    head = f"  {'':<44}" + "".join(f"{p.name:>14}" for p in phases)
    say(head)

    def row(label: str, cells: list[str]) -> None:
        say(f"  {label:<44}" + "".join(f"{c:>14}" for c in cells))

    row("builds created in (s)", [f"{p.create_seconds:.2f}" for p in phases])
    row("jobs created per s (offered)", [f"{p.jobs / max(p.result['arrival_span'], 1e-9):.0f}"
                                         if p.result["arrival_span"] > 0.05 else "burst" for p in phases])
    row("first build created -> last job passed (s)", [f"{p.result['span']:.2f}" for p in phases])
    row("jobs/s end to end", [f"{p.result['jobs_per_s']:.1f}" for p in phases])
    for q in (50, 95):
        row(f"claim latency p{q} (scheduled -> assigned, ms)", [ms(percentile(p.result["claim"], q)) for p in phases])
    row("claim latency max (ms)", [ms(max(p.result["claim"])) for p in phases])
    row("assigned -> running p50 (ms)", [ms(percentile(p.result["start"], 50)) for p in phases])
    row("running -> passed p50 (ms)", [ms(percentile(p.result["run"], 50)) for p in phases])
    row("agent cycle claim -> next claim p50 (ms)",
        [ms(percentile(p.result["cycle"], 50)) if p.result["cycle"] else "-" for p in phases])
    row("jobs passed (exit 0)", [f"{p.result['passed']}/{p.result['jobs']}" for p in phases])
    row("jobs whose command ran exactly once", [f"{p.result['ran_once']}/{p.result['jobs']}" for p in phases])
    row("  ran twice or more / never", [f"{p.result['ran_twice']} / {p.result['never_ran']}" for p in phases])
    row("builds passed", [f"{p.result['builds_passed']}/{p.result['builds']}" for p in phases])
    row("agents that ran jobs", [f"{p.result['agents_used']}/{args.agents}" for p in phases])
    say()
    say("CPU during each phase (ms per job; share of the 2 cores in brackets):")
    for name, label in (("server", "server (gunicorn master + 2 workers)"), ("db", "PostgreSQL backends"),
                        ("agents", "agents (incl. their bash children)"), ("self", "this script (REST client)"),
                        ("others", "other processes on the machine")):
        row(label, [f"{p.cpu[name] * 1000 / p.jobs:.1f} ({p.cpu[name] / p.cpu['_capacity']:.0%})"
                    for p in phases])
    row("machine idle", [f"{max(0.0, 1 - sum(v for k, v in p.cpu.items() if not k.startswith('_')) / p.cpu['_capacity']):.0%}"
                         for p in phases])
    row("CPU per job, all of the above but others (ms)", [f"{cpu_per_job(p) * 1000:.1f}" for p in phases])
    row("=> CPU ceiling: 2 cores / CPU per job (jobs/s)", [f"{(os.cpu_count() or 1) / cpu_per_job(p):.0f}"
                                                          for p in phases])
    row("=> agent ceiling: agents / cycle p50 (jobs/s)",
        [f"{args.agents / percentile(p.result['cycle'], 50):.0f}" if p.result["cycle"] else "-" for p in phases])
    row("database transactions per job", [f"{p.xacts / p.jobs:.1f}" for p in phases])
    row("load average before / after", [f"{p.load_before.split()[0]} / {p.load_after.split()[0]}" for p in phases])
    row("PostgreSQL: statements running (mean)", [f"{p.activity['active']:.2f}" for p in phases])
    row("PostgreSQL: waiting for a row lock (mean)", [f"{p.activity['lock wait']:.2f}" for p in phases])
    row("PostgreSQL: idle in transaction (mean)", [f"{p.activity['idle in transaction']:.2f}" for p in phases])
    for p in phases:
        if p.lock_queries:
            total = sum(n for _, n in p.lock_queries) or 1
            waits = "; ".join(f"{table} {n / total:.0%}" for table, n in p.lock_queries)
            say(f"  {p.name}: lock waits by the table of the awaited row: {waits}")
    say()
    say("Fixed costs, measured after the phases:")
    if stack:
        say(f"  HTTP stack, GET /api/v0/ping (no auth, no query), wrk -c8: {stack[0]:.2f} ms server CPU per "
            f"request ({stack[1]:.0f} req/s); a busy agent makes 2 requests per job")
    say(f"  the agent's spawn of `bash -c` (Popen, new session, two pipes, wait): {spawn[0]:.1f} ms wall, "
        f"{spawn[1]:.1f} ms CPU")
    say()
    say("Per call, in-process through the full middleware stack (django.test.Client, no HTTP, no contention):")
    say(f"  {'call':<24} {'queries':>8} {'ms p50':>8}")
    for cost in costs.values():
        say(f"  {cost.name:<24} {statistics.median(cost.queries):8.0f} {percentile(cost.seconds, 50) * 1000:8.2f}")
    busy = ("start", "finish + next claim")
    per_job = sum(statistics.median(costs[n].queries) for n in busy)
    per_job_ms = sum(percentile(costs[n].seconds, 50) for n in busy) * 1000
    say(f"  {'start + finish/claim':<24} {per_job:8.0f} {per_job_ms:8.2f}   (one job of a busy agent, server side, "
        f"no HTTP/ASGI overhead)")
    if args.show_queries:
        for cost in costs.values():
            say(f"  {cost.name}:")
            for line in cost.sample_sql:
                say(f"      {line}")
    say()
    burst = next((p for p in phases if p.name == "burst"), None)
    paced = next((p for p in phases if p.name == "paced"), None)
    ok = True
    say("Targets:")
    if burst:
        value = burst.result["jobs_per_s"]
        ok &= value >= THROUGHPUT_TARGET
        say(f"  jobs/s end to end (burst phase)            {value:7.1f}   target >= {THROUGHPUT_TARGET:.0f}   "
            f"{verdict(value >= THROUGHPUT_TARGET)}")
    if paced:
        value = percentile(paced.result["claim"], 95)
        ok &= value <= CLAIM_P95_TARGET
        say(f"  claim latency p95 (paced at {args.rate:.0f} jobs/s, ms)  {value * 1000:7.0f}   target <= "
            f"{CLAIM_P95_TARGET * 1000:.0f}  {verdict(value <= CLAIM_P95_TARGET)}")
    exact = all(p.result["ran_once"] == p.jobs and p.result["passed"] == p.jobs for p in phases)
    say(f"  every job ran exactly once and passed      {'yes' if exact else 'NO'}"
        f"{'':>22}{verdict(exact)}")
    noisy = max(p.cpu["others"] / p.cpu["_capacity"] for p in phases)
    if noisy > 0.15:
        say(f"  WARNING: other processes used up to {noisy:.0%} of the CPUs during a phase; the figures above are")
        say("  disturbed. CPU ms per job is less affected than jobs/s.")
    return ok and exact


# ------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=8, help="agent processes (default 8)")
    parser.add_argument("--poll-interval", type=float, default=0.5,
                        help="the agents' --poll-interval when idle (default 0.5 s)")
    parser.add_argument("--builds", type=int, default=50, help="builds per phase (default 50)")
    parser.add_argument("--jobs-per-build", type=int, default=20, help="independent jobs per build (default 20)")
    parser.add_argument("--rate", type=float, default=THROUGHPUT_TARGET,
                        help="jobs/s offered in the paced phase (default 100, the throughput target)")
    parser.add_argument("--phases", default="burst,paced", help="comma list of burst, paced (default both)")
    parser.add_argument("--command", default='echo "$HARMONT_JOB_ID" >> "$BENCH_RUNS_FILE"',
                        help="each job's cmd; the default appends the job id to a file (a bash builtin, as "
                             "cheap as `true`) so the script can prove every job ran exactly once")
    parser.add_argument("--show-queries", action="store_true", help="print the SQL of each agent call")
    parser.add_argument("--keep", action="store_true", help=f"keep the {DB_NAME} database afterwards")
    args = parser.parse_args()
    names = [n.strip() for n in args.phases.split(",") if n.strip()]
    if not names or any(n not in ("burst", "paced") for n in names):
        parser.error("--phases takes burst and/or paced")

    raise_on_sigterm()
    ensure_postgres()
    work = Path(tempfile.mkdtemp(prefix="harmont-dispatch-"))
    runs_file = work / "runs.txt"
    create_database(DB_NAME)
    server: subprocess.Popen | None = None
    agents: list[AgentProc] = []
    try:
        env = configure_django(DB_NAME, media_root=work / "media")
        import django

        django.setup()
        from django.conf import settings
        from django.db import connections

        say(f"load average at start: {loadavg()}")
        seed, probe = migrate_and_seed(args.jobs_per_build, args.command)
        costs = measure_agent_calls(probe, args.jobs_per_build, work / "probe-runs.txt")
        conn_max_age = settings.DATABASES["default"].get("CONN_MAX_AGE")
        relations = table_oids()
        connections.close_all()

        port = free_port()
        server = start_server(port, work / "gunicorn.log", env)
        base = f"http://127.0.0.1:{port}"
        say(f"server on {base}; starting {args.agents} agents (poll interval {args.poll_interval} s)")
        agents = start_agents(args.agents, server=base, token=seed.agent_token, poll_interval=args.poll_interval,
                              work=work, env=env)
        wait_for_agents(seed.org, args.agents, agents)
        time.sleep(1.0)  # let every agent reach its idle poll loop

        meter = CpuMeter({
            "server": lambda: (tree_pids(server.pid), False),
            "db": lambda: (db_backend_pids(DB_NAME), False),
            "agents": lambda: ([a.process.pid for a in agents], True),
            "self": own_cpu_seconds,
        })
        phases: list[Phase] = []
        index = 0
        for name in names:
            interval = 0.0 if name == "burst" else args.jobs_per_build / args.rate
            phase = Phase(name, args.builds, args.jobs_per_build, interval)
            phase.load_before = loadavg()
            time.sleep(1.1)  # PostgreSQL flushes a backend's statistics at most once a second
            xacts = db_xacts(DB_NAME)
            before = meter.snapshot()
            with ActivitySampler(DB_NAME, relations) as activity:
                create_builds(phase, port=port, seed=seed, runs_file=runs_file, first_index=index)
                index += phase.builds
                wait_until_done(phase, seed, agents, timeout=max(120.0, phase.jobs * 0.5))
            phase.cpu = CpuMeter.delta(before, meter.snapshot())
            phase.activity = {key: activity.mean(key) for key in ("active", "lock wait", "idle in transaction")}
            phase.lock_queries = activity.lock_tables.most_common(3)
            time.sleep(1.1)
            phase.xacts = db_xacts(DB_NAME) - xacts
            phase.load_after = loadavg()
            analyse(phase, seed, read_runs(runs_file))
            say(f"  phase {name}: {phase.jobs} jobs, {phase.result['jobs_per_s']:.1f} jobs/s end to end, claim p95 "
                f"{percentile(phase.result['claim'], 95) * 1000:.0f} ms (load {phase.load_after})")
            phases.append(phase)
            time.sleep(1.0)
        stack = measure_http_stack(port, server.pid)
        stop_agents(agents)
        spawn = measure_spawn(work)
        report(phases, costs, args, conn_max_age, stack=stack, spawn=spawn)
    except BaseException:
        log = work / "gunicorn.log"
        if log.exists() and log.stat().st_size:
            say(f"--- gunicorn log (last lines) ---\n{log.read_text()[-3000:]}")
        raise
    finally:
        stop_agents(agents)
        if server is not None:
            stop_group(server)
        try:
            from django.db import connections

            connections.close_all()
        except Exception:  # noqa: BLE001 (Django may not have been set up)
            pass
        shutil.rmtree(work, ignore_errors=True)
        if args.keep:
            say(f"kept database {DB_NAME}")
        else:
            drop_database(DB_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
