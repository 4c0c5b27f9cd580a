"""The API bench's tables: req/s as ratios to the baseline, the targets, where the time goes, the SQL."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from bench.api import BUILDS, DB_NAME, DEEP_PAGE_TARGET, GET_BUILD_TARGET
from bench.api.endpoints import Target
from bench.api.measure import Result
from bench.harness import NOISY_SHARE, PG_HOST, PG_PORT, say, verdict
from bench.load import CONNECTIONS, THREADS
from bench.server import WORKERS


def ratio_line(name: str, value: float, target: float) -> str:
    return f"  {name:<38} {value:5.2f}  (target >= {target:.2f})  {verdict(value >= target):<9}"


def cpu_cost(results: list[Result]) -> float | None:
    """The lowest CPU seconds per request (app + db + load generator) over the runs."""
    costs = [(r.app_cpu + r.db_cpu + r.load_cpu) / r.requests for r in results
             if r.requests and None not in (r.app_cpu, r.db_cpu, r.load_cpu)]
    return min(costs) if costs else None


def cpu_ratio(reference: list[Result], measured: list[Result]) -> str:
    """Throughput ratio predicted from CPU per request: on a saturated box, req/s ~ 1 / CPU per request."""
    ref, cost = cpu_cost(reference), cpu_cost(measured)
    return f"  [CPU: {ref / cost:.2f}]" if ref and cost else ""


WORKER_KINDS = {
    "worker": "harmont.worker workers (harmont/gunicorn_conf.py; REST on their threads)",
    "asgi": "uvicorn workers (harmont.asgi; REST on a2wsgi threads)",
    "wsgi": "sync workers (harmont.wsgi)",
}


def report(targets: list[Target], runs: dict[str, list[Result]], tool: str, args: argparse.Namespace,
           queries: list[tuple[Target, int, list[str], int]], conn_max_age: Any, health_checks: Any) -> None:
    best = {key: max(results, key=lambda r: r.rps) for key, results in runs.items()}
    base = best["a"].rps
    say()
    say(f"Harmont API bench, {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs, PostgreSQL "
        f"{PG_HOST}:{PG_PORT}/{DB_NAME}, {BUILDS:,} builds in one pipeline")
    say(f"server: gunicorn, {WORKERS} {WORKER_KINDS[args.interface]}, CONN_MAX_AGE={conn_max_age}, "
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
    if noisy > NOISY_SHARE:
        say(f"  WARNING: other processes used up to {noisy:.0%} of the CPUs during the reported runs, so the")
        say("  req/s above are disturbed; rerun on a quiet machine. CPU per request is less affected.")
    say()
    say("Queries per request (in-process through the full middleware stack, CaptureQueriesContext,")
    say("steady state; the first call in a one-minute window also writes the token's last_used_at):")
    for target, count, heads, first in queries:
        extra = f" (first call: {first}, + UPDATE last_used_at)" if first != count else ""
        say(f"  ({target.key}) {target.label:<34} {count} queries{extra}")
        for head in heads:
            say(f"        {head}")
