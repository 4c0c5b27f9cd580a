"""Build numbers stay 1..N with no gap or duplicate when many creates race (PostgreSQL).

SQLite serialises writers on the whole database, so the race only exists on
PostgreSQL; there the pipeline row lock taken by the counter UPDATE is what
queues concurrent creates.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from builds import services as build_services
from builds.models import Build, Job
from pipelines.models import Pipeline
from tests.helpers import bearer, builds_url, cyclic_ir, is_postgres, race, two_step_ir

THREADS = 20


@pytest.fixture
def postgres_only() -> None:
    if not is_postgres():
        pytest.skip("concurrent build numbering needs PostgreSQL (SQLite serialises all writers)")


def numbers_of(pipeline: Pipeline) -> list[int]:
    return sorted(Build.objects.filter(pipeline=pipeline).values_list("number", flat=True))


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_creates_get_numbers_1_to_n(postgres_only, api, pipeline):
    url = builds_url(pipeline)

    def create(i: int) -> tuple[int, int]:
        response = bearer(api.raw_token).post(url, {"branch": "main", "commit": f"c{i:07x}"}, format="json")
        return response.status_code, response.json().get("number")

    results = race(THREADS, create)

    assert [status for status, _ in results] == [201] * THREADS
    returned = sorted(number for _, number in results)
    assert returned == list(range(1, THREADS + 1))
    assert numbers_of(pipeline) == returned
    pipeline.refresh_from_db()
    assert pipeline.build_counter == THREADS
    # Every build got its own two jobs.
    assert Counter(Job.objects.filter(build__pipeline=pipeline).values_list("build_id", flat=True)) == {
        build_id: 2 for build_id in Build.objects.filter(pipeline=pipeline).values_list("id", flat=True)}


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_rejected_plans_take_numbers_but_invalid_requests_do_not(postgres_only, api, pipeline):
    url = builds_url(pipeline)
    # Every 3rd request has a cyclic IR (row recorded as failed), every 5th is missing its branch (no row).
    bodies = []
    for i in range(THREADS + 5):
        body: dict[str, Any] = {"branch": "main", "commit": f"c{i:07x}"}
        if i % 5 == 4:
            del body["branch"]
        elif i % 3 == 0:
            body["pipeline_ir"] = cyclic_ir()
        bodies.append(body)
    invalid = sum(1 for body in bodies if "branch" not in body)
    rejected = sum(1 for body in bodies if "pipeline_ir" in body)
    recorded = len(bodies) - invalid

    def create(i: int) -> int:
        return bearer(api.raw_token).post(url, bodies[i], format="json").status_code

    statuses = race(len(bodies), create)

    assert Counter(statuses) == {201: recorded - rejected, 422: invalid + rejected}
    assert numbers_of(pipeline) == list(range(1, recorded + 1))
    assert Build.objects.filter(pipeline=pipeline, state="failed", error_code="cycle").count() == rejected
    assert not Job.objects.filter(build__pipeline=pipeline, build__error_code="cycle").exists()
    pipeline.refresh_from_db()
    assert pipeline.build_counter == recorded


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_creates_through_the_service_on_two_pipelines(postgres_only, pipeline, org):
    from pipelines import services as pipeline_services

    second = pipeline_services.create_pipeline(org=org, name="Second", repository="https://github.com/acme/two",
                                               default_branch="main", definition=two_step_ir())
    targets = [pipeline, second]

    def create(i: int) -> int:
        request = build_services.validate_build_request(branch="main", commit=f"c{i:07x}")
        target = Pipeline.objects.get(pk=targets[i % 2].pk)
        return build_services.create_build(pipeline=target, request=request).number

    race(THREADS, create)

    assert numbers_of(pipeline) == list(range(1, THREADS // 2 + 1))
    assert numbers_of(second) == list(range(1, THREADS // 2 + 1))
