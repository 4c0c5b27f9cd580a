"""The dispatch bench's tables: both phases side by side, their CPU, the fixed costs, the targets."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from bench.api.report import WORKER_KINDS
from bench.dispatch import CLAIM_P95_TARGET, DB_NAME, THROUGHPUT_TARGET
from bench.dispatch.calls import CallCost
from bench.dispatch.phase import Phase
from bench.harness import NOISY_SHARE, PG_HOST, PG_PORT, percentile, say, verdict
from bench.server import WORKERS


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def cpu_per_job(phase: Phase) -> float:
    """CPU seconds per job of everything taking part (server, PostgreSQL, agents, this script)."""
    return sum(phase.cpu[name] for name in ("server", "db", "agents", "self")) / phase.jobs


def report(phases: list[Phase], costs: dict[str, CallCost], args: argparse.Namespace, conn_max_age: Any, *,
           stack: tuple[float, float] | None, spawn: tuple[float, float]) -> bool:
    """Prints the run's tables; True if every target was met."""
    say()
    say(f"Harmont dispatch bench, {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs, PostgreSQL "
        f"{PG_HOST}:{PG_PORT}/{DB_NAME}")
    say(f"server: gunicorn, {WORKERS} {WORKER_KINDS[getattr(args, 'interface', 'worker')]}, "
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
            f"request ({stack[1]:.0f} req/s); a busy agent makes 1 request per quick job")
    say(f"  the agent's spawn of `bash -c` (Popen, new session, two pipes, wait): {spawn[0]:.1f} ms wall, "
        f"{spawn[1]:.1f} ms CPU")
    say()
    say("Per call, in-process through the full middleware stack (django.test.Client, no HTTP, no contention):")
    say(f"  {'call':<24} {'queries':>8} {'ms p50':>8}")
    for cost in costs.values():
        say(f"  {cost.name:<24} {statistics.median(cost.queries):8.0f} {percentile(cost.seconds, 50) * 1000:8.2f}")
    say("  (one quick job of a busy agent is its `finish + next claim`, which carries its start: server side, "
        "no HTTP overhead)")
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
    if noisy > NOISY_SHARE:
        say(f"  WARNING: other processes used up to {noisy:.0%} of the CPUs during a phase; the figures above are")
        say("  disturbed. CPU ms per job is less affected than jobs/s.")
    return ok and exact
