"""The API bench's data: one pipeline with 10,000 builds, seeded in-process through the services."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from bench.api import BATCH, BUILDS, MIDDLE
from bench.seeding import analyze, migrate_and_create_user

# A small stored definition of the shape `hm.pipeline([...])` renders: a -> b, c after a.
DEFINITION: dict[str, Any] = {
    "version": "0",
    "timeout_seconds": 600,
    "graph": {
        "nodes": [
            {"step": {"key": "setup", "cmd": "make deps", "label": "setup", "image": "python:3.11"}, "env": {}},
            {"step": {"key": "test", "cmd": "make test", "label": "test"}, "env": {"CI": "1"}},
            {"step": {"key": "lint", "cmd": "make lint", "label": "lint", "timeout_seconds": 120}, "env": {}},
        ],
        "edges": [[0, 1, "builds_in"], [0, 2, "depends_on"]],
        "node_holes": [],
        "edge_property": "directed",
    },
}
BRANCHES = ["main"] * 5 + ["develop", "release/1.x"] + [f"feature/topic-{i}" for i in range(13)]


@dataclass(frozen=True)
class Seed:
    org: str
    pipeline: str
    token: str
    middle_build_id: str


def migrate_and_seed() -> Seed:
    from django.db import transaction
    from django.utils import timezone

    from builds.models import Build, BuildSource, BuildState
    from organizations.services import create_organization, create_personal_token
    from pipelines.models import Pipeline
    from pipelines.services import create_pipeline

    user = migrate_and_create_user()
    org = create_organization(name="bench", owner=user)
    pipeline = create_pipeline(org=org, name="app", repository="https://example.com/bench/app.git",
                               default_branch="main", definition=DEFINITION)
    token = create_personal_token(user=user, description="bench").raw

    start = timezone.now() - timedelta(minutes=BUILDS)
    finished = [BuildState.PASSED] * 7 + [BuildState.FAILED, BuildState.FAILED, BuildState.CANCELED]

    def build(number: int) -> Build:
        created = start + timedelta(minutes=number)
        # The newest few are still queued or running, like a live pipeline.
        if number > BUILDS - 3:
            state = BuildState.SCHEDULED
        elif number > BUILDS - 6:
            state = BuildState.RUNNING
        else:
            state = finished[(number * 7) % len(finished)]
        done = state not in (BuildState.SCHEDULED, BuildState.RUNNING)
        return Build(
            pipeline=pipeline, number=number, state=state, branch=BRANCHES[(number * 11) % len(BRANCHES)],
            commit=hashlib.sha1(str(number).encode()).hexdigest(), message=f"Change number {number}",
            source=BuildSource.WEBHOOK if number % 3 else BuildSource.API, env={"BENCH": "1"},
            # create_build stores the IR it planned from on every build; so do we, for realistic rows.
            pipeline_ir=DEFINITION, timeout_seconds=600, created_by=user, created_at=created,
            scheduled_at=created, started_at=None if state == BuildState.SCHEDULED else created + timedelta(seconds=5),
            finished_at=created + timedelta(seconds=95) if done else None,
        )

    with transaction.atomic():
        for first in range(1, BUILDS + 1, BATCH):
            Build.objects.bulk_create([build(n) for n in range(first, min(first + BATCH, BUILDS + 1))])
        Pipeline.objects.filter(pk=pipeline.pk).update(build_counter=BUILDS)
    analyze()
    middle = Build.objects.get(pipeline=pipeline, number=MIDDLE)
    return Seed(org=org.slug, pipeline=pipeline.slug, token=token, middle_build_id=str(middle.id))
