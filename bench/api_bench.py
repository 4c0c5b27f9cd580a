"""API throughput against a same-run baseline: `make bench` (see bench/README.md).

One run: a fresh PostgreSQL database `harmont_bench` with 10,000 builds in one
pipeline, gunicorn serving the app with `bench.settings` through the production
entry point (harmont/gunicorn_conf.py: 2 harmont.worker workers, REST on their
threads; for comparison `--interface asgi`: `harmont.asgi` on uvicorn workers, REST
through a2wsgi threads, or `--interface wsgi`: `harmont.wsgi` on sync workers), and wrk (or a small Python fallback)
measuring four endpoints, interleaved, twice.
Absolute req/s drift between runs and machines, so every figure is printed as a
ratio to the baseline measured by the same run against the same server.

Usage: .venv/bin/python bench/api_bench.py [--interface worker|asgi|wsgi] [--keep] [--duration S] [--warmup S]
                                           [--python-load]
"""

from __future__ import annotations

import argparse
import sys
import time

import rootpath  # noqa: F401 (before any `bench` import: puts the project root on sys.path)

from bench.api import BUILDS, DB_NAME
from bench.api.endpoints import auth_headers, check_body, count_queries, http_get_json, targets_for
from bench.api.measure import Result, measure, pick_load_generator
from bench.api.report import WORKER_KINDS, report
from bench.api.seed import migrate_and_seed
from bench.harness import ScratchRun, database_url, free_port, say
from bench.server import WORKERS, start_server, stop_group


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help=f"keep the {DB_NAME} database afterwards")
    parser.add_argument("--duration", type=int, default=8, help="seconds per measurement (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up before each measurement")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best is reported (default 2)")
    parser.add_argument("--python-load", action="store_true", help="use the Python load generator even if wrk exists")
    parser.add_argument("--interface", choices=["worker", "asgi", "wsgi"], default="worker",
                        help="worker: harmont/gunicorn_conf.py, what make run and production serve (default); "
                             "asgi: harmont.asgi on uvicorn workers; wsgi: harmont.wsgi on sync workers")
    args = parser.parse_args()

    tool, load = pick_load_generator(args.python_load)
    started = time.monotonic()
    with ScratchRun(DB_NAME, prefix="harmont-bench-", keep=args.keep, settings_module="bench.settings") as run:
        from django.conf import settings
        from django.db import connections

        run.keep_notes = [f"kept database {DB_NAME} ({database_url(DB_NAME)})"]
        seed = migrate_and_seed()
        run.keep_notes.append(f"  org {seed.org!r}, pipeline {seed.pipeline!r}, token {seed.token}")
        say(f"database {DB_NAME}: migrated and seeded with {BUILDS:,} builds in {time.monotonic() - started:.1f} s")
        targets = targets_for(seed)
        queries = count_queries(targets, seed.token)
        db = settings.DATABASES["default"]
        connections.close_all()  # the server gets the database to itself

        port = free_port()
        server = start_server(port, run.server_log, run.env, interface=args.interface)
        run.defer(stop_group, server)
        base_url = f"http://127.0.0.1:{port}"
        say(f"gunicorn on {base_url} ({WORKERS} {WORKER_KINDS[args.interface]})")
        for target in targets:
            shown = check_body(target, http_get_json(base_url, target, seed.token))
            say(f"  ({target.key}) {target.path[:90]}  -> 200, {shown}")

        # Interleaved a, b, c, d, a, b, ...: a neighbour's burst of CPU hits every endpoint alike.
        runs: dict[str, list[Result]] = {t.key: [] for t in targets}
        for round_no in range(1, args.rounds + 1):
            for target in targets:
                result = measure(base_url + target.path, auth_headers(target, seed.token), load=load,
                                 warmup=args.warmup, duration=args.duration, server_pid=server.pid)
                runs[target.key].append(result)
                say(f"  round {round_no} ({target.key}) {result.rps:8.1f} req/s"
                    f"   (other processes used {result.other_share:.0%} of the CPUs)")
        report(targets, runs, tool, args, queries, db.get("CONN_MAX_AGE"), db.get("CONN_HEALTH_CHECKS"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
