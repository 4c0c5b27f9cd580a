"""Live log streams under load: 500 SSE clients, 100 chunks/s, and the REST API beside them (see bench/README.md).

One run, on a fresh PostgreSQL database `harmont_bench_stream`, against the
production server (gunicorn `harmont.asgi:application`, 2 uvicorn workers):

1. seeds, through the services, 10 builds x 50 jobs per session and moves every
   job to `running` (claim_job + start_job), each with one chunk of log stored;
2. measures `GET .../builds/{n}` with wrk, no streams open; then, per session:
3. opens 500 SSE clients (`/v0/jobs/<id>/logs?token=`), one per running job of the
   session, in a separate process: plain asyncio (no uvloop), raw
   `asyncio.open_connection`, in batches, watching the server's PostgreSQL
   connections after each batch;
4. appends 100 chunks/s in total, round robin over the 500 jobs, with
   `builds.services.append_log` in this process; each chunk carries its append time
   (`time.time()`, one clock on one machine), so clients compute append -> receipt;
5. measures the server's CPU with the streams open and no other load, then `GET`
   build with wrk while the streams are open and the writer writes;
6. stops writing, finishes every job of the session (`finish_job` -> passed), so each
   stream ends with `done`, checks every client's seqs, and measures `GET` build
   again without streams.

Usage: .venv/bin/python bench/stream_bench.py [--clients 500] [--jobs 500] [--rate 100] [--sessions 2] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
BASE_DIR = BENCH_DIR.parent
# Run as a script, Python puts bench/ first on sys.path, where settings.py and urls.py
# would shadow top-level modules; import from the project root instead.
sys.path[:] = [str(BASE_DIR)] + [p for p in sys.path if p and Path(p).resolve() != BENCH_DIR]

from bench.cpu import CpuMeter, children_of, tree_pids
from bench.harness import (
    admin_connect,
    configure_django,
    create_database,
    db_backend_pids,
    drop_database,
    ensure_postgres,
    free_port,
    loadavg,
    percentile,
    raise_on_sigterm,
    say,
)
from bench.server import experiment_config, start_server, stop_group, wait_for_experiment

DB_NAME = "harmont_bench_stream"
DELAY_P95_TARGET = 0.5  # seconds, append -> receipt
THROUGHPUT_RATIO_TARGET = 0.7  # GET build with streams / without
CONNECTIONS, THREADS = 8, 2  # wrk, as bench/api_bench.py uses it
CONTENT = re.compile(r"bench job=(\d+) seq=(\d+) t=([0-9.]+)")

# `--server-experiment NAME`: experiments, not the product (see bench/server.py for how
# they are applied: a gunicorn post_worker_init hook).
#
# hub-poll-with-arrays: the LogHub's poll as two statements with array parameters instead of
#   an ORM query OR-ing one condition per watched job (see the code for why).
STREAM_EXPERIMENTS = {
    "hub-poll-with-arrays": """
    from django.db import DatabaseError, close_old_connections, connection

    from builds import stream

    def fetch_updates(cursors):
        # The stock poll ORs one Q(job_id=..., seq__gt=...) per watched job: building and compiling
        # that in Python costs time proportional to the watched jobs, five times a second, under
        # the GIL the REST threads need. Here: two statements with array parameters.
        try:
            ids = list(cursors)
            with connection.cursor() as cursor:
                cursor.execute("SELECT id, state FROM builds_job WHERE id = ANY(%s)", [ids])
                states = dict(cursor.fetchall())
                cursor.execute(
                    "SELECT c.job_id, c.seq, c.stream_kind, c.content, c.ts FROM builds_logchunk c "
                    "JOIN unnest(%s::uuid[], %s::int[]) AS w(job_id, seq) ON c.job_id = w.job_id AND c.seq > w.seq "
                    "ORDER BY c.job_id, c.seq", [ids, [cursors[i] for i in ids]])
                chunks = cursor.fetchall()
            return states, chunks
        except DatabaseError:
            close_old_connections()
            raise

    stream.fetch_updates = fetch_updates
""",
}

# ==================================================================== the client process
#
# Runs as `stream_bench.py --role clients --plan FILE --out FILE`. Everything it does is
# asyncio on one thread of one process, so its CPU is one number the orchestrator reads
# from /proc, and its event-loop lag (sampled every 10 ms) bounds how much of a measured
# delay is the client's own fault.


@dataclass
class ClientResult:
    job: int
    status: int = 0
    seqs: list[int] = field(default_factory=list)  # history, then live chunks, in arrival order
    id_mismatches: int = 0  # `id:` line disagreeing with the chunk's seq
    live: list[tuple[float, float]] = field(default_factory=list)  # (received at, delay s)
    done: bool = False
    error: str | None = None


class SSEParser:
    """Incremental `text/event-stream` parser: feed bytes, get (event, id, data) per blank line."""

    def __init__(self) -> None:
        self.buffer = b""
        self.event, self.event_id, self.data = "message", None, []

    def feed(self, chunk: bytes) -> list[tuple[str, str | None, str]]:
        self.buffer += chunk
        out = []
        while True:
            cut = self.buffer.find(b"\n")
            if cut < 0:
                return out
            line, self.buffer = self.buffer[:cut].rstrip(b"\r").decode(), self.buffer[cut + 1:]
            if not line:
                if self.data:
                    out.append((self.event, self.event_id, "\n".join(self.data)))
                self.event, self.event_id, self.data = "message", None, []
            elif line.startswith(":"):
                continue  # keep-alive comment
            else:
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    self.event = value
                elif name == "id":
                    self.event_id = value
                elif name == "data":
                    self.data.append(value)


async def body_chunks(reader: asyncio.StreamReader, chunked: bool):
    if not chunked:
        while data := await reader.read(65536):
            yield data
        return
    while True:
        size_line = await reader.readline()
        if not size_line:
            return
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)  # CRLF
        yield data


async def run_client(result: ClientResult, host: str, port: int, path: str, history_seen: asyncio.Event) -> None:
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
                     f"Cache-Control: no-cache\r\n\r\n".encode())
        await writer.drain()
        status = await reader.readline()
        result.status = int(status.split()[1])
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        if result.status != 200:
            result.error = f"HTTP {result.status}"
            return
        parser = SSEParser()
        async for data in body_chunks(reader, "chunked" in headers.get("transfer-encoding", "")):
            received = time.time()
            for event, event_id, payload in parser.feed(data):
                if event == "history":
                    result.seqs += [c["seq"] for c in json.loads(payload)["chunks"]]
                    history_seen.set()
                elif event == "chunk":
                    chunk = json.loads(payload)
                    result.seqs.append(chunk["seq"])
                    if event_id != str(chunk["seq"]):
                        result.id_mismatches += 1
                    match = CONTENT.search(chunk["content"])
                    if match:
                        result.live.append((received, received - float(match.group(3))))
                elif event == "done":
                    result.done = True
                    return
        result.error = result.error or "stream ended without done"
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        history_seen.set()
        if writer is not None:
            writer.close()


async def loop_lag(samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        began = time.perf_counter()
        await asyncio.sleep(0.01)
        samples.append(time.perf_counter() - began - 0.01)


async def clients_main(plan: dict[str, Any]) -> dict[str, Any]:
    host, port = "127.0.0.1", plan["port"]
    results = [ClientResult(job=c["job"]) for c in plan["clients"]]
    lags: list[float] = []
    stop = asyncio.Event()
    lag_task = asyncio.create_task(loop_lag(lags, stop))
    began = time.time()
    tasks = []
    opened = 0
    loop = asyncio.get_running_loop()

    async def start(result: ClientResult, path: str) -> None:
        nonlocal opened
        seen = asyncio.Event()
        tasks.append(asyncio.create_task(run_client(result, host, port, path, seen)))
        await seen.wait()
        opened += result.error is None

    # Open in batches; after each, the orchestrator counts the server's PostgreSQL
    # connections and answers GO or STOP (a PostgreSQL shared with others must keep slots).
    pairs = list(zip(results, plan["clients"]))
    for first in range(0, len(pairs), plan["batch"]):
        await asyncio.gather(*(start(r, c["path"]) for r, c in pairs[first:first + plan["batch"]]))
        print(f"OPENED {opened}", flush=True)
        answer = await loop.run_in_executor(None, sys.stdin.readline)
        if answer.strip() != "GO":
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            stop.set()
            await lag_task
            return {"stopped": True}
    connected = time.time() - began
    errors = sum(1 for r in results if r.error)
    print(f"CONNECTED {len(results) - errors} {connected:.2f}", flush=True)  # the orchestrator waits for this
    deadline = plan["deadline"]
    _, pending = await asyncio.wait(tasks, timeout=max(1.0, deadline - time.time()))
    for task in pending:
        task.cancel()
    for result in results:
        if not result.done and not result.error:
            result.error = "timed out before done"
    stop.set()
    await lag_task
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "stopped": False,
        "connect_seconds": connected,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "loop_lag": lags,
        "clients": [r.__dict__ for r in results],
    }


def clients_role(args: argparse.Namespace) -> int:
    plan = json.loads(Path(args.plan).read_text())
    out = asyncio.run(clients_main(plan))
    Path(args.out).write_text(json.dumps(out))
    return 0


# ==================================================================== the orchestrator


@dataclass(frozen=True)
class Seed:
    org: str
    pipeline: str
    api_token: str
    build_number: int  # the build `GET` is measured on
    sessions: list[list[tuple[str, str, str]]]  # per session: (job id, build id, log token) of its running jobs


def migrate_and_seed(builds: int, jobs_per_build: int, sessions: int) -> Seed:
    """For each session, builds whose jobs are all `running`, each with one stored chunk, through the services."""
    from django.core.management import call_command
    from django.db import connection
    from django.utils import timezone

    from builds import services
    from builds.models import Job
    from builds.services.agents import register_agent
    from harmont.logtokens import mint_log_token
    from organizations.services import (
        create_agent_token,
        create_organization,
        create_personal_token,
        create_user,
    )
    from pipelines.services import create_pipeline

    call_command("migrate", interactive=False, verbosity=0)
    user = create_user(email="bench@example.com", name="Bench User")
    org = create_organization(name="bench", owner=user)
    api_token = create_personal_token(user=user, description="stream bench").raw
    definition = {
        "version": "0", "timeout_seconds": 3600,
        "graph": {"nodes": [{"step": {"key": f"job-{i:03d}", "label": f"job {i}", "cmd": "make test"}, "env": {}}
                            for i in range(jobs_per_build)],
                  "edges": [], "node_holes": [], "edge_property": "directed"},
    }
    pipeline = create_pipeline(org=org, name="app", repository="https://example.com/bench/app.git",
                               default_branch="main", definition=definition)
    built = [services.create_build(pipeline=pipeline, created_by=user, request=services.validate_build_request(
        branch="main", commit=f"{i:040x}", message=f"stream bench build {i}")) for i in range(builds * sessions)]
    token = create_agent_token(organization=org, created_by=user, description="stream bench").token
    agent = register_agent(token=token, name="bench-seeder", hostname="bench").agent
    while (claim := services.claim_job(agent=agent)) is not None:
        services.start_job(job=claim.job)
    now = timezone.now()
    log_tokens = {build.pk: mint_log_token(build_id=build.pk).token for build in built}
    jobs = []
    for job in Job.objects.filter(build__in=built).order_by("build__number", "position"):
        assert job.state == "running", job.state
        services.append_log(job=job, chunks=[services.ChunkIn(seq=1, stream_kind=2, ts=now,
                                                              content="harmont-agent: running (seeded)\n")])
        jobs.append((str(job.pk), str(job.build_id), log_tokens[job.build_id]))
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    per_session = builds * jobs_per_build
    return Seed(org=org.slug, pipeline=pipeline.slug, api_token=api_token, build_number=built[0].number,
                sessions=[jobs[i * per_session:(i + 1) * per_session] for i in range(sessions)])


# ------------------------------------------------------------------ wrk


@dataclass
class WrkRun:
    label: str
    rps: float
    requests: int
    p50_ms: float
    cpu: dict[str, float]
    began: float = 0.0  # time.time() bounds, to split delays by window
    ended: float = 0.0


def run_wrk(url: str, token: str, seconds: int) -> tuple[float, int, float]:
    cmd = ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency",
           "-H", f"Authorization: Bearer {token}", url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if bad:
        raise RuntimeError(f"{bad.group(1)} non-2xx responses from {url}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    p50_ms = float(p50.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[p50.group(2)] if p50 else 0.0
    return rps, total, p50_ms


def measure_get(label: str, url: str, token: str, meter: CpuMeter, *, warmup: int, duration: int) -> WrkRun:
    run_wrk(url, token, warmup)
    before, began = meter.snapshot(), time.time()
    rps, total, p50 = run_wrk(url, token, duration)
    run = WrkRun(label, rps, total, p50, CpuMeter.delta(before, meter.snapshot()), began, time.time())
    say(f"  {label:<34} {rps:8.1f} req/s  p50 {p50:6.2f} ms  (others used "
        f"{run.cpu['others'] / run.cpu['_capacity']:.0%} of the CPUs; load {loadavg()})")
    return run


# ------------------------------------------------------------------ the writer


@dataclass
class Writer:
    jobs: list[str]
    rate: float
    appended: dict[str, int] = field(default_factory=dict)  # job id -> last seq written
    behind: list[float] = field(default_factory=list)  # how late each append started vs its schedule
    append_seconds: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    began: float = 0.0
    ended: float = 0.0

    def run(self) -> None:
        from django.db import connections
        from django.utils import timezone

        from builds import services
        from builds.models import Job

        try:
            handles = {job_id: Job.objects.only("id").get(pk=job_id) for job_id in self.jobs}
            self.appended = {job_id: 1 for job_id in self.jobs}  # seq 1 was seeded
            start = time.monotonic()
            self.began = time.time()
            k = 0
            while not self.stop.is_set():
                wait = start + k / self.rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.behind.append(max(0.0, -wait))
                job_id = self.jobs[k % len(self.jobs)]
                seq = self.appended[job_id] + 1
                stamp = time.time()
                content = f"bench job={k % len(self.jobs)} seq={seq} t={stamp:.6f}\n"
                services.append_log(job=handles[job_id], chunks=[services.ChunkIn(
                    seq=seq, stream_kind=0, content=content, ts=timezone.now())])
                self.append_seconds.append(time.time() - stamp)
                self.appended[job_id] = seq
                k += 1
            self.ended = time.time()
        except BaseException as exc:  # noqa: BLE001 (reported by the orchestrator)
            self.error = exc
        finally:
            connections.close_all()


# ------------------------------------------------------------------ one session of open streams


RAMP_BATCH = 25
STREAMS_ONLY_SECONDS = 6


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
    args: argparse.Namespace
    port: int
    url: str
    seed: Seed
    meter: CpuMeter
    server: subprocess.Popen
    admin: Any
    slots_for_us: int
    max_connections: int
    work: Path
    procs: list[subprocess.Popen] = field(default_factory=list)  # for cleanup
    writers: list[tuple[Writer, threading.Thread]] = field(default_factory=list)
    clients_pid: list[int] = field(default_factory=list)


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
        [sys.executable, str(Path(__file__).resolve()), "--role", "clients", "--plan", str(plan_path),
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


# ------------------------------------------------------------------ report


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
    say()
    say(f"Harmont stream bench, {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs, PostgreSQL "
        f"{DB_NAME}; load average now {loadavg()}")
    say("server: gunicorn harmont.asgi:application, 2 uvicorn workers (streams: Django ASGI, one LogHub per "
        "worker; REST: a2wsgi threads), access log off")
    if args.server_experiment:
        say(f"EXPERIMENT on the server: {args.server_experiment} (see STREAM_EXPERIMENTS in bench/stream_bench.py)")
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
        f"{'PASS' if complete == total else 'FAIL  <<<'}")
    say(f"  delay append -> receipt p95 (ms)       {p95 * 1000:9.0f}   target <= {DELAY_P95_TARGET * 1000:.0f}  "
        f"{'PASS' if p95 <= DELAY_P95_TARGET else 'FAIL  <<<'}")
    say(f"  GET build with / without streams       {ratio:9.2f}   target >= {THROUGHPUT_RATIO_TARGET:.2f} "
        f"{'PASS' if ratio >= THROUGHPUT_RATIO_TARGET else 'FAIL  <<<'}  [CPU model: {model['ratio']:.2f}]")
    noisy = max(r.cpu["others"] / r.cpu["_capacity"] for r in runs)
    if noisy > 0.15:
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


def ramp_text(ramp: list[tuple[int, int]]) -> str:
    shown = ramp if len(ramp) <= 8 else ramp[:4] + ramp[-3:]
    return ", ".join(f"{streams}: {held}" for streams, held in shown)


def server_threads(server: subprocess.Popen) -> str:
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
    say(f"  clients that got every chunk           {'-':>5}/{args.clients}   target all     FAIL  <<<")


# ------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["orchestrator", "clients"], default="orchestrator",
                        help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=500, help="concurrent SSE clients (default 500)")
    parser.add_argument("--jobs", type=int, default=500,
                        help="running jobs the clients watch, round robin (default 500: one client per job)")
    parser.add_argument("--builds", type=int, default=10, help="builds the running jobs belong to (default 10)")
    parser.add_argument("--rate", type=float, default=100.0, help="chunks appended per second in total (default 100)")
    parser.add_argument("--sessions", type=int, default=2,
                        help="stream sessions, interleaved with GET-build runs without streams (default 2)")
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk measurement (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of wrk warm-up before each (default 2)")
    parser.add_argument("--server-experiment", default="",
                        help=f"experiments, comma list: patch the server in each worker ({', '.join(STREAM_EXPERIMENTS)}; "
                             "see STREAM_EXPERIMENTS)")
    parser.add_argument("--db-headroom", type=int, default=15,
                        help="stop opening streams when fewer PostgreSQL connection slots than this are left, "
                             "so other users of the shared server keep theirs (default 15)")
    parser.add_argument("--keep", action="store_true", help=f"keep the {DB_NAME} database afterwards")
    args = parser.parse_args()
    if args.role == "clients":
        return clients_role(args)
    if args.jobs % args.builds:
        parser.error("--jobs must be a multiple of --builds")
    experiments = [n.strip() for n in args.server_experiment.split(",") if n.strip()]
    if any(n not in STREAM_EXPERIMENTS for n in experiments):
        parser.error(f"--server-experiment takes {', '.join(STREAM_EXPERIMENTS)}")
    if not shutil.which("wrk"):
        raise SystemExit("wrk is required: apt-get install -y wrk")

    raise_on_sigterm()
    ensure_postgres()
    work = Path(tempfile.mkdtemp(prefix="harmont-stream-"))
    create_database(DB_NAME)
    server: subprocess.Popen | None = None
    ctx: Context | None = None
    admin = None
    try:
        env = configure_django(DB_NAME, media_root=work / "media")
        import django

        django.setup()
        from django.db import connections

        say(f"load average at start: {loadavg()}")
        began = time.monotonic()
        seed = migrate_and_seed(args.builds, args.jobs // args.builds, args.sessions)
        say(f"seeded {args.sessions} x {args.jobs} running jobs in {args.sessions * args.builds} builds in "
            f"{time.monotonic() - began:.1f} s")
        connections.close_all()

        admin = admin_connect()  # kept open: the meter must not need a free slot later
        max_connections = int(admin.execute("SHOW max_connections").fetchone()[0])
        in_use = int(admin.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
                     .fetchone()[0])
        slots_for_us = max_connections - in_use - args.db_headroom
        say(f"PostgreSQL: max_connections {max_connections}, {in_use} in use by others before the server starts; "
            f"the run stops opening streams if the server would take more than {slots_for_us}")

        port = free_port()
        config = None
        if experiments:
            config = work / "gunicorn_experiment.py"
            config.write_text(experiment_config(experiments, STREAM_EXPERIMENTS))
        server = start_server(port, work / "gunicorn.log", env, config=config)
        if experiments:
            wait_for_experiment(work / "gunicorn.log")
            say(f"EXPERIMENT on the server: {args.server_experiment} (see STREAM_EXPERIMENTS in this file)")
        url = f"http://127.0.0.1:{port}/api/v0/organizations/{seed.org}/pipelines/{seed.pipeline}/builds/" \
              f"{seed.build_number}"
        say(f"server on http://127.0.0.1:{port}")
        clients_pid: list[int] = []
        meter = CpuMeter({
            "server": lambda: (tree_pids(server.pid), False),
            "db": lambda: (db_backend_pids(DB_NAME, admin), False),
            "clients": lambda: (list(clients_pid), False),
            "writer": _self_cpu,
            "wrk": _children_cpu,
        })
        ctx = Context(args=args, port=port, url=url, seed=seed, meter=meter, server=server, admin=admin,
                      slots_for_us=slots_for_us, max_connections=max_connections, work=work, clients_pid=clients_pid)
        # Interleaved: without, session 1 (with), without, session 2 (with), without ... so that
        # a neighbour's burst of CPU hits both sides alike; the best run of each side is compared.
        without = [measure_get("without streams (round 1)", url, seed.api_token, meter, warmup=args.warmup,
                               duration=args.duration)]
        sessions = []
        for number in range(1, args.sessions + 1):
            session = run_session(ctx, number)
            if session is None:
                return 1
            sessions.append(session)
            without.append(measure_get(f"without streams (round {number + 1})", url, seed.api_token, meter,
                                       warmup=args.warmup, duration=args.duration))
        report(args, seed, without, sessions)
    except BaseException:
        log = work / "gunicorn.log"
        if log.exists() and log.stat().st_size:
            say(f"--- gunicorn log (last lines) ---\n{log.read_text()[-3000:]}")
        raise
    finally:
        if ctx is not None:
            for writer, thread in ctx.writers:
                writer.stop.set()
                thread.join(timeout=30)
            for proc in ctx.procs:
                stop_group(proc, grace=2)
        if server is not None:
            stop_group(server)
        if admin is not None:
            admin.close()
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


def _self_cpu() -> float:
    """This process: the writer thread (append_log), the orchestration, and the finishing of jobs."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _children_cpu() -> float:
    """Reaped children: the wrk runs (a client process is reaped only when its session ends)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    sys.exit(main())
