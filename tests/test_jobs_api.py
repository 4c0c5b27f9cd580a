"""Jobs API: a build's jobs in dependency order, and one job."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from builds import services as build_services
from builds.models import Build, EdgeKind, Job, JobDependency, JobState
from tests.helpers import assert_error, builds_url, four_job_ir, iso, make_build, run_job

JOB_KEYS = {"id", "step_key", "name", "command", "state", "exit_code", "error_code", "error_message",
            "depends_on", "soft_failed", "retry_policy", "soft_fail_policy", "attempt", "retry_of", "retried",
            "created_at", "started_at", "finished_at", "agents", "concurrency_group", "concurrency", "waiting_reason",
            "cached", "reused_job"}


def jobs_url(build: Build, suffix: str = "") -> str:
    return builds_url(build.pipeline, f"/{build.number}/jobs{suffix}")


def by_key(build: Build) -> dict[str, Job]:
    return {job.step_key: job for job in Job.objects.filter(build=build)}


def job_body(job: Job, *, depends_on: list[Job], waiting_reason: str | None = None) -> dict[str, Any]:
    job.refresh_from_db()
    return {
        "id": str(job.id), "step_key": job.step_key, "name": job.name, "command": job.command,
        "state": job.state, "exit_code": job.exit_code, "error_code": job.error_code,
        "error_message": job.error_message, "depends_on": [str(p.id) for p in depends_on],
        "soft_failed": job.soft_failed, "retry_policy": job.retry_policy, "soft_fail_policy": job.soft_fail_policy,
        "attempt": job.attempt, "retry_of": None if job.retry_of_id is None else str(job.retry_of_id),
        "retried": job.retried, "created_at": iso(job.created_at),
        "started_at": iso(job.started_at) if job.started_at else None,
        "finished_at": iso(job.finished_at) if job.finished_at else None,
        "agents": {"queue": "default"}, "concurrency_group": None, "concurrency": None,
        "waiting_reason": waiting_reason,
        "cached": job.reused_job_id is not None,
        "reused_job": None if job.reused_job_id is None else str(job.reused_job_id),
    }


@pytest.fixture
def four(pipeline) -> Build:
    return make_build(pipeline, pipeline_ir=four_job_ir())


@pytest.mark.django_db
def test_list_returns_jobs_in_dependency_order_with_full_body(api, four):
    jobs = by_key(four)
    run_job(jobs["deps"], exit_code=0)

    response = api.get(jobs_url(four))

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"data"}
    assert all(set(item) == JOB_KEYS for item in body["data"])
    no_agent = "waiting for an agent with queue=default"  # scheduled, and no agent is connected
    assert body["data"] == [
        job_body(jobs["deps"], depends_on=[]),
        job_body(jobs["build"], depends_on=[jobs["deps"]], waiting_reason=no_agent),
        job_body(jobs["lint"], depends_on=[], waiting_reason=no_agent),
        job_body(jobs["deploy"], depends_on=[jobs["deps"], jobs["build"], jobs["lint"]]),
    ]
    first = body["data"][0]
    assert (first["name"], first["command"], first["state"], first["exit_code"]) == (
        "Dependencies", "make deps", "passed", 0)
    assert first["started_at"] and first["finished_at"]
    assert [j["state"] for j in body["data"]] == ["passed", "scheduled", "scheduled", "pending"]
    assert body["data"][1]["name"] == "build"  # no label: the key


@pytest.mark.django_db
def test_depends_on_spans_both_edge_kinds(four):
    jobs = by_key(four)
    edges = {(e.prerequisite.step_key, e.job.step_key): e.kind
             for e in JobDependency.objects.filter(job__build=four).select_related("job", "prerequisite")}
    assert edges == {
        ("deps", "build"): EdgeKind.BUILDS_IN,
        ("deps", "deploy"): EdgeKind.DEPENDS_ON,
        ("build", "deploy"): EdgeKind.DEPENDS_ON,
        ("lint", "deploy"): EdgeKind.DEPENDS_ON,
    }
    assert jobs["build"].prerequisite_edges.get().kind == EdgeKind.BUILDS_IN


@pytest.mark.django_db
def test_list_orders_by_dependency_not_document_order(api, pipeline):
    # A flat document whose first step needs the last one.
    document = {"version": "0", "steps": [
        {"type": "command", "key": "deploy", "cmd": "make deploy", "depends_on": ["test"]},
        {"type": "command", "key": "build", "cmd": "make build"},
        {"type": "command", "key": "test", "cmd": "make test", "builds_in": "build"},
    ]}
    build = make_build(pipeline, pipeline_ir=document)
    jobs = by_key(build)

    data = api.get(jobs_url(build)).json()["data"]

    assert [j["step_key"] for j in data] == ["build", "test", "deploy"]
    assert [j["depends_on"] for j in data] == [[], [str(jobs["build"].id)], [str(jobs["test"].id)]]


@pytest.mark.django_db
def test_exit_code_is_the_real_status(api, four):
    jobs = by_key(four)
    run_job(jobs["lint"], JobState.FAILED, exit_code=2)

    data = {j["step_key"]: j for j in api.get(jobs_url(four)).json()["data"]}

    assert (data["lint"]["state"], data["lint"]["exit_code"]) == ("failed", 2)
    assert (data["deploy"]["state"], data["deploy"]["exit_code"]) == ("skipped", None)
    assert data["deps"]["exit_code"] is None


@pytest.mark.django_db
def test_list_of_build_without_jobs_is_empty(api, pipeline):
    build = make_build(pipeline, pipeline_ir={"version": "0"})
    assert api.get(jobs_url(build)).json() == {"data": []}


@pytest.mark.django_db
def test_list_of_unknown_build_is_404(api, pipeline, build):
    assert_error(api.get(builds_url(pipeline, "/9/jobs")), 404, "build_not_found")
    assert_error(api.get(builds_url(pipeline, "/x/jobs")), 404, "build_not_found")


@pytest.mark.django_db
def test_list_of_other_orgs_build_is_404(api, other_pipeline):
    foreign = make_build(other_pipeline)
    assert_error(api.get(jobs_url(foreign)), 404, "organization_not_found")


@pytest.mark.django_db
def test_member_may_list_jobs(member_api, build):
    assert [j["step_key"] for j in member_api.get(jobs_url(build)).json()["data"]] == ["a", "b"]


@pytest.mark.django_db
def test_get_one_job_returns_full_body(api, four):
    jobs = by_key(four)

    response = api.get(jobs_url(four, f"/{jobs['deploy'].id}"))

    assert response.status_code == 200
    assert response.json() == job_body(jobs["deploy"], depends_on=[jobs["deps"], jobs["build"], jobs["lint"]])


@pytest.mark.django_db
def test_get_job_reflects_its_state(api, build):
    first = Job.objects.get(build=build, step_key="a")
    assert build_services.move_job(job=first, state=JobState.ASSIGNED)
    assert build_services.move_job(job=first, state=JobState.RUNNING)

    body = api.get(jobs_url(build, f"/{first.id}")).json()

    first.refresh_from_db()
    assert (body["state"], body["started_at"], body["finished_at"]) == ("running", iso(first.started_at), None)


@pytest.mark.django_db
def test_get_job_accepts_uppercase_uuid(api, build):
    first = Job.objects.get(build=build, step_key="a")
    assert api.get(jobs_url(build, f"/{str(first.id).upper()}")).json()["id"] == str(first.id)


@pytest.mark.django_db
def test_get_job_of_another_build_is_404(api, pipeline, build):
    second = make_build(pipeline)
    theirs = Job.objects.get(build=second, step_key="a")

    error = assert_error(api.get(jobs_url(build, f"/{theirs.id}")), 404, "job_not_found")

    assert error["type"] == "not_found"
    assert api.get(jobs_url(second, f"/{theirs.id}")).status_code == 200


@pytest.mark.django_db
def test_get_job_of_another_org_is_404(api, build, other_pipeline):
    foreign = make_build(other_pipeline)
    theirs = Job.objects.get(build=foreign, step_key="a")

    assert_error(api.get(jobs_url(build, f"/{theirs.id}")), 404, "job_not_found")
    assert_error(api.get(jobs_url(foreign, f"/{theirs.id}")), 404, "organization_not_found")


@pytest.mark.django_db
@pytest.mark.parametrize("job_id", ["nope", "123", "0", str(uuid.uuid4()), str(uuid.uuid4())[:-1],
                                    str(uuid.uuid4()) + "0", "%00", "x" * 300])
def test_get_malformed_or_unknown_job_id_is_404(api, build, job_id):
    assert_error(api.get(jobs_url(build, f"/{job_id}")), 404, "job_not_found")


@pytest.mark.django_db
def test_get_job_of_unknown_build_is_404(api, build):
    first = Job.objects.get(build=build, step_key="a")
    assert_error(api.get(builds_url(build.pipeline, f"/7/jobs/{first.id}")), 404, "build_not_found")
