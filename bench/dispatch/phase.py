"""One phase of the dispatch bench: builds created through the REST API, the agents' jobs awaited, and
throughput, latencies and the exactly-once checks read back from the database."""

from __future__ import annotations

import http.client
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cpu import CpuMeter
from bench.dispatch import DB_NAME
from bench.dispatch.agents import AgentProc
from bench.dispatch.diagnostics import ActivitySampler
from bench.dispatch.seed import Seed, build_body
from bench.harness import db_counters, loadavg


@dataclass
class Phase:
    name: str
    builds: int
    jobs_per_build: int
    interval: float  # seconds between build creations (0: back to back)
    numbers: list[int] = field(default_factory=list)
    create_seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    xacts: int = 0
    load_before: str = ""
    load_after: str = ""
    activity: dict[str, float] = field(default_factory=dict)
    lock_queries: list[tuple[str, int]] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def jobs(self) -> int:
        return self.builds * self.jobs_per_build


def create_builds(phase: Phase, *, port: int, seed: Seed, runs_file: Path, first_index: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    path = f"/api/v0/organizations/{seed.org}/pipelines/{seed.pipeline}/builds"
    headers = {"Authorization": f"Bearer {seed.api_token}", "Content-Type": "application/json"}
    began = time.monotonic()
    try:
        for i in range(phase.builds):
            if phase.interval:
                delay = began + i * phase.interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            conn.request("POST", path, body=json.dumps(build_body(first_index + i, runs_file)), headers=headers)
            response = conn.getresponse()
            data = response.read()
            if response.status != 201:
                raise RuntimeError(f"POST {path} -> {response.status} {data[:300]!r}")
            phase.numbers.append(json.loads(data)["number"])
    finally:
        conn.close()
    phase.create_seconds = time.monotonic() - began


def wait_until_done(phase: Phase, seed: Seed, agents: list[AgentProc], timeout: float) -> None:
    from builds.models import Job
    from builds.states import TERMINAL_JOB_STATES

    deadline = time.monotonic() + timeout
    jobs = Job.objects.filter(build__pipeline__organization__slug=seed.org, build__number__in=phase.numbers)
    while True:
        left = jobs.exclude(state__in=TERMINAL_JOB_STATES).count()
        if left == 0:
            return
        dead = [a for a in agents if a.process.poll() is not None]
        if dead:
            raise RuntimeError(f"agent {dead[0].name} exited with {dead[0].process.returncode}:\n"
                               f"{dead[0].log_path.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"phase {phase.name}: {left} jobs still unfinished after {timeout:.0f} s")
        time.sleep(0.1)


def analyse(phase: Phase, seed: Seed, runs: Counter) -> None:
    """Throughput, latencies and the exactly-once checks, from the database and the runs file."""
    from builds.models import Build, Job, JobState, LogChunk

    builds = Build.objects.filter(pipeline__organization__slug=seed.org, number__in=phase.numbers)
    rows = list(Job.objects.filter(build__in=builds).values_list(
        "id", "state", "exit_code", "agent_id", "scheduled_at", "assigned_at", "started_at", "finished_at"))
    first_created = min(builds.values_list("created_at", flat=True))
    last_finished = max(r[7] for r in rows)
    last_scheduled = max(r[4] for r in rows)
    span = (last_finished - first_created).total_seconds()
    claim = [(r[5] - r[4]).total_seconds() for r in rows]
    start = [(r[6] - r[5]).total_seconds() for r in rows]
    run = [(r[7] - r[6]).total_seconds() for r in rows]
    cycle: list[float] = []
    by_agent: dict[Any, list[tuple]] = {}
    for r in rows:
        by_agent.setdefault(r[3], []).append(r)
    for jobs in by_agent.values():
        jobs.sort(key=lambda r: r[5])
        # Agent's time from one claim to its next claim, while the queue was never empty.
        cycle += [(b[5] - a[5]).total_seconds() for a, b in zip(jobs, jobs[1:]) if b[4] <= a[7]]
    ids = [str(r[0]) for r in rows]
    ran = [runs.get(job_id, 0) for job_id in ids]
    starts = Counter(LogChunk.objects.filter(job__build__in=builds, stream_kind=2,
                                             content__startswith="harmont-agent: running ").values_list(
                                                 "job_id", flat=True))
    phase.result = {
        "jobs": len(rows),
        "span": span,
        "jobs_per_s": len(rows) / span if span else 0.0,
        "arrival_span": (last_scheduled - first_created).total_seconds(),
        "claim": claim, "start": start, "run": run, "cycle": cycle,
        "passed": sum(1 for r in rows if r[1] == JobState.PASSED and r[2] == 0),
        "ran_once": sum(1 for n in ran if n == 1),
        "ran_twice": sum(1 for n in ran if n > 1),
        "never_ran": sum(1 for n in ran if n == 0),
        "one_start_line": sum(1 for r in rows if starts.get(r[0], 0) == 1),
        "agents_used": len(by_agent),
        "builds_passed": builds.filter(state="passed").count(),
        "builds": builds.count(),
    }


def read_runs(path: Path) -> Counter:
    """Job id -> how many times its command ran (the default command appends the id to the file)."""
    if not path.exists():
        return Counter()
    return Counter(line.strip() for line in path.read_text().splitlines() if line.strip())


def run_phase(phase: Phase, *, port: int, seed: Seed, runs_file: Path, first_index: int, agents: list[AgentProc],
              meter: CpuMeter, relations: dict[int, str]) -> None:
    """Creates the phase's builds, waits until the agents have ended every job, and records what it cost."""
    phase.load_before = loadavg()
    time.sleep(1.1)  # PostgreSQL flushes a backend's statistics at most once a second
    xacts = db_counters(DB_NAME).xacts
    before = meter.snapshot()
    with ActivitySampler(DB_NAME, relations) as activity:
        create_builds(phase, port=port, seed=seed, runs_file=runs_file, first_index=first_index)
        wait_until_done(phase, seed, agents, timeout=max(120.0, phase.jobs * 0.5))
    phase.cpu = CpuMeter.delta(before, meter.snapshot())
    phase.activity = {key: activity.mean(key) for key in ("active", "lock wait", "idle in transaction")}
    phase.lock_queries = activity.lock_tables.most_common(3)
    time.sleep(1.1)
    phase.xacts = db_counters(DB_NAME).xacts - xacts
    phase.load_after = loadavg()
    analyse(phase, seed, read_runs(runs_file))
