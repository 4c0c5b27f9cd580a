"""Endpoints cost a small constant number of queries, whatever the page size, depth or job count.

Every request pays two before the view proper: the bearer token (with its user)
and the caller's membership (with its organization). The token's `last_used_at`
is fresh, so authentication does not write.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
from django.utils import timezone

from builds.models import Agent, Build, Job
from harmont.pagination import encode_cursor
from organizations.models import ApiToken
from pipelines import services as pipeline_services
from pipelines.models import Pipeline
from tests.dsl import hm
from tests.helpers import AGENT, bearer, builds_url, chunk, claim, is_postgres, job_url, make_build, parallel_ir, start

AUTH_AND_MEMBERSHIP = 2
# Build-scoped routes find the build through the caller's membership: one query for both.
AUTH = 1
T0 = datetime(2026, 1, 1, tzinfo=dt_timezone.utc)


@pytest.fixture
def quiet_api(api, owner):
    """The owner's client, with `last_used_at` fresh so authenticating never writes."""
    assert ApiToken.objects.filter(user=owner).update(last_used_at=timezone.now()) == 1
    return api


@pytest.fixture
def many_builds(pipeline) -> Pipeline:
    """150 builds, numbers 1..150; odd numbers on main, even on dev."""
    Build.objects.bulk_create(
        Build(pipeline=pipeline, number=n, branch="main" if n % 2 else "dev", commit=f"c{n:07x}",
              created_at=T0 + timedelta(minutes=n), scheduled_at=T0 + timedelta(minutes=n))
        for n in range(1, 151)
    )
    Pipeline.objects.filter(pk=pipeline.pk).update(build_counter=150)
    return pipeline


def chain_ir(length: int) -> dict:
    step = hm.sh("echo 0", key="s0")
    for i in range(1, length):
        step = step.sh(f"echo {i}", key=f"s{i}")
    return hm.pipeline([step, hm.wait(), hm.sh("echo done", key="done")])


# ===================================================================== builds


@pytest.mark.django_db
def test_get_build(quiet_api, django_assert_num_queries, build):
    with django_assert_num_queries(AUTH + 1):  # the build with its pipeline and the caller's role
        response = quiet_api.get(builds_url(build.pipeline, "/1"))
    assert response.status_code == 200


@pytest.mark.django_db
def test_get_unknown_build(quiet_api, django_assert_num_queries, build):
    with django_assert_num_queries(AUTH + 3):  # the build miss, then which 404: membership, pipeline
        response = quiet_api.get(builds_url(build.pipeline, "/2"))
    assert response.status_code == 404


@pytest.mark.django_db
@pytest.mark.parametrize("params", [
    {"limit": 1}, {"limit": 100}, {},
    {"limit": 50, "cursor": encode_cursor(60)}, {"limit": 100, "cursor": encode_cursor(3)},
    {"limit": 1, "branch": "main"}, {"limit": 100, "branch": "main"},
    {"limit": 20, "branch": "dev", "cursor": encode_cursor(30)},
    {"limit": 100, "state": "scheduled", "source": "api", "created_after": "2026-01-01T01:00:00Z"},
], ids=["limit-1", "limit-100", "default", "deep", "last-page", "main-1", "main-100", "dev-deep", "filters"])
def test_list_builds(quiet_api, django_assert_num_queries, many_builds, params):
    with django_assert_num_queries(AUTH_AND_MEMBERSHIP + 1):  # one page of builds (joined to their pipeline)
        response = quiet_api.get(builds_url(many_builds), params)
    assert response.status_code == 200, response.content
    assert response.json()["data"]


@pytest.mark.django_db
@pytest.mark.parametrize("params", [{}, {"branch": "nope"}, {"cursor": encode_cursor(1)}], ids=["-", "filtered", "past"])
def test_an_empty_build_list_looks_its_pipeline_up(quiet_api, django_assert_num_queries, many_builds, pipeline,
                                                   params):
    """An empty page tells "no builds" (200) from "no such pipeline" (404) with one more query."""
    url = builds_url(many_builds) if params else builds_url(many_builds).replace(f"/{pipeline.slug}/", "/nope/")
    with django_assert_num_queries(AUTH_AND_MEMBERSHIP + 2):
        response = quiet_api.get(url, params)
    if params:
        assert response.status_code == 200 and response.json() == {"data": [], "next_cursor": None}
    else:
        assert response.status_code == 404 and response.json()["error"]["code"] == "pipeline_not_found"


@pytest.mark.django_db
def test_list_builds_walks_150_rows_at_constant_cost(quiet_api, django_assert_num_queries, many_builds):
    cursor, seen = None, []
    while True:
        with django_assert_num_queries(AUTH_AND_MEMBERSHIP + 1):
            body = quiet_api.get(builds_url(many_builds), {"limit": 7, **({"cursor": cursor} if cursor else {})}).json()
        seen += [b["number"] for b in body["data"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == list(range(150, 0, -1))


# ===================================================================== jobs


@pytest.mark.django_db
@pytest.mark.parametrize("length", [1, 29], ids=["2-jobs", "30-jobs"])
def test_list_jobs(quiet_api, django_assert_num_queries, pipeline, length):
    build = make_build(pipeline, pipeline_ir=chain_ir(length))
    assert Job.objects.filter(build=build).count() == length + 1

    # the build, its jobs, their edges, the connected agents' tags (a job is scheduled: its waiting reason)
    with django_assert_num_queries(AUTH + 4):
        response = quiet_api.get(builds_url(pipeline, "/1/jobs"))

    assert response.status_code == 200
    data = response.json()["data"]
    assert len(data) == length + 1
    assert len(data[-1]["depends_on"]) == length


def flat_wait_ir(before: int, after: int) -> dict:
    """`before` steps, a flat wait, `after` steps: stored as segments, not edges."""
    steps = [{"type": "command", "key": f"a{i}", "cmd": "true"} for i in range(before)]
    steps += [{"type": "wait"}] + [{"type": "command", "key": f"b{i}", "cmd": "true"} for i in range(after)]
    steps[-1]["depends_on"] = ["b0"] if after > 1 else []
    return {"version": "0", "steps": steps}


@pytest.mark.django_db
@pytest.mark.parametrize("size", [2, 40], ids=["4-jobs", "80-jobs"])
def test_list_jobs_after_a_wait(quiet_api, django_assert_num_queries, pipeline, size):
    make_build(pipeline, pipeline_ir=flat_wait_ir(size, size))

    # the build, its jobs, their edges, the connected agents' tags (for the scheduled jobs' waiting reasons)
    with django_assert_num_queries(AUTH + 4):
        response = quiet_api.get(builds_url(pipeline, "/1/jobs"))

    assert response.status_code == 200
    data = response.json()["data"]
    assert [len(job["depends_on"]) for job in data] == [0] * size + [size] * (size - 1) + [size + (size > 1)]


@pytest.mark.django_db
@pytest.mark.parametrize("size", [2, 40], ids=["4-jobs", "80-jobs"])
def test_get_job_after_a_wait(quiet_api, django_assert_num_queries, pipeline, size):
    build = make_build(pipeline, pipeline_ir=flat_wait_ir(size, size))
    last = Job.objects.get(build=build, step_key=f"b{size - 1}")

    with django_assert_num_queries(AUTH + 3):  # the build, the job, its prerequisites
        response = quiet_api.get(builds_url(pipeline, f"/1/jobs/{last.id}"))

    assert response.status_code == 200
    assert len(response.json()["depends_on"]) == size + (size > 1)


@pytest.mark.django_db
def test_get_job(quiet_api, django_assert_num_queries, pipeline):
    build = make_build(pipeline, pipeline_ir=chain_ir(29))
    done = Job.objects.get(build=build, step_key="done")

    with django_assert_num_queries(AUTH + 3):  # the build, the job, its edges
        response = quiet_api.get(builds_url(pipeline, f"/1/jobs/{done.id}"))

    assert response.status_code == 200
    assert len(response.json()["depends_on"]) == 29


# ===================================================================== pipelines


@pytest.mark.django_db
@pytest.mark.parametrize("params", [{"limit": 1}, {"limit": 100}, {"limit": 10, "cursor": encode_cursor(0)}],
                         ids=["limit-1", "limit-100", "cursor"])
def test_list_pipelines(quiet_api, django_assert_num_queries, org, params):
    for i in range(30):
        pipeline_services.create_pipeline(org=org, name=f"p{i}", repository=f"https://github.com/acme/p{i}",
                                          default_branch="main")

    with django_assert_num_queries(AUTH_AND_MEMBERSHIP + 1):  # one page of pipelines
        response = quiet_api.get(f"/api/v0/organizations/{org.slug}/pipelines", params)

    assert response.status_code == 200
    assert response.json()["data"]


@pytest.mark.django_db
def test_get_pipeline(quiet_api, django_assert_num_queries, pipeline):
    with django_assert_num_queries(AUTH_AND_MEMBERSHIP + 1):
        response = quiet_api.get(f"/api/v0/organizations/{pipeline.organization.slug}/pipelines/{pipeline.slug}")
    assert response.status_code == 200


# ===================================================================== agent endpoints
#
# A busy agent makes two requests per job: start, and a finish that also claims its next
# job. Each costs a small constant whatever the size of the build. The counts include
# the credential's lookup; the agent's last-seen time is fresh, so no request writes it.


def end_job() -> int:
    """A job's end, the read of the other jobs' states and whether any webhook endpoint of the
    organization wants job.finished: one statement on PostgreSQL, three on SQLite.

    (See builds.sql.end_job.)
    """
    return 1 if is_postgres() else 3


# Finishing, without the statements of the job's end: the credential, the transaction
# (savepoint here), the last log chunks, the build's lock.
FINISH = 5
# A build's start or end event that nobody listens to: whether a webhook endpoint or a status
# repository would hear of it (builds.sql.build_event_receivers).
BUILD_EVENT = 1


def claim_queries() -> int:
    """Claiming: the claim, and the job with its build, its pipeline and its secrets (the job spec),
    in the claim's own statement on PostgreSQL, in a second query on SQLite (builds.sql.assign_next_job)."""
    return 1 if is_postgres() else 2


def finish_body(**extra) -> dict:
    # What an agent sends for a silent command: its two meta lines ride along.
    return {"exit_code": 0, "chunks": [chunk(1, "running\n", 2), chunk(2, "exit status 0\n", 2)], **extra}


@pytest.mark.django_db
@pytest.mark.parametrize("size", [2, 30])
def test_a_busy_agents_requests_cost_the_same_for_2_and_30_jobs(session, pipeline, size, django_assert_num_queries):
    make_build(pipeline, pipeline_ir=parallel_ir(size, prefix="p"))

    with django_assert_num_queries(1 + claim_queries() + 1):  # the session; the build's first claim marks it running
        response = session.post(f"{AGENT}/claim")
    assert response.status_code == 200
    spec, job_client = response.json()["job"], bearer(response.json()["job_token"])
    with django_assert_num_queries(3 + BUILD_EVENT):  # the credential, running, the build's first start time
        assert job_client.post(job_url(spec["id"], "start")).json()["state"] == "running"
    with django_assert_num_queries(6):  # the credential, savepoint, the job's lock, insert, log size, release
        response = job_client.post(job_url(spec["id"], "logs"), {"chunks": [chunk(1, "x\n")]}, format="json")
    assert response.json()["state"] == "running"

    with django_assert_num_queries(FINISH + end_job() + claim_queries()):
        response = job_client.post(job_url(spec["id"], "finish"), finish_body(claim_next=True), format="json")
    assert response.json()["state"] == "passed" and response.json()["next"]["job"]["step_key"] == "p1"

    following = response.json()["next"]
    job_client = bearer(following["job_token"])
    with django_assert_num_queries(2):  # the credential, running
        assert job_client.post(job_url(following["job"]["id"], "start")).json()["state"] == "running"
    last = size == 2
    with django_assert_num_queries(FINISH + end_job() + (1 + BUILD_EVENT if last else 0)):  # the last ends the build
        response = job_client.post(job_url(following["job"]["id"], "finish"), finish_body(), format="json")
    assert response.json() == {"state": "passed", "cancel": True, "timeout": False}


@pytest.mark.django_db
@pytest.mark.parametrize("size", [3, 30])
def test_a_quick_jobs_start_riding_on_its_finish_costs_no_query_more(session, pipeline, size,
                                                                      django_assert_num_queries):
    # builds/agent/starts.py: a job that ends within a moment makes one request, the finish (which claims
    # the next job), where it made two. The start's columns ride on the job's end statement.
    make_build(pipeline, pipeline_ir=parallel_ir(size, prefix="p"))
    response = session.post(f"{AGENT}/claim")
    spec, job_client = response.json()["job"], bearer(response.json()["job_token"])
    started = {"agent_name": "runner-1", "elapsed_seconds": 0.01}

    with django_assert_num_queries(FINISH + end_job() + 1 + BUILD_EVENT + claim_queries()):  # + the build's first start
        response = job_client.post(job_url(spec["id"], "finish"), finish_body(claim_next=True, started=started),
                                   format="json")
    assert response.json()["state"] == "passed" and response.json()["next"]["job"]["step_key"] == "p1"
    following = response.json()["next"]

    with django_assert_num_queries(FINISH + end_job() + claim_queries()):
        response = bearer(following["job_token"]).post(job_url(following["job"]["id"], "finish"),
                                                       finish_body(claim_next=True, started=started), format="json")
    assert response.json()["state"] == "passed" and response.json()["next"]["job"]["step_key"] == "p2"


@pytest.mark.django_db
@pytest.mark.parametrize("length", [1, 29], ids=["2-jobs", "30-jobs"])
def test_finishing_a_job_with_a_waiting_dependent_costs_one_query_more(session, pipeline, length,
                                                                       django_assert_num_queries):
    make_build(pipeline, pipeline_ir=chain_ir(length))
    spec, job_client = claim(session)
    start(job_client, spec["id"])

    with django_assert_num_queries(FINISH + end_job() + 1):  # its pending dependent becomes scheduled
        response = job_client.post(job_url(spec["id"], "finish"), finish_body(), format="json")

    assert response.json()["state"] == "passed"
    assert Job.objects.get(step_key="s1" if length > 1 else "done").state == "scheduled"


@pytest.mark.django_db
def test_an_idle_claim_is_two_queries(session, pipeline, django_assert_num_queries):
    with django_assert_num_queries(2):  # the session, the claim that finds nothing
        response = session.post(f"{AGENT}/claim")
    assert response.status_code == 204


@pytest.mark.django_db
def test_an_idle_claim_of_an_agent_last_seen_long_ago_writes_the_time_in_the_session_lookup(
        session, pipeline, django_assert_num_queries):
    # A long-polling idle agent's claims are 30 s apart: each finds its last-seen time stale.
    Agent.objects.filter(pk=session.agent.pk).update(last_seen_at=timezone.now() - timedelta(minutes=1))
    before = timezone.now()

    # PostgreSQL writes it within the session lookup; SQLite in a statement of its own.
    with django_assert_num_queries(2 if is_postgres() else 3):
        response = session.post(f"{AGENT}/claim")

    assert response.status_code == 204
    assert Agent.objects.get(pk=session.agent.pk).last_seen_at >= before
