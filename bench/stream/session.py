"""One session of open streams: the SSE clients opened in batches under a guard on PostgreSQL's
connections, the writer, GET build measured with the streams open, the jobs ended, every client checked."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench.cpu import CpuMeter, children_of
from bench.harness import BASE_DIR, db_backend_pids, loadavg, say, verdict
from bench.load import run_wrk
from bench.server import stop_group
from bench.stream import DB_NAME
from bench.stream.seed import Seed
from bench.stream.writer import Writer

CLIENTS_SCRIPT = BASE_DIR / "bench" / "stream_bench.py"  # run with `--role clients`
RAMP_BATCH = 25
STREAMS_ONLY_SECONDS = 6


# ------------------------------------------------------------------ GET build with wrk


@dataclass
class WrkRun:
    label: str
    rps: float
    requests: int
    p50_ms: float
    cpu: dict[str, float]
    began: float = 0.0  # time.time() bounds, to split delays by window
    ended: float = 0.0


def measure_get(label: str, url: str, token: str, meter: CpuMeter, *, warmup: int, duration: int) -> WrkRun:
    """A wrk warm-up, then `duration` seconds of `GET url` with what each process group spent meanwhile."""
    headers = {"Authorization": f"Bearer {token}"}
    run_wrk(url, seconds=warmup, headers=headers)
    before, began = meter.snapshot(), time.time()
    measured = run_wrk(url, seconds=duration, headers=headers)
    rps, p50 = measured.rps, measured.p50_ms or 0.0
    run = WrkRun(label, rps, measured.requests, p50, CpuMeter.delta(before, meter.snapshot()), began, time.time())
    say(f"  {label:<34} {rps:8.1f} req/s  p50 {p50:6.2f} ms  (others used "
        f"{run.cpu['others'] / run.cpu['_capacity']:.0%} of the CPUs; load {loadavg()})")
    return run


# ------------------------------------------------------------------ one session of open streams


@dataclass
class Session:
    number: int
    ramp: list[tuple[int, int]] = field(default_factory=list)  # (open streams, server's PostgreSQL connections)
    threads: str = ""
    connect_seconds: float = 0.0
    streams_only: dict[str, float] = field(default_factory=dict)
    with_run: WrkRun | None = None
    writer: Writer | None = None
    done_seconds: float = 0.0
    out: dict[str, Any] = field(default_factory=dict)
    complete: int = 0
    problems: list[str] = field(default_factory=list)
    delays: list[tuple[float, float]] = field(default_factory=list)  # (received at, delay)


@dataclass
class Context:
    """What every session of a run shares, and what it started (stopped by `stop`, however the run ends)."""

    args: argparse.Namespace
    port: int
    url: str
    seed: Seed
    meter: CpuMeter
    server: subprocess.Popen
    admin: psycopg.Connection  # kept open: counting connections must not need a free slot
    slots_for_us: int
    max_connections: int
    work: Path
    procs: list[subprocess.Popen] = field(default_factory=list)  # for cleanup
    writers: list[tuple[Writer, threading.Thread]] = field(default_factory=list)
    clients_pid: list[int] = field(default_factory=list)

    def stop(self) -> None:
        for writer, thread in self.writers:
            writer.stop.set()
            thread.join(timeout=30)
        for proc in self.procs:
            stop_group(proc, grace=2)


def run_session(ctx: Context, number: int) -> Session | None:
    """Open the streams on this session's running jobs, write, measure GET build, end the jobs, collect.

    Returns None when the server's PostgreSQL connections grew with the open streams
    so far that going on would take slots other users of this PostgreSQL need.
    """
    from django.db import connections

    from builds import services
    from builds.models import Job

    args, jobs = ctx.args, ctx.seed.sessions[number - 1]
    session = Session(number)
    plan = {
        "port": ctx.port,
        "deadline": time.time() + 600,
        "batch": RAMP_BATCH,
        "clients": [{"job": i % len(jobs), "path": f"/v0/jobs/{jobs[i % len(jobs)][0]}/logs?token="
                                                   f"{jobs[i % len(jobs)][2]}"} for i in range(args.clients)],
    }
    plan_path, out_path = ctx.work / f"plan-{number}.json", ctx.work / f"clients-{number}.json"
    plan_path.write_text(json.dumps(plan))
    proc = subprocess.Popen(
        [sys.executable, str(CLIENTS_SCRIPT), "--role", "clients", "--plan", str(plan_path),
         "--out", str(out_path)], cwd=BASE_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        start_new_session=True)
    ctx.procs.append(proc)
    ctx.clients_pid[:] = [proc.pid]
    # After each batch of opened streams: how many PostgreSQL connections does the server hold?
    # Stop before the next batch could take the slots other users of this PostgreSQL need (a
    # version of the stream view that held one connection per open stream exhausted them).
    session.ramp = [(0, len(db_backend_pids(DB_NAME, ctx.admin)))]
    while True:
        line = proc.stdout.readline()
        if not line.startswith("OPENED"):
            break
        streams, held = int(line.split()[1]), len(db_backend_pids(DB_NAME, ctx.admin))
        growth = max(0, held - session.ramp[-1][1])
        session.ramp.append((streams, held))
        if streams < args.clients and held + growth + 5 > ctx.slots_for_us:
            threads = server_threads(ctx.server)
            proc.stdin.write("STOP\n")
            proc.stdin.flush()
            proc.wait(timeout=30)
            report_exhaustion(args, session.ramp, ctx.slots_for_us, ctx.max_connections, threads)
            return None
        proc.stdin.write("GO\n")
        proc.stdin.flush()
    if not line.startswith("CONNECTED"):
        raise RuntimeError(f"the client process failed: {line!r}")
    _, connected, seconds = line.split()
    session.connect_seconds = float(seconds)
    session.threads = server_threads(ctx.server)
    say(f"session {number}: {connected}/{args.clients} SSE clients connected in {seconds} s (batches of "
        f"{RAMP_BATCH}); server's PostgreSQL connections by open streams: {ramp_text(session.ramp)}; threads per "
        f"worker: {session.threads}")

    writer = Writer(jobs=sorted({jobs[c["job"]][0] for c in plan["clients"]}), rate=args.rate)
    thread = threading.Thread(target=writer.run, name=f"writer-{number}")
    ctx.writers.append((writer, thread))
    thread.start()
    before = ctx.meter.snapshot()
    time.sleep(STREAMS_ONLY_SECONDS)
    session.streams_only = CpuMeter.delta(before, ctx.meter.snapshot())
    session.with_run = measure_get(f"with {args.clients} streams (session {number})", ctx.url, ctx.seed.api_token,
                                   ctx.meter, warmup=args.warmup, duration=args.duration)
    time.sleep(1)
    writer.stop.set()
    thread.join(timeout=30)
    if writer.error:
        raise RuntimeError(f"the writer failed: {writer.error!r}")
    session.writer = writer

    # End every job of the session: each stream must then close with `done`.
    began = time.time()
    for job in Job.objects.filter(pk__in=[j for j, _, _ in jobs]).only("id", "build_id"):
        services.finish_job(job=job, state="passed", exit_code=0)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        raise RuntimeError("the client process did not finish within 120 s of the jobs ending") from None
    session.done_seconds = time.time() - began
    ctx.clients_pid[:] = []
    connections.close_all()
    session.out = json.loads(out_path.read_text())
    analyse_clients(session, jobs, plan, writer.appended)
    return session


def analyse_clients(session: Session, jobs: list[tuple[str, str, str]], plan: dict[str, Any],
                    appended: dict[str, int]) -> None:
    job_ids = [job_id for job_id, _, _ in jobs]
    for client, result in zip(plan["clients"], session.out["clients"]):
        job_id = job_ids[client["job"]]
        expected = list(range(1, appended[job_id] + 1))
        ok = (result["error"] is None and result["done"] and result["seqs"] == expected
              and result["id_mismatches"] == 0)
        session.complete += ok
        session.delays += [tuple(x) for x in result["live"]]
        if not ok and len(session.problems) < 5:
            seqs = result["seqs"]
            gaps = sorted(set(expected) - set(seqs))[:5]
            repeats = len(seqs) - len(set(seqs))
            session.problems.append(
                f"client {client['job']}: error={result['error']}, done={result['done']}, {len(seqs)} of "
                f"{len(expected)} seqs, missing {gaps}, {repeats} repeats, in order={seqs == sorted(seqs)}, "
                f"id mismatches {result['id_mismatches']}")



# ------------------------------------------------------------------ the guard on PostgreSQL's connections


def ramp_text(ramp: list[tuple[int, int]]) -> str:
    """`open streams: server's connections` pairs, the first four and last three of a long ramp."""
    shown = ramp if len(ramp) <= 8 else ramp[:4] + ramp[-3:]
    return ", ".join(f"{streams}: {held}" for streams, held in shown)


def server_threads(server: subprocess.Popen) -> str:
    """Threads of each server worker, from /proc (an open stream may hold one)."""
    counts = []
    for pid in children_of(server.pid):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        counts.append(re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE).group(1))
    return ", ".join(counts) or "?"


def report_exhaustion(args: argparse.Namespace, ramp: list[tuple[int, int]], allowed: int, max_connections: int,
                      threads: str) -> None:
    """What a run stopped by the guard prints instead of its tables."""
    (first_streams, first_held), (streams, held) = ramp[0], ramp[-1]
    per_stream = (held - first_held) / max(streams - first_streams, 1)
    say()
    say(f"STOPPED at {streams} of {args.clients} streams: the server's PostgreSQL connections grew with the open "
        f"streams ({ramp_text(ramp)}; {per_stream:.2f} per stream),")
    say(f"and the next batch could pass the {allowed} slots this run may take out of max_connections = "
        f"{max_connections} on a PostgreSQL shared with others.")
    say(f"{args.clients} streams would need ~{held + per_stream * (args.clients - streams):.0f} connections. Server "
        f"threads per worker with them open: {threads}.")
    say("An open stream then keeps a connection (and a thread) of its own: thread-sensitive queries in the view")
    say("run on the thread Django's ASGI handler creates for that one request, which lives as long as the stream.")
    say("The fix: run the view's queries with sync_to_async(..., thread_sensitive=False), on the event loop's "
        "shared")
    say("executor, as builds/stream.py does since 2026-11-28.")
    say()
    say("Targets:")
    say(f"  clients that got every chunk           {'-':>5}/{args.clients}   target all     {verdict(False)}")
