"""The server under test: gunicorn as production runs it, started and stopped; and server experiments."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Literal

from bench.cpu import children_of
from bench.harness import BASE_DIR
from builds.agent.runner import stop_process_group

WORKERS = 2  # as `make run` starts them (HARMONT_WORKERS default)

# The app and the worker class of each entry point. "worker" is what production serves and
# `make run` starts (harmont/gunicorn_conf.py: harmont.worker's workers, REST on their threads,
# live log streams and waiting claims in their event loop); the others are for comparison:
# "asgi" is harmont.asgi on uvicorn workers (REST through a2wsgi threads), "wsgi" the REST
# stack alone on sync workers.
ENTRY_POINTS = {
    "worker": ("harmont.wsgi:application", None),
    "asgi": ("harmont.asgi:application", "uvicorn_worker.UvicornWorker"),
    "wsgi": ("harmont.wsgi:application", "sync"),
}
PRODUCTION_CONFIG = "python:harmont.gunicorn_conf"


def start_server(port: int, log_path: Path, env: dict[str, str], *, interface: Literal["worker", "asgi", "wsgi"]
                 = "worker", workers: int = WORKERS, config: Path | None = None) -> subprocess.Popen:
    """gunicorn on 127.0.0.1:`port`, access log off; returns once every worker is up.

    `config`: a gunicorn config file (only the benchmarks' experiments use one; it starts from
    harmont/gunicorn_conf.py's settings, see `experiment_config`).
    """
    app, worker_class = ENTRY_POINTS[interface]
    cmd = [sys.executable, "-m", "gunicorn", app, "--bind", f"127.0.0.1:{port}",
           "--workers", str(workers), "--graceful-timeout", "5", "--log-level", "warning"]
    cmd += ["--worker-class", worker_class, "--no-control-socket"] if worker_class else []
    # no --access-logfile: access log off
    cmd += ["-c", str(config)] if config else (["-c", PRODUCTION_CONFIG] if worker_class is None else [])
    with log_path.open("w") as log:
        # Its own session: cleanup can kill the whole group (master and workers) at once.
        proc = subprocess.Popen(cmd, cwd=BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            stop_group(proc)
            raise RuntimeError(f"gunicorn did not answer /healthz in 30 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    # /healthz answered from one worker; wait until every worker is up, so none is still
    # importing Django during the first measurement.
    deadline = time.monotonic() + 30
    while len(children_of(proc.pid)) < workers and time.monotonic() < deadline:
        time.sleep(0.2)
    return proc


def stop_group(proc: subprocess.Popen, *, grace: float = 10.0) -> None:
    """SIGTERM the process group `proc` leads, SIGKILL it after `grace` seconds (as the agent stops commands)."""
    stop_process_group(proc, grace=grace)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


# ------------------------------------------------------------------ server experiments
#
# Experiments, not the product: a gunicorn `post_worker_init` hook (a config file in the
# run's temp dir) replaces functions in every worker, to measure what a change to the
# server would buy before it is made. bench/stream/experiments.py has a table of them
# (`stream_bench.py --server-experiment`); the dispatch changes they once measured are in
# the code now.


def experiment_config(names: list[str], table: dict[str, str]) -> str:
    """A gunicorn config file whose post_worker_init applies the named experiments and says so."""
    body = "".join(table[name] for name in names)
    marker = ("\n    import os, sys\n    print(f'harmont-bench experiment applied in pid {os.getpid()}', "
              "file=sys.stderr, flush=True)\n")
    return f"from harmont.gunicorn_conf import *  # noqa: F403\n\n\ndef post_worker_init(worker):\n{body}{marker}"


def wait_for_experiment(log_path: Path, workers: int = WORKERS, timeout: float = 30) -> None:
    """Every worker prints a marker once its post_worker_init applied the experiment."""
    deadline = time.monotonic() + timeout
    while (applied := log_path.read_text().count("harmont-bench experiment applied")) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server experiment was applied in {applied} of {workers} workers:\n"
                               f"{log_path.read_text()[-2000:]}")
        time.sleep(0.2)
