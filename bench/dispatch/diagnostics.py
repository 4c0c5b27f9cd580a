"""What the dispatch bench reads besides the jobs: PostgreSQL's activity during a phase, and the fixed
costs every job pays (the HTTP stack, the agent's spawn of a command)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

from bench.cpu import own_cpu_seconds, process_cpu, tree_pids
from bench.harness import admin_connect, percentile
from bench.load import run_wrk


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

    Every agent call pays this fixed cost (gunicorn's HTTP parsing on a worker thread,
    Django's middleware, DRF) before any work.
    """
    if not shutil.which("wrk"):
        return None
    url = f"http://127.0.0.1:{port}{path}"
    run_wrk(url, seconds=1)  # warm-up
    pids = tree_pids(server_pid)
    before = {pid: process_cpu(pid) or 0.0 for pid in pids}
    measured = run_wrk(url, seconds=seconds)
    spent = sum((process_cpu(pid) or 0.0) - before[pid] for pid in pids)
    return spent * 1000 / max(measured.requests, 1), measured.rps
