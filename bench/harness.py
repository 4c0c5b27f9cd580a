"""What the benchmarks share: the local PostgreSQL they run on."""

from __future__ import annotations

import os
import subprocess
import time

import psycopg

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"


def say(message: str = "") -> None:
    print(message, flush=True)


def admin_connect() -> psycopg.Connection:
    return psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True,
                           connect_timeout=3)


def ensure_postgres() -> None:
    """Start the local cluster if it is not answering (as .ci/run does)."""
    try:
        admin_connect().close()
        return
    except psycopg.OperationalError:
        pass
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions:
        raise SystemExit(f"PostgreSQL is not answering on {PG_HOST}:{PG_PORT} and no cluster is installed.")
    say(f"PostgreSQL not answering; starting cluster {versions[-1]}/main")
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"], check=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            admin_connect().close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
