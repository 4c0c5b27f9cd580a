"""gunicorn's settings for the server (`gunicorn -c python:harmont.gunicorn_conf harmont.asgi:application`).

What `make run` uses and production should: a graceful drain of HARMONT_DRAIN_SECONDS
on SIGTERM (in-flight requests finish; harmont.asgi answers held claims and ends log
streams with a reconnect hint at once), and the metrics directory of
prometheus-client's multiprocess mode (HARMONT_METRICS_DIR) cleared at start, with
each exited worker's live gauges dropped. Everything else is given on the command line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

worker_class = "uvicorn_worker.UvicornWorker"
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
