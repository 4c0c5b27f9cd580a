"""gunicorn's settings for the server (`gunicorn -c python:harmont.gunicorn_conf harmont.wsgi:application`).

What `make run` uses and production should: harmont.worker's workers (the REST API
and pages on HARMONT_THREADS threads each, live log streams and waiting claims in an
event loop beside them), a graceful drain of HARMONT_DRAIN_SECONDS on SIGTERM
(in-flight requests finish; held claims are answered and log streams end with a
reconnect hint at once), and the metrics directory of
prometheus-client's multiprocess mode (HARMONT_METRICS_DIR) cleared at start, with
each exited worker's live gauges dropped. Everything else is given on the command line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

worker_class = "harmont.worker.Worker"
threads = int(os.environ.get("HARMONT_THREADS", "8"))
# Open connections per worker, held claims and live log streams included (they cost no thread).
worker_connections = int(os.environ.get("HARMONT_WORKER_CONNECTIONS", "10000"))
# gunicorn's runtime control socket has one default path per user: several servers on a machine
# (or a server beside the benchmarks) would take it from each other. Nothing here uses it.
control_socket_disable = True
# How long a stopping worker lets its requests in flight finish before it is killed.
graceful_timeout = int(os.environ.get("HARMONT_DRAIN_SECONDS", "30"))


def metrics_dir() -> Path | None:
    directory = os.environ.get("HARMONT_METRICS_DIR")
    return Path(directory) if directory else None


def on_starting(server: Any) -> None:
    """Counters of an earlier run would be added to this one's: start from an empty directory."""
    directory = metrics_dir()
    if directory is None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    for path in directory.glob("*.db"):
        path.unlink(missing_ok=True)


def child_exit(server: Any, worker: Any) -> None:
    directory = metrics_dir()
    if directory is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid, str(directory))
