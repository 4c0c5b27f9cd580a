"""The stream bench's tables: delays, completeness, GET build with and without streams, the CPU model."""

from __future__ import annotations

import argparse
import os
import statistics
import time

from bench.harness import NOISY_SHARE, loadavg, percentile, say, verdict
from bench.stream import DB_NAME, DELAY_P95_TARGET, THROUGHPUT_RATIO_TARGET
from bench.stream.seed import Seed
from bench.stream.session import Session, WrkRun


def delay_line(label: str, values: list[float]) -> str:
    if not values:
        return f"  {label:<44} (no samples)"
    return (f"  {label:<44} {len(values):7d} {percentile(values, 50) * 1000:8.0f} {percentile(values, 95) * 1000:8.0f}"
            f" {percentile(values, 99) * 1000:8.0f} {max(values) * 1000:8.0f}")


def cpu_cell(cpu: dict[str, float], name: str) -> str:
    return f"{cpu.get(name, 0.0) / cpu['_wall']:.2f}"


def served_cores(run: WrkRun) -> float:
    return sum(run.cpu.get(k, 0.0) for k in ("server", "db", "wrk")) / run.cpu["_wall"]


def report(args: argparse.Namespace, seed: Seed, without: list[WrkRun], sessions: list[Session]) -> None:
    """Prints the run's tables and the targets' verdicts."""
    say()
    say(f"Harmont stream bench, {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs, PostgreSQL "
        f"{DB_NAME}; load average now {loadavg()}")
    say("server: gunicorn harmont/gunicorn_conf.py, 2 harmont.worker workers (streams: Django ASGI in each "
        "worker's event loop, one LogHub per worker; REST: the workers' threads), access log off")
    if args.server_experiment:
        say(f"EXPERIMENT on the server: {args.server_experiment} (see STREAM_EXPERIMENTS in "
            f"bench/stream/experiments.py)")
    say(f"streams: {args.clients} SSE clients on {args.jobs} running jobs ({args.builds} builds x "
        f"{args.jobs // args.builds} jobs) per session, {len(sessions)} sessions (each on jobs of its own), one "
        f"asyncio process (no uvloop); writer: append_log in-process, {args.rate:.0f} chunks/s round robin")
    for s in sessions:
        w = s.writer
        written = sum(seq - 1 for seq in w.appended.values())
        span = max(w.ended - w.began, 1e-9)
        say(f"session {s.number}: {s.complete}/{args.clients} complete; writer {written} chunks in {span:.1f} s = "
            f"{written / span:.1f}/s, append_log p50 {percentile(w.append_seconds, 50) * 1000:.1f} ms, behind "
            f"schedule max {max(w.behind) * 1000:.0f} ms; last `done` {s.done_seconds:.1f} s after the first "
            f"finish_job")
    say()
    delays = [d for s in sessions for d in s.delays]
    windows = [(s.with_run.began, s.with_run.ended) for s in sessions]
    during = [d for t, d in delays if any(a <= t <= b for a, b in windows)]
    outside = [d for t, d in delays if not any(a <= t <= b for a, b in windows)]
    say(f"  {'delay append -> receipt (ms)':<44} {'samples':>7} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}")
    say(delay_line("all live chunks, all clients", [d for _, d in delays]))
    say(delay_line("  while wrk hit GET build", during))
    say(delay_line("  streams only", outside))
    lags = [lag for s in sessions for lag in s.out["loop_lag"]]
    say(f"  client event-loop lag (10 ms timer overshoot): p50 {percentile(lags, 50) * 1000:.1f} ms, p95 "
        f"{percentile(lags, 95) * 1000:.1f} ms, max {max(lags) * 1000:.0f} ms (bounds the clients' share of the "
        f"delays)")
    complete = sum(s.complete for s in sessions)
    say(f"  clients with every chunk, in order, no gaps/repeats, then done: {complete}/{args.clients * len(sessions)}")
    for s in sessions:
        for problem in s.problems:
            say(f"    session {s.number}: {problem}")
    say()
    say(f"  {'GET build #' + str(seed.build_number):<34} {'req/s':>8} {'p50 ms':>7} {'server':>7} {'db':>6} "
        f"{'wrk':>6} {'clients':>7} {'writer':>6} {'others':>6}   (CPU, cores)")
    runs = sorted(without + [s.with_run for s in sessions], key=lambda r: r.began)
    for run in runs:
        say(f"  {run.label:<34} {run.rps:8.1f} {run.p50_ms:7.2f} {cpu_cell(run.cpu, 'server'):>7} "
            f"{cpu_cell(run.cpu, 'db'):>6} {cpu_cell(run.cpu, 'wrk'):>6} {cpu_cell(run.cpu, 'clients'):>7} "
            f"{cpu_cell(run.cpu, 'writer'):>6} {cpu_cell(run.cpu, 'others'):>6}")
    for s in sessions:
        only = s.streams_only
        say(f"  {f'streams + writer, no wrk (session {s.number})':<34} {'':>8} {'':>7} {cpu_cell(only, 'server'):>7} "
            f"{cpu_cell(only, 'db'):>6} {'':>6} {cpu_cell(only, 'clients'):>7} {cpu_cell(only, 'writer'):>6} "
            f"{cpu_cell(only, 'others'):>6}")
    top_without = max(without, key=lambda r: r.rps)
    top_with = max((s.with_run for s in sessions), key=lambda r: r.rps)
    ratio = top_with.rps / top_without.rps
    load_gen = (top_with.cpu.get("clients", 0) + top_with.cpu.get("writer", 0)) / top_with.cpu["_wall"]
    model = cpu_model(without, sessions)
    say()
    say(f"  GET build with streams / without (best runs): {top_with.rps:.1f} / {top_without.rps:.1f} = {ratio:.2f}")
    say(f"  CPU model (neighbours and load generator excluded): without streams a request costs "
        f"{model['cost_without'] * 1000:.2f} ms of server + PostgreSQL + wrk CPU;")
    say(f"  with them {model['cost_with'] * 1000:.2f} ms beyond the {model['stream_cores']:.2f} cores the streams "
        f"and the hub take on their own; on {os.cpu_count()} saturated cores that predicts "
        f"{model['ratio']:.2f} x")
    say(f"  load generator (SSE clients + writer) meanwhile: {load_gen:.2f} cores of {os.cpu_count()}; server + "
        f"PostgreSQL + wrk got {served_cores(top_with):.2f} cores with streams, {served_cores(top_without):.2f} "
        f"without")
    say()
    all_delays = [d for _, d in delays]
    p95 = percentile(all_delays, 95) if all_delays else float("inf")
    total = args.clients * len(sessions)
    say("Targets:")
    say(f"  clients that got every chunk           {complete:>5}/{total}   target all     "
        f"{verdict(complete == total)}")
    say(f"  delay append -> receipt p95 (ms)       {p95 * 1000:9.0f}   target <= {DELAY_P95_TARGET * 1000:.0f}  "
        f"{verdict(p95 <= DELAY_P95_TARGET)}")
    say(f"  GET build with / without streams       {ratio:9.2f}   target >= {THROUGHPUT_RATIO_TARGET:.2f} "
        f"{verdict(ratio >= THROUGHPUT_RATIO_TARGET)}  [CPU model: {model['ratio']:.2f}]")
    noisy = max(r.cpu["others"] / r.cpu["_capacity"] for r in runs)
    if noisy > NOISY_SHARE:
        say(f"  WARNING: other processes used up to {noisy:.0%} of the CPUs during a measurement; rerun on a quiet "
            f"machine.")


def cpu_model(without: list[WrkRun], sessions: list[Session]) -> dict[str, float]:
    """The throughput ratio predicted from CPU seconds, which neighbours move much less than req/s.

    On a saturated box, req/s ~ cores available / CPU per request. Without streams the
    server, PostgreSQL and wrk have all the cores; with streams, the cores the streams
    and the LogHub use on their own (server + PostgreSQL, measured with no wrk running)
    are gone, and each request may cost more (GIL contention with the hub's thread). The
    SSE clients and the writer are left out: in production they are browsers and agents
    on other machines. (So is the agent API's cost of ingesting 100 chunks/s, which the
    in-process writer does not pay through HTTP.)
    """
    def cost(run: WrkRun, minus_cores: float = 0.0) -> float:
        spent = sum(run.cpu.get(k, 0.0) for k in ("server", "db", "wrk")) - minus_cores * run.cpu["_wall"]
        return spent / max(run.requests, 1)

    stream_cores = statistics.median(
        (s.streams_only.get("server", 0.0) + s.streams_only.get("db", 0.0)) / s.streams_only["_wall"] for s in sessions)
    cost_without = min(cost(r) for r in without)
    cost_with = min(cost(s.with_run, stream_cores) for s in sessions)
    cores = os.cpu_count() or 1
    ratio = ((cores - stream_cores) / cost_with) / (cores / cost_without)
    return {"cost_without": cost_without, "cost_with": cost_with, "stream_cores": stream_cores, "ratio": ratio}
