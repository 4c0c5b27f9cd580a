"""The definitions the plan bench creates builds from, and what it times for each."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def flat(segment_sizes: list[int]) -> dict[str, Any]:
    """Flat-form steps in segments of the given sizes, a `wait` between consecutive ones."""
    steps: list[dict[str, Any]] = []
    for number, size in enumerate(segment_sizes):
        if number:
            steps.append({"type": "wait"})
        steps += [{"type": "command", "key": f"s{number}-{i}", "cmd": f"echo {number} {i}"} for i in range(size)]
    return {"version": "0", "steps": steps}


def graph(segment_sizes: list[int]) -> dict[str, Any]:
    """The same in the graph form, as `harmont` renders a wait: an edge for every pair around it."""
    nodes: list[dict[str, Any]] = []
    edges: list[list[Any]] = []
    previous: list[int] = []
    for number, size in enumerate(segment_sizes):
        current = list(range(len(nodes), len(nodes) + size))
        nodes += [{"step": {"key": f"s{number}-{i}", "cmd": f"echo {number} {i}"}, "env": {}} for i in range(size)]
        edges += [[before, after, "depends_on"] for before in previous for after in current]
        previous = current
    return {"version": "0", "graph": {"nodes": nodes, "edges": edges, "node_holes": [], "edge_property": "directed"}}


@dataclass(frozen=True)
class Case:
    key: str
    title: str
    document: dict[str, Any]
    pairs: int  # the (prerequisite, dependant) pairs its waits mean: what N×M edges would have stored
    rounds: int | None = None  # fewer builds than the others (the slow comparison)


def cases(steps: int) -> list[Case]:
    half, tenth = steps // 2, steps // 10
    return [
        Case("baseline", f"{steps} independent steps (the baseline)", flat([steps]), 0),
        Case("half", f"{half} steps, a wait, {half} steps", flat([half, half]), half * half),
        Case("tenths", f"10 segments of {tenth} steps, 9 waits", flat([tenth] * 10), 9 * tenth * tenth),
        # What a wait cost when it was stored as an edge per pair (the graph form still states it
        # so, past HARMONT_MAX_BUILD_EDGES, which the bench lifts for this case alone).
        Case("half-edges", f"{half} + {half}, an edge per pair (graph form)", graph([half, half]), half * half,
             rounds=1),
    ]


@dataclass(frozen=True)
class Timing:
    plan: float  # seconds, median
    create: float  # plan + insert through create_build
    jobs_json: float  # the job list's rows and JSON (selectors.build_jobs + JobSerializer)
    settle: float  # settle_build after the first job failed (skips every job after it)
    edges: int  # JobDependency rows stored
    depends_on: int  # ids in the job list's depends_on, all jobs together


def median_of(rounds: int, work: Callable[[], Any]) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(case: Case, pipeline: Any, rounds: int) -> Timing:
    """Median times over `rounds` builds of `case` on `pipeline` (PostgreSQL, through the services)."""
    import json

    from builds import selectors, services, states
    from builds.models import Job, JobDependency, JobState
    from builds.serializers import JobSerializer
    from pipelines import ir

    from django.conf import settings

    settings.MAX_BUILD_EDGES = max(settings.MAX_BUILD_EDGES, case.pairs)
    ir.plan_ir(case.document)  # warm-up: the first call pays for imports and caches
    rounds = case.rounds or rounds
    plan = median_of(rounds, lambda: ir.plan_ir(case.document))
    builds = []

    def create() -> None:
        request = services.validate_build_request(branch="main", commit="HEAD", pipeline_ir=case.document)
        builds.append(services.create_build(pipeline=pipeline, request=request))

    create_time = median_of(rounds, create)
    last = builds[-1]
    sizes = []

    def jobs_json() -> None:
        sizes.append(sum(len(job["depends_on"]) for job in json.loads(json.dumps(
            JobSerializer(selectors.build_jobs(last), many=True).data))))

    jobs_time = median_of(rounds, jobs_json)
    settle_times = []
    for build in builds[:rounds]:
        first = Job.objects.filter(build=build).order_by("position").first()
        states.transition_jobs([first.pk], to=JobState.TIMED_OUT, now=first.created_at)
        started = time.perf_counter()
        states.settle_build(build_id=build.pk)
        settle_times.append(time.perf_counter() - started)
    return Timing(plan=plan, create=create_time, jobs_json=jobs_time, settle=statistics.median(settle_times),
                  edges=JobDependency.objects.filter(job__build=last).count(), depends_on=sizes[-1])
