"""Load generators: wrk, and for the API bench a small Python fallback where wrk is missing."""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

CONNECTIONS, THREADS = 8, 2  # every wrk run of the benchmarks: 8 keep-alive connections on 2 threads

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


@dataclass
class LoadResult:
    rps: float
    requests: int
    p50_ms: float | None = None
    notes: list[str] = field(default_factory=list)


def wrk_version() -> str | None:
    """wrk's name and version as it prints them, or None if it is not installed."""
    wrk = shutil.which("wrk")
    if not wrk:
        return None
    version = subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    return version.split(" [")[0] or "wrk"


def run_wrk(url: str, *, seconds: float, headers: dict[str, str] | None = None) -> LoadResult:
    """`GET url` for `seconds` with wrk; a non-2xx response is an error, not a measurement."""
    cmd = ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--latency"]
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rps or not total:
        raise RuntimeError(f"could not read wrk's output:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if bad:
        raise RuntimeError(f"{bad.group(1)} non-2xx responses from {url}; not measuring an error page:\n{out}")
    result = LoadResult(rps=float(rps.group(1)), requests=int(total.group(1)))
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if p50:
        result.p50_ms = float(p50.group(1)) * _UNITS_MS[p50.group(2)]
    errors = re.search(r"Socket errors: (.*)", out)
    if errors:
        result.notes.append(f"socket errors: {errors.group(1)}")
    return result


def run_python_load(url: str, *, seconds: float, headers: dict[str, str] | None = None) -> LoadResult:
    """CONNECTIONS threads, each with one http.client connection, re-opened when the server closes it."""
    parsed = urllib.parse.urlsplit(url)
    path = parsed.path + (f"?{parsed.query}" if parsed.query else "")
    deadline = time.monotonic() + seconds
    latencies: list[list[float]] = [[] for _ in range(CONNECTIONS)]
    failures = [0] * CONNECTIONS

    def worker(slot: int) -> None:
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
        mine = latencies[slot]
        while time.monotonic() < deadline:
            began = time.perf_counter()
            try:
                conn.request("GET", path, headers=headers or {})
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                conn.close()  # the next request() reconnects
                failures[slot] += 1
                continue
            if response.status != 200:
                failures[slot] += 1
                continue
            mine.append(time.perf_counter() - began)
        conn.close()

    began = time.monotonic()
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(CONNECTIONS)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    elapsed = time.monotonic() - began
    done = sorted(x for slot in latencies for x in slot)
    if sum(failures):
        raise RuntimeError(f"{sum(failures)} failed requests to {url}; not measuring an error page")
    result = LoadResult(rps=len(done) / elapsed, requests=len(done))
    if done:
        result.p50_ms = done[len(done) // 2] * 1000
    return result
