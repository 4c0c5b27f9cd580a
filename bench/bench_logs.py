"""Log ingestion: one job printing 10 MB/s for 30 s through a real agent, watched live: `make bench-logs`.

One run: a fresh PostgreSQL database, the server as production serves it (gunicorn,
harmont/gunicorn_conf.py) with HARMONT_JOB_LOG_LIMIT raised past what the job prints, one real
`manage.py runagent`, and one build whose job runs a small generator: numbered
100-byte lines, written 64 KB at a time, paced to `--mb-per-s` for `--seconds`.
`--viewers` live log streams (SSE, threads of this script) watch it from its start.

It prints the MB/s the server stored (from the job's start to its last chunk), the
CPU the server, PostgreSQL and the agent spent per MB, how far behind the viewers
were (each live chunk's receipt against the agent's capture time: one clock, one
machine), and checks that every line is stored once and in order (the raw log,
downloaded) and that every viewer got every chunk in order. Targets (issue 18):
every byte once and in order, viewers' delay p95 ≤ 1 s.

Usage: .venv/bin/python bench/bench_logs.py [--mb-per-s 10] [--seconds 30] [--viewers 10] [--keep] [--db NAME]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import rootpath  # noqa: F401 (before any `bench` import: puts the project root on sys.path)

from bench.cpu import CpuMeter, tree_pids
from bench.harness import BASE_DIR, ScratchRun, db_backend_pids, free_port, loadavg, percentile, say, verdict
from bench.seeding import migrate_and_create_user
from bench.server import start_server, stop_group

DB_NAME = os.environ.get("HARMONT_BENCH_LOGS_DB", "harmont_bench_logs")
LINE_BYTES = 100
DELAY_P95_TARGET = 1.0
LINE = re.compile(r"(\d{10}) x{89}")

# The job's command: numbered lines, 64 KB per write, paced to the rate asked.
GENERATOR = r"""
import sys, time
rate, seconds = float(sys.argv[1]) * 1e6, float(sys.argv[2])
pad = "x" * 89
total = int(rate * seconds / 100)
out = sys.stdout.buffer
started, i = time.monotonic(), 0
while i < total:
    n = min(655, total - i)
    out.write("".join(f"{j:010d} {pad}\n" for j in range(i, i + n)).encode())
    out.flush()
    i += n
    ahead = i * 100 / rate - (time.monotonic() - started)
    if ahead > 0:
        time.sleep(ahead)
"""


class Viewer(threading.Thread):
    """One live log stream: the seqs it got in order, and each live chunk's delay (seconds)."""

    def __init__(self, port: int, path: str) -> None:
        super().__init__(daemon=True)
        self.port, self.path = port, path
        self.seqs: list[int] = []
        self.delays: list[float] = []
        self.done = False
        self.error = ""

    def run(self) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            conn.request("GET", self.path, headers={"Accept": "text/event-stream"})
            response = conn.getresponse()
            if response.status != 200:
                self.error = f"{response.status} {response.read()[:200]!r}"
                return
            event = ""
            while True:
                line = response.readline()
                if not line:
                    return
                line = line.rstrip(b"\n")
                if line.startswith(b"event: "):
                    event = line[7:].decode()
                elif line.startswith(b"data: "):
                    if event == "done":
                        self.done = True
                        return
                    data = json.loads(line[6:])
                    if event == "history":
                        self.seqs += [chunk["seq"] for chunk in data["chunks"]]
                    elif event == "chunk":
                        self.seqs.append(data["seq"])
                        self.delays.append(time.time_ns() / 1e9 - data["ts"] / 1e9)
        except (OSError, ValueError) as exc:
            self.error = repr(exc)


def start_agent(*, server: str, token: str, work: Path, env: dict[str, str]) -> subprocess.Popen:
    agent_env = {k: v for k, v in env.items() if k not in ("DATABASE_URL", "HARMONT_SECRET_KEY")}
    agent_env["HARMONT_AGENT_TOKEN"] = token
    with (work / "agent.log").open("w") as log:
        return subprocess.Popen([sys.executable, "manage.py", "runagent", "--server", server, "--name", "logs-agent",
                                 "--workdir", str(work / "agent")], cwd=BASE_DIR, env=agent_env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def raw_log(port: int, path: str, token: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise SystemExit(f"GET {path}: {response.status} {data[:200]!r}")
    return data


def check_lines(log: bytes, expected: int) -> tuple[int, int, int]:
    """(lines of the job's output, lines out of order or repeated, lines missing)."""
    numbers = [int(m.group(1)) for m in LINE.finditer(log.decode())]
    disorder = sum(1 for a, b in zip(numbers, numbers[1:]) if b != a + 1)
    return len(numbers), disorder, expected - len(set(numbers))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb-per-s", type=float, default=10.0, help="MB (10^6 bytes) the job prints a second")
    parser.add_argument("--seconds", type=float, default=30.0, help="for how long")
    parser.add_argument("--viewers", type=int, default=10, help="live log streams watching it")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--db", default=DB_NAME, help=f"scratch database (dropped and created; default {DB_NAME})")
    args = parser.parse_args()
    total_bytes = int(args.mb_per_s * 1e6 * args.seconds / LINE_BYTES) * LINE_BYTES
    # The server must keep all of it: its log limit goes past what the job prints.
    os.environ["HARMONT_JOB_LOG_LIMIT"] = str(total_bytes * 2 + 1024 * 1024)

    with ScratchRun(args.db, prefix="harmont-bench-logs-", keep=args.keep) as run:
        from builds.models import Job, LogChunk
        from builds.services import create_build, validate_build_request
        from harmont.logtokens import mint_log_token
        from organizations.services import create_agent_token, create_organization, create_personal_token
        from pipelines.services import create_pipeline

        user = migrate_and_create_user()
        org = create_organization(name="bench", owner=user)
        pipeline = create_pipeline(org=org, name="logs", repository="", default_branch="main")
        agent_token = create_agent_token(organization=org, created_by=user, description="log bench").raw
        api_token = create_personal_token(user=user, description="log bench").raw
        port = free_port()
        server = start_server(port, run.server_log, run.env)
        run.defer(stop_group, server)
        agent = start_agent(server=f"http://127.0.0.1:{port}", token=agent_token, work=run.work, env=run.env)
        run.defer(stop_group, agent, grace=2)
        say(f"database {args.db}; a job printing {args.mb_per_s:g} MB/s for {args.seconds:g} s "
            f"({total_bytes / 1e6:.0f} MB), {args.viewers} viewers; load {loadavg()}")

        ir = {"version": "0", "steps": [{"type": "command", "key": "loud", "timeout_seconds": 600,
                                         "cmd": f'python3 -c "$BENCH_GENERATOR" {args.mb_per_s} {args.seconds}'}]}
        build = create_build(pipeline=pipeline, request=validate_build_request(
            branch="main", commit="HEAD", pipeline_ir=ir, env={"BENCH_GENERATOR": GENERATOR}))
        job = Job.objects.get(build=build)
        meter = CpuMeter({"server": lambda: (tree_pids(server.pid), False),
                          "db": lambda: (db_backend_pids(args.db), False),
                          "agent": lambda: ([agent.pid], True)})
        deadline = time.monotonic() + 60
        while Job.objects.filter(pk=job.pk, state="running").count() == 0:
            if time.monotonic() > deadline:
                raise SystemExit(f"the job did not start:\n{(run.work / 'agent.log').read_text()[-2000:]}")
            time.sleep(0.05)
        token = mint_log_token(build_id=build.pk).token
        viewers = [Viewer(port, f"/v0/jobs/{job.pk}/logs?token={token}") for _ in range(args.viewers)]
        before = meter.snapshot()
        for viewer in viewers:
            viewer.start()
        deadline = time.monotonic() + args.seconds * 4 + 60
        while True:
            job.refresh_from_db()
            if job.finished_at is not None:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the job did not finish in time (log so far {job.log_bytes} bytes)")
            time.sleep(0.2)
        spent = CpuMeter.delta(before, meter.snapshot())
        for viewer in viewers:
            viewer.join(timeout=60)

        last_chunk = LogChunk.objects.filter(job=job).order_by("-seq").values_list("created_at", flat=True).first()
        stored_span = (last_chunk - job.started_at).total_seconds()
        output_bytes = job.log_bytes
        mb = output_bytes / 1e6
        url = (f"/api/v0/organizations/{org.slug}/pipelines/{pipeline.slug}/builds/{build.number}/jobs/{job.pk}/log")
        lines, disorder, missing = check_lines(raw_log(port, url, api_token), total_bytes // LINE_BYTES)
        chunks = LogChunk.objects.filter(job=job).count()
        complete = [v for v in viewers if v.done and v.seqs == list(range(1, len(v.seqs) + 1))
                    and len(v.seqs) == chunks]
        delays = [d for v in viewers for d in v.delays]

        say()
        say(f"job {job.state} (exit {job.exit_code}); {chunks} chunks, {output_bytes:,} bytes stored "
            f"({lines:,} numbered lines of {total_bytes // LINE_BYTES:,})")
        say(f"  stored {mb / stored_span:.2f} MB/s from the job's start to its last chunk ({stored_span:.1f} s); "
            f"asked {args.mb_per_s:g} MB/s for {args.seconds:g} s")
        say(f"  CPU over the job: server {spent['server']:.2f} s ({spent['server'] / spent['_wall']:.0%} of a core), "
            f"PostgreSQL {spent['db']:.2f} s, agent {spent['agent']:.2f} s (incl. the generator)")
        say(f"  per MB: server {spent['server'] / mb * 1000:.1f} ms, PostgreSQL {spent['db'] / mb * 1000:.1f} ms, "
            f"agent {spent['agent'] / mb * 1000:.1f} ms")
        if delays:
            say(f"  viewers' delay, capture -> receipt (ms): p50 {percentile(delays, 50) * 1000:.0f}, "
                f"p95 {percentile(delays, 95) * 1000:.0f}, max {max(delays) * 1000:.0f} "
                f"({len(delays):,} live chunks; mean per viewer {statistics.mean(len(v.delays) for v in viewers):.0f})")
        errors = [v.error for v in viewers if v.error]
        if errors:
            say(f"  viewer errors: {errors[:3]}")
        say()
        once = job.state == "passed" and lines == total_bytes // LINE_BYTES and disorder == 0 and missing == 0
        say(f"target: every byte stored once and in order: {'yes' if once else 'NO'} "
            f"(out of order {disorder}, missing {missing}) {verdict(once)}")
        say(f"target: every viewer got every chunk in order: {len(complete)}/{len(viewers)} "
            f"{verdict(len(complete) == len(viewers))}")
        p95 = percentile(delays, 95) if delays else float("inf")
        say(f"target: viewers' delay p95 <= {DELAY_P95_TARGET * 1000:.0f} ms: {p95 * 1000:.0f} ms "
            f"{verdict(p95 <= DELAY_P95_TARGET)}")
        say(f"load {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
