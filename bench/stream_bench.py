"""Live log streams under load: 1,000 SSE clients, 100 chunks/s, and the REST API beside them (see bench/README.md).

One run, on a fresh PostgreSQL database `harmont_bench_stream`, against the
production server (gunicorn with harmont/gunicorn_conf.py, 2 harmont.worker workers):

1. seeds, through the services, 10 builds x 100 jobs per session and moves every
   job to `running` (claim_job + start_job), each with one chunk of log stored;
2. measures `GET .../builds/{n}` with wrk, no streams open; then, per session:
3. opens 1,000 SSE clients (`/v0/jobs/<id>/logs?token=`), one per running job of the
   session, in a separate process: plain asyncio (no uvloop), raw
   `asyncio.open_connection`, in batches, watching the server's PostgreSQL
   connections after each batch;
4. appends 100 chunks/s in total, round robin over the 1,000 jobs, with
   `builds.services.append_log` in this process; each chunk carries its append time
   (`time.time()`, one clock on one machine), so clients compute append -> receipt;
5. measures the server's CPU with the streams open and no other load, then `GET`
   build with wrk while the streams are open and the writer writes;
6. stops writing, finishes every job of the session (`finish_job` -> passed), so each
   stream ends with `done`, checks every client's seqs, and measures `GET` build
   again without streams.

Usage: .venv/bin/python bench/stream_bench.py [--clients 1000] [--jobs 1000] [--rate 100] [--sessions 2] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

import rootpath  # noqa: F401 (before any `bench` import: puts the project root on sys.path)

from bench.cpu import CpuMeter, children_cpu_seconds, self_cpu_seconds, tree_pids
from bench.harness import ScratchRun, admin_connect, db_backend_pids, free_port, loadavg, say
from bench.server import experiment_config, start_server, stop_group, wait_for_experiment
from bench.stream import DB_NAME
from bench.stream.clients import clients_role
from bench.stream.experiments import STREAM_EXPERIMENTS
from bench.stream.report import report
from bench.stream.seed import migrate_and_seed
from bench.stream.session import Context, measure_get, run_session


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["orchestrator", "clients"], default="orchestrator",
                        help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=1000, help="concurrent SSE clients (default 1000)")
    parser.add_argument("--jobs", type=int, default=1000,
                        help="running jobs the clients watch, round robin (default 1000: one client per job)")
    parser.add_argument("--builds", type=int, default=10, help="builds the running jobs belong to (default 10)")
    parser.add_argument("--rate", type=float, default=100.0, help="chunks appended per second in total (default 100)")
    parser.add_argument("--sessions", type=int, default=2,
                        help="stream sessions, interleaved with GET-build runs without streams (default 2)")
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk measurement (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of wrk warm-up before each (default 2)")
    parser.add_argument("--server-experiment", default="",
                        help=f"experiments, comma list: patch the server in each worker ({', '.join(STREAM_EXPERIMENTS)}; "
                             "see bench/stream/experiments.py)")
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


    with ScratchRun(DB_NAME, prefix="harmont-stream-", keep=args.keep) as run:
        from django.db import connections

        say(f"load average at start: {loadavg()}")
        began = time.monotonic()
        seed = migrate_and_seed(args.builds, args.jobs // args.builds, args.sessions)
        say(f"seeded {args.sessions} x {args.jobs} running jobs in {args.sessions * args.builds} builds in "
            f"{time.monotonic() - began:.1f} s")
        connections.close_all()

        admin = admin_connect()  # kept open: the meter must not need a free slot later
        run.defer(admin.close)
        max_connections = int(admin.execute("SHOW max_connections").fetchone()[0])
        in_use = int(admin.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
                     .fetchone()[0])
        slots_for_us = max_connections - in_use - args.db_headroom
        say(f"PostgreSQL: max_connections {max_connections}, {in_use} in use by others before the server starts; "
            f"the run stops opening streams if the server would take more than {slots_for_us}")

        port = free_port()
        config = None
        if experiments:
            config = run.work / "gunicorn_experiment.py"
            config.write_text(experiment_config(experiments, STREAM_EXPERIMENTS))
        server = start_server(port, run.server_log, run.env, config=config)
        run.defer(stop_group, server)
        if experiments:
            wait_for_experiment(run.server_log)
            say(f"EXPERIMENT on the server: {args.server_experiment} (see STREAM_EXPERIMENTS in "
                f"bench/stream/experiments.py)")
        url = f"http://127.0.0.1:{port}/api/v0/organizations/{seed.org}/pipelines/{seed.pipeline}/builds/" \
              f"{seed.build_number}"
        say(f"server on http://127.0.0.1:{port}")
        clients_pid: list[int] = []
        meter = CpuMeter({
            "server": lambda: (tree_pids(server.pid), False),
            "db": lambda: (db_backend_pids(DB_NAME, admin), False),
            "clients": lambda: (list(clients_pid), False),
            "writer": self_cpu_seconds,  # the writer thread (append_log), the orchestration, the finishing of jobs
            "wrk": children_cpu_seconds,  # the wrk runs (a client process is reaped only when its session ends)
        })
        ctx = Context(args=args, port=port, url=url, seed=seed, meter=meter, server=server, admin=admin,
                      slots_for_us=slots_for_us, max_connections=max_connections, work=run.work,
                      clients_pid=clients_pid)
        run.defer(ctx.stop)  # before the server: the writers and clients use it
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
