"""One measured run of one endpoint: the load, and what it cost the app, PostgreSQL and the load generator."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.api import DB_NAME
from bench.cpu import CpuMeter, children_of, own_cpu_seconds
from bench.harness import db_backend_pids, db_counters, say
from bench.load import LoadResult, run_python_load, run_wrk, wrk_version

Load = Callable[..., LoadResult]  # run_wrk or run_python_load
PYTHON_LOAD = "built-in Python load generator (threads, keep-alive http.client)"


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


def pick_load_generator(python_load: bool) -> tuple[str, Load]:
    """wrk if installed (and not `--python-load`), else the Python fallback; with the name the report shows."""
    if python_load:
        return PYTHON_LOAD, run_python_load
    version = wrk_version()
    if version:
        return version, run_wrk
    say("wrk is not installed; install it with `apt-get install -y wrk` for trustworthy numbers.")
    say("Falling back to the built-in Python load generator, which shares the CPUs with the server")
    say("and the GIL with itself: expect lower absolute numbers; the ratios still compare.")
    return PYTHON_LOAD, run_python_load


def measure(url: str, headers: dict[str, str], *, load: Load, warmup: float, duration: float,
            server_pid: int) -> Result:
    """A warm-up, then `duration` seconds of load on `url`, with the CPU and transactions they cost."""
    load(url, seconds=warmup, headers=headers)
    time.sleep(1.1)  # PostgreSQL flushes a backend's statistics at most once a second
    counters = db_counters(DB_NAME)
    # The processes as they are now: CPU is read for these same pids before and after.
    app_pids, db_pids = [server_pid, *children_of(server_pid)], db_backend_pids(DB_NAME)
    meter = CpuMeter({"app": lambda: (app_pids, False), "db": lambda: (db_pids, False), "load": own_cpu_seconds})
    before = meter.snapshot()
    measured = load(url, seconds=duration, headers=headers)
    cpu = CpuMeter.delta(before, meter.snapshot())
    time.sleep(1.1)
    after = db_counters(DB_NAME)
    result = Result(rps=measured.rps, requests=measured.requests, p50_ms=measured.p50_ms, notes=list(measured.notes),
                    db_xacts=after.xacts - counters.xacts, db_sessions=after.sessions - counters.sessions,
                    app_cpu=cpu["app"], db_cpu=cpu["db"], load_cpu=cpu["load"],
                    other_share=cpu["others"] / cpu["_capacity"])
    if result.db_sessions:
        # CONN_MAX_AGE retired a connection mid-run: the backend that left and the one
        # that replaced it are each counted only in part, so this run's db CPU is unknown.
        # It stays out of the CPU ratios rather than making its endpoint look cheap.
        result.db_cpu = None
        result.notes.append("db CPU unknown for a run that opened connections ('?'); "
                            "such runs are left out of the CPU ratios")
    return result
