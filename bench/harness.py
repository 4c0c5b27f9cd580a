"""What every benchmark run is made of: the local PostgreSQL, a scratch database on it, Django
pointed at that database, a temp dir, and the cleanup of whatever the run started (`ScratchRun`).

Nothing here sets the environment or touches a database at import.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import psycopg
from psycopg import sql

BASE_DIR = Path(__file__).resolve().parent.parent
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"


def say(message: str = "") -> None:
    print(message, flush=True)


def verdict(ok: bool) -> str:
    """How a target's line ends; the arrows make a miss easy to find in a long output."""
    return "PASS" if ok else "FAIL  <<<"


# Above this share of the CPUs taken by other processes, a run says its figures are disturbed.
NOISY_SHARE = 0.15


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raise_on_sigterm() -> None:
    """SIGTERM (e.g. a CI timeout) runs the `finally` cleanups, like Ctrl-C does."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


# ------------------------------------------------------------------ PostgreSQL


def admin_connect() -> psycopg.Connection:
    return psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True,
                           connect_timeout=3)


def postgres_answers() -> bool:
    try:
        admin_connect().close()
        return True
    except psycopg.OperationalError:
        return False


def ensure_postgres() -> None:
    """Start the local cluster if it is not answering (as .ci/run does)."""
    if postgres_answers():
        return
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions:
        raise SystemExit(f"PostgreSQL is not answering on {PG_HOST}:{PG_PORT} and no cluster is installed.")
    say(f"PostgreSQL not answering; starting cluster {versions[-1]}/main")
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"], check=True)
    deadline = time.monotonic() + 30
    while not postgres_answers():
        if time.monotonic() > deadline:
            raise SystemExit(f"PostgreSQL did not answer on {PG_HOST}:{PG_PORT} within 30 s of starting it.")
        time.sleep(0.5)


def database_url(name: str) -> str:
    return f"postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"


def drop_database(name: str) -> None:
    with admin_connect() as conn:
        # FORCE: a leftover server from an interrupted run must not keep the database alive.
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def create_database(name: str) -> None:
    drop_database(name)
    with admin_connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


class DbCounters(NamedTuple):
    xacts: int  # transactions committed or rolled back; every autocommit statement is one
    sessions: int  # connections opened


def db_counters(name: str) -> DbCounters:
    """`name`'s counters in pg_stat_database so far.

    Read through the `postgres` database, so reading does not count itself. PostgreSQL
    flushes a backend's statistics at most once a second: sleep 1.1 s before reading.
    """
    with admin_connect() as conn:
        row = conn.execute("SELECT xact_commit + xact_rollback, sessions FROM pg_stat_database WHERE datname = %s",
                           (name,)).fetchone()
    return DbCounters(int(row[0]), int(row[1])) if row else DbCounters(0, 0)


def db_backend_pids(name: str, conn: psycopg.Connection | None = None) -> list[int]:
    """Backends connected to `name`; pass a kept-open `conn` when connection slots may run out."""
    query = "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
    if conn is not None:
        return [int(pid) for (pid,) in conn.execute(query, (name,)).fetchall()]
    with admin_connect() as own:
        return [int(pid) for (pid,) in own.execute(query, (name,)).fetchall()]


# ------------------------------------------------------------------ Django


def configure_django(db_name: str, *, media_root: Path, settings_module: str = "harmont.settings") -> dict[str, str]:
    """Point this process (and, through the returned environment, the server) at the scratch database.

    The settings are read from the environment when Django sets up, so this comes first.
    By default the production settings module: the server should be exactly what
    `make run` serves. Only the API bench passes `bench.settings`, for its baseline route.
    """
    env = dict(os.environ)
    env.update({
        "DJANGO_SETTINGS_MODULE": settings_module,
        "DATABASE_URL": database_url(db_name),
        "HARMONT_SECRET_KEY": os.environ.get("HARMONT_SECRET_KEY") or secrets.token_urlsafe(50),
        "HARMONT_DEBUG": "0",  # DEBUG keeps every query in memory; never measure that
        # What the load and the checks send; testserver: the in-process query counts go
        # through django.test.Client.
        "HARMONT_ALLOWED_HOSTS": "127.0.0.1,localhost,testserver",
        "HARMONT_LOG_LEVEL": os.environ.get("HARMONT_LOG_LEVEL", "WARNING"),
        "HARMONT_MEDIA_ROOT": str(media_root),
        "PYTHONUNBUFFERED": "1",
    })
    os.environ.update(env)
    return env


def close_django_connections() -> None:
    try:
        from django.db import connections

        connections.close_all()
    except Exception:  # noqa: BLE001 (Django may not have been set up)
        pass


# ------------------------------------------------------------------ one run


class ScratchRun:
    """One benchmark run: a fresh database `db_name`, a temp dir (`work`), Django set up on both.

    Use as a context manager. On the way out, whatever was registered with `defer` is
    undone first, last registered first (agents before the server they talk to), then
    Django's connections are closed, the temp dir is removed and the database dropped,
    unless `keep` (then `keep_notes` are printed instead). An error prints the tail of
    the server's log (`server_log`), which is what says why a server did not start.
    SIGTERM runs the same cleanup.
    """

    def __init__(self, db_name: str, *, prefix: str, keep: bool, settings_module: str = "harmont.settings") -> None:
        self.db_name, self.prefix, self.keep, self.settings_module = db_name, prefix, keep, settings_module
        self.keep_notes = [f"kept database {db_name}"]
        self.env: dict[str, str] = {}
        self._work: Path | None = None
        self._undo = ExitStack()

    @property
    def work(self) -> Path:
        """The run's temp dir: logs, the agents' workspaces, media."""
        if self._work is None:
            raise RuntimeError("the run has not started")
        return self._work

    @property
    def server_log(self) -> Path:
        return self.work / "gunicorn.log"

    def defer(self, callback: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run `callback(*args, **kwargs)` when the run ends, however it ends."""
        self._undo.callback(callback, *args, **kwargs)

    def __enter__(self) -> ScratchRun:
        raise_on_sigterm()
        ensure_postgres()
        create_database(self.db_name)
        self._work = Path(tempfile.mkdtemp(prefix=self.prefix))
        try:
            self.env = configure_django(self.db_name, media_root=self.work / "media",
                                        settings_module=self.settings_module)
            import django

            django.setup()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        log = self.server_log
        if exc_type is not None and log.exists() and log.stat().st_size:
            say(f"--- gunicorn log (last lines) ---\n{log.read_text()[-3000:]}")
        try:
            self._undo.close()
        finally:
            close_django_connections()
            shutil.rmtree(self.work, ignore_errors=True)
            if self.keep:
                for note in self.keep_notes:
                    say(note)
            else:
                drop_database(self.db_name)
