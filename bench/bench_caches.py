"""What deciding step cache hits costs the server: `make bench-caches`.

One run: a fresh PostgreSQL database, one organization with a pipeline, and a
cache table that already holds other entries (50,000 by default, spread over 50
other pipelines and both scopes), as an organization that has used caches for a
while has. Every build is created through the REST API in-process
(django.test.Client, the whole middleware stack), so a time is the server's
time for the request. Medians and p95 over `--rounds` builds of each kind:

1. the baseline: 10 steps, each with a `builds_in` child (20 jobs), no cache;
2. the same steps with `cache: forever`, every key new (10 misses: keys
   computed, one lookup that finds nothing);
3. the same with every key an entry (10 hits: the lookup, the hits' log
   lines, the settle that passes them and schedules their children);
4. 1, 10 and 50 hits, for the cost of one more cached step, and 100 jobs
   without a cache beside the 50 hits.

Then a parent whose finish releases 10 `depends_on` dependents, cached (the
settle passes them) or not (scheduled), through `finish_job`. Target: a build
whose cached steps all hit is created, hits decided, in under 200 ms of server time.

Usage: .venv/bin/python bench/bench_caches.py [--rounds N] [--entries N] [--keep] [--db NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import rootpath  # noqa: F401 (before any `bench` import: puts the project root on sys.path)

from bench.harness import ScratchRun, loadavg, percentile, say, verdict
from bench.seeding import analyze, migrate_and_create_user

DB_NAME = os.environ.get("HARMONT_BENCH_CACHES_DB", "harmont_bench_caches")
TARGET_MS = 200.0
FOREVER = {"policy": "forever", "env_keys": []}


def steps_ir(count: int, *, cached: bool, salt: str = "") -> dict[str, Any]:
    """`count` setup steps, each with a `builds_in` child, as `harmont` renders them; cached ones `forever`."""
    nodes: list[dict[str, Any]] = []
    edges: list[list[Any]] = []
    for i in range(count):
        setup: dict[str, Any] = {"key": f"setup-{i}", "cmd": f"install tool {i} {salt}".strip(),
                                 "image": "ubuntu:24.04"}
        if cached:
            setup["cache"] = FOREVER
        nodes.append({"step": setup, "env": {}})
        nodes.append({"step": {"key": f"test-{i}", "cmd": f"make test {i}"}, "env": {}})
        edges.append([2 * i, 2 * i + 1, "builds_in"])
    return {"version": "0", "graph": {"nodes": nodes, "edges": edges, "node_holes": [], "edge_property": "directed"}}


def released_ir(count: int, *, cached: bool, salt: str) -> dict[str, Any]:
    """A parent and `count` steps that `depends_on` it (cached or not): what its finish releases."""
    nodes: list[dict[str, Any]] = [{"step": {"key": "parent", "cmd": f"build {salt}"}, "env": {}}]
    for i in range(count):
        step: dict[str, Any] = {"key": f"after-{i}", "cmd": f"check {i}", "image": "ubuntu:24.04"}
        if cached:
            step["cache"] = FOREVER
        nodes.append({"step": step, "env": {}})
    edges = [[0, i + 1, "depends_on"] for i in range(count)]
    return {"version": "0", "graph": {"nodes": nodes, "edges": edges, "node_holes": [], "edge_property": "directed"}}


@dataclass
class Site:
    client: Any
    url: str
    pipeline: Any


def create(site: Site, ir: dict[str, Any]) -> tuple[float, int, str]:
    """POST one build; (seconds, queries, build id)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    body = json.dumps({"branch": "main", "commit": "HEAD", "pipeline_ir": json.dumps(ir)})
    with CaptureQueriesContext(connection) as queries:
        started = time.perf_counter()
        response = site.client.post(site.url, body, content_type="application/json")
        elapsed = time.perf_counter() - started
    if response.status_code != 201:
        raise SystemExit(f"create build: {response.status_code} {response.content[:300]!r}")
    return elapsed, len(queries), response.json()["id"]


def run_passing(build_id: str) -> None:
    """Pass every job agents would take, in order, as agents would (through the services)."""
    from builds import services
    from builds.models import Job, JobState

    while True:
        scheduled = list(Job.objects.filter(build_id=build_id, state=JobState.SCHEDULED).order_by("position"))
        if not scheduled:
            return
        for job in scheduled:
            services.move_job(job=job, state=JobState.ASSIGNED)
            services.move_job(job=job, state=JobState.RUNNING)
            job.refresh_from_db()
            services.finish_job(job=job, state=JobState.PASSED, exit_code=0)


def seed_other_entries(org: Any, count: int) -> None:
    """`count` entries of 50 other pipelines, on `main` and on feature branches, in batches."""
    from django.utils import timezone

    from builds.models import CacheEntry, Job, SecretAccess
    from pipelines.services import create_pipeline

    if not count:
        return
    now = timezone.now()
    others = [create_pipeline(org=org, name=f"other-{i}", repository="", default_branch="main") for i in range(50)]
    # Any passed job will do as what they name: nothing here reads it.
    owner = Job.objects.filter(organization_id=org.pk, state="passed").first()
    batch: list[CacheEntry] = []
    for i in range(count):
        batch.append(CacheEntry(organization_id=org.pk, pipeline=others[i % 50], step_key=f"setup-{i % 20}",
                                key=uuid.uuid4().hex * 2, branch="main" if i % 3 else f"feature/{i}",
                                secret_access=SecretAccess.UNPROTECTED, job=owner, created_at=now, last_used_at=now))
        if len(batch) == 5000:
            CacheEntry.objects.bulk_create(batch)
            batch = []
    CacheEntry.objects.bulk_create(batch)


@dataclass(frozen=True)
class Row:
    title: str
    times: list[float]
    queries: int

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1000

    @property
    def p95_ms(self) -> float:
        return percentile(self.times, 95) * 1000


def rounds_of(site: Site, title: str, rounds: int, ir_for_round: Any, *, check: Any = None) -> Row:
    times: list[float] = []
    counts: set[int] = set()
    for number in range(rounds):
        elapsed, queries, build_id = create(site, ir_for_round(number))
        if check is not None:
            check(build_id)
        times.append(elapsed)
        counts.add(queries)
    if len(counts) != 1:
        say(f"  note: {title} ran {sorted(counts)} queries in different rounds")
    return Row(title, times, max(counts))


def hits_of(build_id: str, expected: int) -> None:
    from builds.models import Job

    hits = Job.objects.filter(build_id=build_id, reused_job__isnull=False, state="passed").count()
    if hits != expected:
        raise SystemExit(f"build {build_id}: {hits} cached jobs passed, expected {expected}")


def release_time(site: Site, *, cached: bool, rounds: int, count: int) -> list[float]:
    """finish_job of the parent releasing `count` dependents; the dependents' entries made by a first build."""
    from builds import services
    from builds.models import Job, JobState

    run_passing(create(site, released_ir(count, cached=cached, salt="first"))[2])
    times = []
    for number in range(rounds):
        build_id = create(site, released_ir(count, cached=cached, salt=f"round {number}"))[2]
        parent = Job.objects.get(build_id=build_id, step_key="parent")
        services.move_job(job=parent, state=JobState.ASSIGNED)
        services.move_job(job=parent, state=JobState.RUNNING)
        parent.refresh_from_db()
        started = time.perf_counter()
        services.finish_job(job=parent, state=JobState.PASSED, exit_code=0)
        times.append(time.perf_counter() - started)
        expected = {JobState.PASSED} if cached else {JobState.SCHEDULED}
        states = set(Job.objects.filter(build_id=build_id).exclude(pk=parent.pk).values_list("state", flat=True))
        if states != expected:
            raise SystemExit(f"released dependents are {sorted(states)}, expected {sorted(expected)}")
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="builds of each kind; medians and p95 are reported")
    parser.add_argument("--entries", type=int, default=50_000, help="other entries already in the cache table")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--db", default=DB_NAME, help=f"scratch database (dropped and created; default {DB_NAME})")
    args = parser.parse_args()

    with ScratchRun(args.db, prefix="harmont-bench-caches-", keep=args.keep):
        from django.test import Client

        from organizations.services import create_organization, create_personal_token
        from pipelines.services import create_pipeline

        user = migrate_and_create_user()
        org = create_organization(name="bench", owner=user)
        pipeline = create_pipeline(org=org, name="app", repository="", default_branch="main")
        token = create_personal_token(user=user, description="bench").raw
        client = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
        site = Site(client, f"/api/v0/organizations/{org.slug}/pipelines/{pipeline.slug}/builds", pipeline)

        started = time.monotonic()
        # The entries every later build of `steps_ir(n, cached=True)` hits: made by running one, as agents would.
        for count in (1, 10, 50):
            run_passing(create(site, steps_ir(count, cached=True, salt=f"hits {count}"))[2])
        seed_other_entries(org, args.entries)
        analyze()
        say(f"database {args.db}: seeded in {time.monotonic() - started:.1f} s ({args.entries:,} other entries); "
            f"{args.rounds} builds of each kind; load {loadavg()}")
        create(site, steps_ir(10, cached=False))  # warm-up: imports, connections, caches

        base = rounds_of(site, "20 jobs, no cache (the baseline)", args.rounds, lambda n: steps_ir(10, cached=False))
        miss = rounds_of(site, "20 jobs, 10 cached steps, all missing", args.rounds,
                         lambda n: steps_ir(10, cached=True, salt=f"miss {n}"))
        big = rounds_of(site, "100 jobs, no cache", args.rounds, lambda n: steps_ir(50, cached=False))
        rows = [base, miss]
        for count in (1, 10, 50):
            steps = "1 cached step, a hit" if count == 1 else f"{count} cached steps, all hits"
            rows.append(rounds_of(site, f"{2 * count} jobs, {steps}", args.rounds,
                                  lambda n, count=count: steps_ir(count, cached=True, salt=f"hits {count}"),
                                  check=lambda build_id, count=count: hits_of(build_id, count)))
        plain = release_time(site, cached=False, rounds=args.rounds, count=10)
        cached = release_time(site, cached=True, rounds=args.rounds, count=10)

        say("")
        say(f"{'build created through the API':42} {'median ms':>10} {'p95 ms':>8} {'queries':>8} {'× baseline':>11}")
        rows.append(big)
        for row in rows:
            say(f"{row.title:42} {row.median_ms:10.1f} {row.p95_ms:8.1f} {row.queries:8} "
                f"{row.median_ms / base.median_ms:11.2f}")
        one, fifty = rows[2], rows[4]
        per_step = (fifty.median_ms - one.median_ms) / 49
        say(f"one more cached step that hits (with its child): {per_step:.2f} ms; 50 hits against 100 jobs "
            f"without a cache: × {fifty.median_ms / big.median_ms:.2f}")
        say("")
        say(f"finish of a parent that releases 10 dependents: scheduled {statistics.median(plain) * 1000:.1f} ms, "
            f"cached and passed {statistics.median(cached) * 1000:.1f} ms "
            f"(× {statistics.median(cached) / statistics.median(plain):.2f})")
        say("")
        ten = rows[3]
        say(f"target: 10 cached steps, all hits, created < {TARGET_MS:.0f} ms of server time: "
            f"median {ten.median_ms:.1f} ms, p95 {ten.p95_ms:.1f} ms {verdict(ten.p95_ms < TARGET_MS)}")
        say(f"        50 cached steps, all hits: median {fifty.median_ms:.1f} ms, p95 {fifty.p95_ms:.1f} ms "
            f"{verdict(fifty.p95_ms < TARGET_MS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
