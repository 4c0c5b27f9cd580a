"""API throughput against a same-run baseline: `make bench` (see bench/README.md).

One run: a fresh PostgreSQL database `harmont_bench` with 10,000 builds in one
pipeline, gunicorn (2 sync workers) serving the app with `bench.settings`, and
wrk (or a small Python fallback) measuring four endpoints, interleaved, twice.
Absolute req/s drift between runs and machines, so every figure is printed as a
ratio to the baseline measured by the same run against the same server.

Usage: .venv/bin/python bench/api_bench.py [--keep] [--duration S] [--warmup S] [--python-load]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
BASE_DIR = BENCH_DIR.parent
# Run as a script, Python puts bench/ first on sys.path, where settings.py and
# urls.py would shadow any top-level `settings`/`urls`; import from the project root instead.
sys.path[:] = [str(BASE_DIR)] + [p for p in sys.path if p and Path(p).resolve() != BENCH_DIR]

from bench.cpu import busy_cpu_seconds, children_of, own_cpu_seconds, process_cpu  # noqa: E402
from bench.harness import PG_HOST, PG_PORT, PG_USER, admin_connect, ensure_postgres, free_port, say  # noqa: E402

DB_NAME = "harmont_bench"
DATABASE_URL = f"postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/{DB_NAME}"

BUILDS = 10_000
BATCH = 2_000
DEEP = 9_000  # the deep page starts after skipping this many builds (newest first)
MIDDLE = BUILDS // 2
CONNECTIONS, THREADS, WORKERS = 8, 2, 2
GET_BUILD_TARGET = 0.6  # GET build >= 0.6 x baseline
DEEP_PAGE_TARGET = 0.9  # deep page >= 0.9 x first page

# Settings are read from the environment at import, so this comes before Django.
os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"
os.environ["DATABASE_URL"] = DATABASE_URL
os.environ["HARMONT_SECRET_KEY"] = os.environ.get("HARMONT_SECRET_KEY") or secrets.token_urlsafe(50)
os.environ["HARMONT_DEBUG"] = "0"  # DEBUG keeps every query in memory; never measure that
os.environ["HARMONT_ALLOWED_HOSTS"] = "127.0.0.1,localhost"  # what the load and the checks send
os.environ.setdefault("HARMONT_LOG_LEVEL", "WARNING")

from psycopg import sql  # noqa: E402


# A small stored definition of the shape `hm.pipeline([...])` renders: a -> b, c after a.
DEFINITION: dict[str, Any] = {
    "version": "0",
    "timeout_seconds": 600,
    "graph": {
        "nodes": [
            {"step": {"key": "setup", "cmd": "make deps", "label": "setup", "image": "python:3.11"}, "env": {}},
            {"step": {"key": "test", "cmd": "make test", "label": "test"}, "env": {"CI": "1"}},
            {"step": {"key": "lint", "cmd": "make lint", "label": "lint", "timeout_seconds": 120}, "env": {}},
        ],
        "edges": [[0, 1, "builds_in"], [0, 2, "depends_on"]],
        "node_holes": [],
        "edge_property": "directed",
    },
}
BRANCHES = ["main"] * 5 + ["develop", "release/1.x"] + [f"feature/topic-{i}" for i in range(13)]


# ------------------------------------------------------------------ database


def drop_database() -> None:
    with admin_connect() as conn:
        # FORCE: a leftover gunicorn from an interrupted run must not keep the database alive.
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB_NAME)))


def create_database() -> None:
    drop_database()
    with admin_connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB_NAME)))


def db_counters() -> tuple[int, int]:
    """(transactions, sessions) of the bench database so far; every autocommit statement is a transaction.

    Read through the `postgres` database, so reading does not count itself.
    """
    with admin_connect() as conn:
        row = conn.execute("SELECT xact_commit + xact_rollback, sessions FROM pg_stat_database WHERE datname = %s",
                           (DB_NAME,)).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


# ------------------------------------------------------------------ seeding (in-process Django)


@dataclass(frozen=True)
class Seed:
    org: str
    pipeline: str
    token: str
    middle_build_id: str


def migrate_and_seed() -> Seed:
    from django.core.management import call_command
    from django.db import connection, transaction
    from django.utils import timezone

    from builds.models import Build, BuildSource, BuildState
    from organizations.services import create_organization, create_personal_token, create_user
    from pipelines.models import Pipeline
    from pipelines.services import create_pipeline

    call_command("migrate", interactive=False, verbosity=0)
    user = create_user(email="bench@example.com", name="Bench User")
    org = create_organization(name="bench", owner=user)
    pipeline = create_pipeline(org=org, name="app", repository="https://example.com/bench/app.git",
                               default_branch="main", definition=DEFINITION)
    token = create_personal_token(user=user, description="bench").raw

    start = timezone.now() - timedelta(minutes=BUILDS)
    finished = [BuildState.PASSED] * 7 + [BuildState.FAILED, BuildState.FAILED, BuildState.CANCELED]

    def build(number: int) -> Build:
        created = start + timedelta(minutes=number)
        # The newest few are still queued or running, like a live pipeline.
        if number > BUILDS - 3:
            state = BuildState.SCHEDULED
        elif number > BUILDS - 6:
            state = BuildState.RUNNING
        else:
            state = finished[(number * 7) % len(finished)]
        done = state not in (BuildState.SCHEDULED, BuildState.RUNNING)
        return Build(
            pipeline=pipeline, number=number, state=state, branch=BRANCHES[(number * 11) % len(BRANCHES)],
            commit=hashlib.sha1(str(number).encode()).hexdigest(), message=f"Change number {number}",
            source=BuildSource.WEBHOOK if number % 3 else BuildSource.API, env={"BENCH": "1"},
            # create_build stores the IR it planned from on every build; so do we, for realistic rows.
            pipeline_ir=DEFINITION, timeout_seconds=600, created_by=user, created_at=created,
            scheduled_at=created, started_at=None if state == BuildState.SCHEDULED else created + timedelta(seconds=5),
            finished_at=created + timedelta(seconds=95) if done else None,
        )

    with transaction.atomic():
        for first in range(1, BUILDS + 1, BATCH):
            Build.objects.bulk_create([build(n) for n in range(first, min(first + BATCH, BUILDS + 1))])
        Pipeline.objects.filter(pk=pipeline.pk).update(build_counter=BUILDS)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    middle = Build.objects.get(pipeline=pipeline, number=MIDDLE)
    return Seed(org=org.slug, pipeline=pipeline.slug, token=token, middle_build_id=str(middle.id))


# ------------------------------------------------------------------ what is measured


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    path: str
    authenticated: bool


def targets_for(seed: Seed) -> list[Target]:
    from harmont.pagination import encode_cursor

    builds = f"/api/v0/organizations/{seed.org}/pipelines/{seed.pipeline}/builds"
    # Newest first: after skipping DEEP builds the page starts at number BUILDS - DEEP,
    # i.e. its cursor is the key just above that. Encoded by the app's own codec.
    deep_cursor = encode_cursor(BUILDS - DEEP + 1)
    return [
        Target("a", "baseline (DRF, 1 row, no auth)", f"/bench/baseline/{seed.middle_build_id}", False),
        Target("b", f"GET build #{MIDDLE}", f"{builds}/{MIDDLE}", True),
        Target("c", "build list, first page", builds, True),
        Target("d", f"build list, {DEEP:,} deep", f"{builds}?cursor={deep_cursor}", True),
    ]


def check_body(target: Target, body: Any) -> str:
    """What the response shows, or an exception if it is not what the target is meant to measure."""
    if target.key in ("a", "b"):
        if body.get("number") != MIDDLE:
            raise RuntimeError(f"{target.label}: expected build {MIDDLE}, got {body!r:.200}")
        return f"build #{body['number']}"
    numbers = [item["number"] for item in body["data"]]
    expected_first = BUILDS if target.key == "c" else BUILDS - DEEP
    if len(numbers) != 50 or abs(numbers[0] - expected_first) > 1 or not body.get("next_cursor"):
        raise RuntimeError(f"{target.label}: expected 50 builds from #{expected_first}, got {numbers[:3]}...")
    return f"{len(numbers)} builds, #{numbers[0]}..#{numbers[-1]}"


def count_queries(targets: list[Target], token: str) -> list[tuple[Target, int, list[str], int]]:
    """Each target once in-process (full middleware stack): (target, queries, SQL heads, first-call queries)."""
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client(HTTP_HOST="127.0.0.1", HTTP_AUTHORIZATION=f"Bearer {token}")
    results = []
    for target in targets:
        counts = []
        for _ in range(2):  # the first call may write the token's last_used_at; the second is steady state
            with CaptureQueriesContext(connection) as captured:
                response = client.get(target.path)
            if response.status_code != 200:
                raise RuntimeError(f"{target.label}: in-process GET {target.path} -> {response.status_code} "
                                   f"{response.content[:300]!r}")
            check_body(target, response.json())
            counts.append(captured.captured_queries)
        heads = [shorten_sql(q["sql"]) for q in counts[1]]
        results.append((target, len(counts[1]), heads, len(counts[0])))
    return results


def shorten_sql(statement: str) -> str:
    """One line per query: table, joins, a cut WHERE, ORDER BY and LIMIT."""
    statement = re.sub(r'"([a-z_]+)"\."([a-z_]+)"', r"\2", statement)
    match = re.match(r"(SELECT|UPDATE|INSERT|DELETE)\b.*?\bFROM (\S+)(.*?)"
                     r"(?: WHERE (.*?))?(?: ORDER BY (.*?))?(?: LIMIT (\d+))?$", statement, re.S)
    if not match:
        return statement[:90]
    verb, table, joins, where, order, limit = match.groups()
    joined = re.findall(r"JOIN (\S+)", joins or "")
    text = f"{verb} {table.strip(chr(34))}"
    if joined:
        text += " JOIN " + ", ".join(j.strip(chr(34)) for j in joined)
    if where:
        text += f" WHERE {where[:60]}{'...' if len(where) > 60 else ''}"
    if order:
        text += f" ORDER BY {order}"
    if limit:
        text += f" LIMIT {limit}"
    return text


# ------------------------------------------------------------------ server


def start_gunicorn(port: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gunicorn", "harmont.wsgi:application", "--bind", f"127.0.0.1:{port}",
           "--workers", str(WORKERS), "--worker-class", "sync", "--log-level", "warning",
           "--graceful-timeout", "5"]  # no --access-logfile: access log off
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, cwd=BASE_DIR, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                if response.status == 200:
                    return proc
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            stop_gunicorn(proc)
            raise RuntimeError(f"gunicorn did not answer /healthz in 30 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def stop_gunicorn(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def http_get_json(base: str, target: Target, token: str) -> Any:
    request = urllib.request.Request(base + target.path, headers=auth_headers(target, token))
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def auth_headers(target: Target, token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if target.authenticated else {}


# ------------------------------------------------------------------ CPU accounting
#
# This box has 2 cores and is shared: other sessions' test runs steal CPU from a
# measurement. So each run also records CPU seconds per request for the app
# (gunicorn), for PostgreSQL (the backends serving the bench database) and for
# the load generator, and how much of the machine everything else used meanwhile.
# CPU per request is what the request costs; contention moves it much less than req/s.

@dataclass(frozen=True)
class CpuSnapshot:
    wall: float
    busy: float
    load: float
    app: dict[int, float]
    db: dict[int, float]


def cpu_snapshot(app_pids: list[int], db_pids: list[int]) -> CpuSnapshot:
    def read(pids: list[int]) -> dict[int, float]:
        return {pid: cpu for pid in pids if (cpu := process_cpu(pid)) is not None}
    return CpuSnapshot(time.monotonic(), busy_cpu_seconds(), own_cpu_seconds(), read(app_pids), read(db_pids))


def cpu_delta(before: CpuSnapshot, after: CpuSnapshot, result: "Result") -> None:
    def spent(a: dict[int, float], b: dict[int, float]) -> float:
        return sum(b[pid] - a[pid] for pid in a if pid in b)  # a restarted process counts 0, not negative
    app, db = spent(before.app, after.app), spent(before.db, after.db)
    load = after.load - before.load
    capacity = (after.wall - before.wall) * (os.cpu_count() or 1)
    result.app_cpu, result.db_cpu, result.load_cpu = app, db, load
    result.other_share = max(0.0, (after.busy - before.busy) - app - db - load) / capacity


def db_backend_pids() -> list[int]:
    with admin_connect() as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (DB_NAME,)).fetchall()
    return [int(pid) for (pid,) in rows]


# ------------------------------------------------------------------ load generators


@dataclass
class Result:
    rps: float
    requests: int
    p50_ms: float | None = None
    db_xacts: int | None = None
    db_sessions: int | None = None
    app_cpu: float | None = None
    db_cpu: float | None = None
    load_cpu: float | None = None
    other_share: float | None = None
    notes: list[str] = field(default_factory=list)


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def run_wrk(url: str, headers: dict[str, str], seconds: float) -> Result:
    cmd = ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--latency"]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rps or not total:
        raise RuntimeError(f"could not read wrk's output:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if bad:
        raise RuntimeError(f"{bad.group(1)} non-2xx responses from {url}; not measuring an error page:\n{out}")
    result = Result(rps=float(rps.group(1)), requests=int(total.group(1)))
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if p50:
        result.p50_ms = float(p50.group(1)) * _UNITS_MS[p50.group(2)]
    errors = re.search(r"Socket errors: (.*)", out)
    if errors:
        result.notes.append(f"socket errors: {errors.group(1)}")
    return result


def run_python_load(url: str, headers: dict[str, str], seconds: float) -> Result:
    """CONNECTIONS threads, each with one http.client connection, re-opened when the server closes it."""
    parsed = urllib.parse.urlsplit(url)
    path = parsed.path + (f"?{parsed.query}" if parsed.query else "")
    deadline = time.monotonic() + seconds
    latencies: list[list[float]] = [[] for _ in range(CONNECTIONS)]
    failures = [0] * CONNECTIONS

    def worker(slot: int) -> None:
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
        mine = latencies[slot]
        while time.monotonic() < deadline:
            began = time.perf_counter()
            try:
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                conn.close()  # the next request() reconnects
                failures[slot] += 1
                continue
            if response.status != 200:
                failures[slot] += 1
                continue
            mine.append(time.perf_counter() - began)
        conn.close()

    began = time.monotonic()
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(CONNECTIONS)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    elapsed = time.monotonic() - began
    done = sorted(x for slot in latencies for x in slot)
    if sum(failures):
        raise RuntimeError(f"{sum(failures)} failed requests to {url}; not measuring an error page")
    result = Result(rps=len(done) / elapsed, requests=len(done))
    if done:
        result.p50_ms = done[len(done) // 2] * 1000
    return result


# ------------------------------------------------------------------ report


def ratio_line(name: str, value: float, target: float) -> str:
    verdict = "PASS" if value >= target else "FAIL  <<<"
    return f"  {name:<38} {value:5.2f}  (target >= {target:.2f})  {verdict:<9}"


def cpu_cost(results: list[Result]) -> float | None:
    """The lowest CPU seconds per request (app + db + load generator) over the runs."""
    costs = [(r.app_cpu + r.db_cpu + r.load_cpu) / r.requests for r in results
             if r.requests and None not in (r.app_cpu, r.db_cpu, r.load_cpu)]
    return min(costs) if costs else None


def cpu_ratio(reference: list[Result], measured: list[Result]) -> str:
    """Throughput ratio predicted from CPU per request: on a saturated box, req/s ~ 1 / CPU per request."""
    ref, cost = cpu_cost(reference), cpu_cost(measured)
    return f"  [CPU: {ref / cost:.2f}]" if ref and cost else ""


def report(targets: list[Target], runs: dict[str, list[Result]], tool: str, args: argparse.Namespace,
           queries: list[tuple[Target, int, list[str], int]], conn_max_age: Any, health_checks: Any) -> None:
    best = {key: max(results, key=lambda r: r.rps) for key, results in runs.items()}
    base = best["a"].rps
    say()
    say(f"Harmont API bench, {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs, PostgreSQL "
        f"{PG_HOST}:{PG_PORT}/{DB_NAME}, {BUILDS:,} builds in one pipeline")
    say(f"server: gunicorn, {WORKERS} sync workers, CONN_MAX_AGE={conn_max_age}, "
        f"CONN_HEALTH_CHECKS={health_checks}, access log off")
    threads = f"{THREADS} threads" if tool.startswith("wrk") else "one thread each"
    say(f"load:   {tool}, {CONNECTIONS} connections, {threads}, {args.warmup} s warm-up + "
        f"{args.duration} s per run, interleaved a,b,c,d x{args.rounds}, best run reported")
    say()
    runs_head = " ".join(f"{f'run {n}':>8}" for n in range(1, args.rounds + 1))
    say(f"  {'req/s':<34} {runs_head} {'best':>8}  {'x baseline':>10}")
    for target in targets:
        cells = " ".join(f"{r.rps:8.0f}" for r in runs[target.key])
        top = best[target.key].rps
        say(f"  ({target.key}) {target.label:<30} {cells} {top:8.0f}  {top / base:10.2f}")
    say(f"  deep page / first page: {best['d'].rps / best['c'].rps:.2f}")
    say()
    say("Targets (on req/s; in brackets the same ratio from CPU per request, which contention moves less):")
    say(ratio_line("GET build >= 0.6 x baseline", best["b"].rps / base, GET_BUILD_TARGET)
        + cpu_ratio(runs["a"], runs["b"]))
    say(ratio_line("deep page within 10% of first page", best["d"].rps / best["c"].rps, DEEP_PAGE_TARGET)
        + cpu_ratio(runs["c"], runs["d"]))
    say()
    say("Where the time goes (best run of each): latency, CPU ms per request of gunicorn (app), of the")
    say("PostgreSQL backends (db) and of the load generator, database transactions per request (each query")
    say("is one, plus the CONN_HEALTH_CHECKS `SELECT 1` that Django runs outside its query log), database")
    say("connections opened during the run (0: persistent connections reused), and the share of the CPUs")
    say("other processes on this machine used meanwhile:")
    say(f"  {'':<34} {'p50 ms':>6} {'app CPU':>8} {'db CPU':>7} {'load CPU':>8} {'xacts/req':>9} "
        f"{'new conns':>9} {'others':>6}")
    for target in targets:
        top = best[target.key]
        per = (lambda v: "?" if v is None else f"{v * 1000 / top.requests:.2f}") if top.requests else (lambda v: "-")
        say(f"  ({target.key}) {target.label:<30} {top.p50_ms or 0:6.2f} {per(top.app_cpu):>8} "
            f"{per(top.db_cpu):>7} {per(top.load_cpu):>8} "
            f"{(top.db_xacts or 0) / max(top.requests, 1):9.2f} {top.db_sessions or 0:9d} {top.other_share or 0:6.0%}")
    notes = sorted({n for results in runs.values() for r in results for n in r.notes})
    for note in notes:
        say(f"  note: {note}")
    noisy = max(r.other_share or 0 for r in best.values())
    if noisy > 0.15:
        say(f"  WARNING: other processes used up to {noisy:.0%} of the CPUs during the reported runs, so the")
        say("  req/s above are disturbed; rerun on a quiet machine. CPU per request is less affected.")
    say()
    say("Queries per request (in-process through the full middleware stack, CaptureQueriesContext,")
    say("steady state; the first call in a 5-minute window also writes the token's last_used_at):")
    for target, count, heads, first in queries:
        extra = f" (first call: {first}, + UPDATE last_used_at)" if first != count else ""
        say(f"  ({target.key}) {target.label:<34} {count} queries{extra}")
        for head in heads:
            say(f"        {head}")


# ------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help=f"keep the {DB_NAME} database afterwards")
    parser.add_argument("--duration", type=int, default=8, help="seconds per measurement (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up before each measurement")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best is reported (default 2)")
    parser.add_argument("--python-load", action="store_true", help="use the Python load generator even if wrk exists")
    args = parser.parse_args()

    wrk = shutil.which("wrk")
    if args.python_load:
        tool, load = "built-in Python load generator (threads, keep-alive http.client)", run_python_load
    elif wrk:
        version = subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.split("\n")[0]
        tool, load = (version.split(" [")[0] or "wrk"), run_wrk
    else:
        say("wrk is not installed; install it with `apt-get install -y wrk` for trustworthy numbers.")
        say("Falling back to the built-in Python load generator, which shares the CPUs with the server")
        say("and the GIL with itself: expect lower absolute numbers; the ratios still compare.")
        tool, load = "built-in Python load generator (threads, keep-alive http.client)", run_python_load

    ensure_postgres()
    started = time.monotonic()
    create_database()
    server: subprocess.Popen | None = None
    seed: Seed | None = None
    log_dir = Path(tempfile.mkdtemp(prefix="harmont-bench-"))
    try:
        import django

        django.setup()
        from django.conf import settings
        from django.db import connections

        seed = migrate_and_seed()
        say(f"database {DB_NAME}: migrated and seeded with {BUILDS:,} builds in {time.monotonic() - started:.1f} s")
        targets = targets_for(seed)
        queries = count_queries(targets, seed.token)
        db = settings.DATABASES["default"]
        connections.close_all()  # the server gets the database to itself

        port = free_port()
        server = start_gunicorn(port, log_dir / "gunicorn.log")
        base_url = f"http://127.0.0.1:{port}"
        say(f"gunicorn on {base_url} ({WORKERS} sync workers)")
        for target in targets:
            shown = check_body(target, http_get_json(base_url, target, seed.token))
            say(f"  ({target.key}) {target.path[:90]}  -> 200, {shown}")

        runs: dict[str, list[Result]] = {t.key: [] for t in targets}
        for round_no in range(1, args.rounds + 1):
            for target in targets:
                url, headers = base_url + target.path, auth_headers(target, seed.token)
                load(url, headers, args.warmup)
                time.sleep(1.1)  # PostgreSQL flushes a backend's statistics at most once a second
                xacts, sessions = db_counters()
                app_pids, db_pids = [server.pid, *children_of(server.pid)], db_backend_pids()
                before = cpu_snapshot(app_pids, db_pids)
                result = load(url, headers, args.duration)
                cpu_delta(before, cpu_snapshot(app_pids, db_pids), result)
                time.sleep(1.1)
                xacts_after, sessions_after = db_counters()
                result.db_xacts, result.db_sessions = xacts_after - xacts, sessions_after - sessions
                if result.db_sessions:
                    # CONN_MAX_AGE retired a connection mid-run: the backend that left and the one
                    # that replaced it are each counted only in part, so this run's db CPU is unknown.
                    # It stays out of the CPU ratios rather than making its endpoint look cheap.
                    result.db_cpu = None
                    result.notes.append("db CPU unknown for a run that opened connections ('?'); "
                                        "such runs are left out of the CPU ratios")
                runs[target.key].append(result)
                say(f"  round {round_no} ({target.key}) {result.rps:8.1f} req/s"
                    f"   (other processes used {result.other_share:.0%} of the CPUs)")
        report(targets, runs, tool, args, queries, db.get("CONN_MAX_AGE"), db.get("CONN_HEALTH_CHECKS"))
    except BaseException:
        log = log_dir / "gunicorn.log"
        if log.exists() and log.stat().st_size:
            say(f"--- gunicorn log (last lines) ---\n{log.read_text()[-3000:]}")
        raise
    finally:
        if server is not None:
            stop_gunicorn(server)
        shutil.rmtree(log_dir, ignore_errors=True)
        try:
            from django.db import connections

            connections.close_all()
        except Exception:  # noqa: BLE001 (Django may not have been set up)
            pass
        if args.keep:
            say(f"kept database {DB_NAME} ({DATABASE_URL})")
            if seed is not None:
                say(f"  org {seed.org!r}, pipeline {seed.pipeline!r}, token {seed.token}")
        else:
            drop_database()
    return 0


if __name__ == "__main__":
    sys.exit(main())
