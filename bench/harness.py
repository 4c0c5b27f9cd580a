"""What the benchmarks share: the local PostgreSQL, free ports, and CPU accounting from /proc."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import time
from pathlib import Path

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------ CPU accounting
#
# This box has 2 cores and is shared: other processes steal CPU from a measurement.
# CPU seconds per request (or per job) is what the work costs; contention moves it
# much less than req/s.

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[str] | None:
    try:
        # Fields after the parenthesised command name: state, ppid, ..., utime (12th), stime (13th),
        # cutime, cstime (reaped children).
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_cpu(pid: int, *, with_children: bool = False) -> float | None:
    fields = stat_fields(pid)
    if not fields:
        return None
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields and fields[1] == str(pid):
                found.append(int(entry.name))
    return found


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def own_cpu_seconds() -> float:
    """This process plus its reaped children (wrk)."""
    mine, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + kids.ru_utime + kids.ru_stime
