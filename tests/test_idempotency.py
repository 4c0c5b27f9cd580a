"""`Idempotency-Key` on the creates: builds (both routes), pipelines (create, register), secrets (both scopes), schedules.

A retry with the same key and body gets the first answer again and creates nothing; another
body is 422, a retry while the first runs 409; keys belong to a caller and a route, live 24 h,
and the reaper's pass prunes them.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from builds import services as build_services
from builds.models import Build
from builds.reaper import run_reaper
from harmont.errors import ApiError
from organizations import idempotency
from organizations import services as org_services
from organizations.models import IdempotencyKey, IdempotencyState
from pipelines.models import Pipeline, PipelineSchedule, Repository, Secret
from tests.helpers import assert_error, bearer, builds_url, cyclic_ir, is_postgres, race, two_step_ir

pytestmark = pytest.mark.django_db

KEY = "4f7d1c9e-6b1a-4e0c-9d3f-2a8b5c6d7e80"
VALUE = "s3cr3t-Value-that-must-not-leak"
TABLE = IdempotencyKey._meta.db_table
ENVELOPE = {"schema_version": "1", "pipelines": [
    {"slug": "ci", "name": "CI", "allow_manual": True, "triggers": [], "definition": two_step_ir()}]}


def post(client: Any, url: str, body: Any, key: str | None = KEY) -> Any:
    extra = {} if key is None else {"HTTP_IDEMPOTENCY_KEY": key}
    return client.post(url, body, format="json", **extra)


def build_numbers(pipeline: Pipeline) -> list[int]:
    return sorted(Build.objects.filter(pipeline=pipeline).values_list("number", flat=True))


@dataclass(frozen=True)
class Route:
    """One opted-in route: where, a body and a different one, the first answer's status, and what it writes."""

    url: Callable[[Any], str]
    body: dict[str, Any]
    other_body: dict[str, Any]
    status: int
    written: Callable[[Any], Any]  # everything a second run of the view would change


def secrets_of(org: Any) -> list[tuple[Any, ...]]:
    return list(Secret.objects.filter(organization=org).order_by("pk").values_list(
        "pipeline_id", "name", "value_encrypted", "updated_at"))


BUILD = {"branch": "main", "commit": "abc123"}
BY_REPO = {**BUILD, "repo_name": "acme/web", "source_slug": "ci"}
NEW_PIPELINE = {"name": "Docs", "repository": "https://github.com/acme/docs.git", "default_branch": "main"}
REGISTER = {"repository": "https://github.com/acme/site.git", "default_branch": "main", "envelope": ENVELOPE}

ROUTES = {
    "build": Route(
        url=lambda p: builds_url(p), body=BUILD, other_body={**BUILD, "commit": "def456"}, status=201,
        written=lambda p: build_numbers(p)),
    "build-by-repo": Route(
        url=lambda p: f"/api/v0/organizations/{p.organization.slug}/builds", body=BY_REPO,
        other_body={**BY_REPO, "message": "again"}, status=201, written=lambda p: build_numbers(p)),
    "pipeline": Route(
        url=lambda p: f"/api/v0/organizations/{p.organization.slug}/pipelines", body=NEW_PIPELINE,
        other_body={**NEW_PIPELINE, "name": "Docs 2"}, status=201,
        written=lambda p: list(Pipeline.objects.order_by("pk").values_list("pk", "slug"))),
    "register": Route(
        url=lambda p: f"/api/v0/organizations/{p.organization.slug}/pipelines/register", body=REGISTER,
        other_body={**REGISTER, "default_branch": "trunk"}, status=200,
        written=lambda p: (list(Pipeline.objects.order_by("pk").values_list("pk", "slug", "default_branch")),
                           list(Repository.objects.values_list("pk", "updated_at")))),
    "org-secret": Route(
        url=lambda p: f"/api/v0/organizations/{p.organization.slug}/secrets",
        body={"name": "DEPLOY_TOKEN", "value": VALUE}, other_body={"name": "DEPLOY_TOKEN", "value": "other"},
        status=201, written=lambda p: secrets_of(p.organization)),
    "pipeline-secret": Route(
        url=lambda p: f"/api/v0/organizations/{p.organization.slug}/pipelines/{p.slug}/secrets",
        body={"name": "DEPLOY_TOKEN", "value": VALUE}, other_body={"name": "DEPLOY_TOKEN", "value": "other"},
        status=201, written=lambda p: secrets_of(p.organization)),
    "schedule": Route(
        url=lambda p: f"/api/v0/organizations/{p.organization.slug}/pipelines/{p.slug}/schedules",
        body={"cron": "0 * * * *"}, other_body={"cron": "5 * * * *"}, status=201,
        written=lambda p: list(PipelineSchedule.objects.order_by("created_at").values_list("pk", "cron"))),
}


@pytest.fixture(params=list(ROUTES))
def route(request) -> Route:
    return ROUTES[request.param]


# ===================================================================== replay


def test_a_retry_gets_the_first_answer_again_and_creates_nothing(api, pipeline, route):
    first = post(api, route.url(pipeline), route.body)
    assert first.status_code == route.status, first.content
    assert "Idempotent-Replayed" not in first
    written = route.written(pipeline)

    again = post(api, route.url(pipeline), route.body)

    assert again.status_code == route.status
    assert again["Idempotent-Replayed"] == "true"
    assert again["Content-Type"] == first["Content-Type"] == "application/json"
    assert again.content == first.content  # byte for byte: the stored body, not a re-rendering
    assert route.written(pipeline) == written
    assert IdempotencyKey.objects.get().state == IdempotencyState.COMPLETE


def test_the_same_key_with_another_body_is_422_and_changes_nothing(api, pipeline, route):
    first = post(api, route.url(pipeline), route.body)
    assert first.status_code == route.status, first.content
    written = route.written(pipeline)

    response = post(api, route.url(pipeline), route.other_body)

    assert_error(response, 422, "idempotency_key_reused")
    assert route.written(pipeline) == written
    # The first answer is still there for a real retry.
    assert post(api, route.url(pipeline), route.body).content == first.content


def test_the_body_is_compared_as_json_not_as_bytes(api, pipeline):
    first = api.post(builds_url(pipeline), '{"branch": "main", "commit": "abc123"}', content_type="application/json",
                     HTTP_IDEMPOTENCY_KEY=KEY)
    again = api.post(builds_url(pipeline), '{"commit":"abc123",\n "branch":"main"}', content_type="application/json",
                     HTTP_IDEMPOTENCY_KEY=KEY)

    assert first.status_code == 201
    assert again["Idempotent-Replayed"] == "true" and again.content == first.content
    assert build_numbers(pipeline) == [1]


def test_a_stored_secret_answer_keeps_no_value(api, pipeline):
    assert post(api, ROUTES["org-secret"].url(pipeline), ROUTES["org-secret"].body).status_code == 201

    row = IdempotencyKey.objects.values().get()
    assert not any(VALUE in str(value) for value in row.values())


def test_a_request_without_the_header_keeps_nothing_and_creates_again(api, pipeline):
    with CaptureQueriesContext(connection) as queries:
        assert post(api, builds_url(pipeline), BUILD, key=None).status_code == 201
    assert post(api, builds_url(pipeline), BUILD, key=None).status_code == 201

    assert not [q for q in queries.captured_queries if TABLE in q["sql"]]
    assert build_numbers(pipeline) == [1, 2]
    assert not IdempotencyKey.objects.exists()


def test_a_keyed_create_costs_three_statements_on_the_key_and_a_replay_one(api, pipeline):
    def key_statements(key: str) -> list[str]:
        with CaptureQueriesContext(connection) as queries:
            post(api, builds_url(pipeline), BUILD, key=key)
        return [q["sql"].split()[0] for q in queries.captured_queries if TABLE in q["sql"]]

    assert key_statements(KEY) == ["SELECT", "INSERT", "UPDATE"]  # the miss, the claim, the answer
    assert key_statements(KEY) == ["SELECT"]


# ===================================================================== answers that are kept, and those that are not


def test_a_rejected_plan_is_kept_so_its_retry_makes_no_second_failed_build(api, pipeline):
    body = {**BUILD, "pipeline_ir": cyclic_ir()}
    first = post(api, builds_url(pipeline), body)
    assert_error(first, 422, "build_plan_rejected")

    again = post(api, builds_url(pipeline), body)

    assert again.status_code == 422 and again["Idempotent-Replayed"] == "true"
    assert again.content == first.content  # the envelope as first sent, its request_id the first request's
    assert list(Build.objects.values_list("number", "state", "error_code")) == [(1, "failed", "cycle")]


def test_an_invalid_request_is_kept_too(api, pipeline):
    first = post(api, builds_url(pipeline), {"commit": "abc123"})
    assert_error(first, 422, "build_invalid")

    again = post(api, builds_url(pipeline), {"commit": "abc123"})

    assert again.status_code == 422 and again["Idempotent-Replayed"] == "true"
    assert again.content == first.content


def test_an_unhandled_error_frees_the_key_for_a_retry(api, pipeline, monkeypatch):
    real = build_services.create_build

    def explode(**kwargs: Any) -> Build:
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr(build_services, "create_build", explode)
    assert_error(post(api, builds_url(pipeline), BUILD), 500, "server_error")
    assert not IdempotencyKey.objects.exists()

    monkeypatch.setattr(build_services, "create_build", real)
    retry = post(api, builds_url(pipeline), BUILD)

    assert retry.status_code == 201 and "Idempotent-Replayed" not in retry
    assert build_numbers(pipeline) == [1]


def test_a_5xx_answer_frees_the_key_for_a_retry(api, pipeline, monkeypatch):
    real = build_services.create_build

    def unavailable(**kwargs: Any) -> Build:
        raise ApiError("server_error", "Try again later.", status=503)

    monkeypatch.setattr(build_services, "create_build", unavailable)
    assert_error(post(api, builds_url(pipeline), BUILD), 503, "server_error")
    assert not IdempotencyKey.objects.exists()

    monkeypatch.setattr(build_services, "create_build", real)
    retry = post(api, builds_url(pipeline), BUILD)

    assert retry.status_code == 201 and "Idempotent-Replayed" not in retry
    assert build_numbers(pipeline) == [1]


def test_refusals_before_the_view_keep_no_key(member_api, member, org, pipeline):
    url = ROUTES["pipeline"].url(pipeline)
    assert_error(post(member_api, url, NEW_PIPELINE), 403, "insufficient_org_role")
    assert_error(post(member_api, "/api/v0/organizations/nope/pipelines", NEW_PIPELINE), 404,
                 "organization_not_found")
    assert not IdempotencyKey.objects.exists()

    org.memberships.filter(user=member).update(role="admin")
    assert post(member_api, url, NEW_PIPELINE).status_code == 201


def test_a_malformed_body_keeps_no_key(api, pipeline):
    response = api.post(builds_url(pipeline), "{not json", content_type="application/json", HTTP_IDEMPOTENCY_KEY=KEY)

    assert_error(response, 400, "invalid_json")
    assert not IdempotencyKey.objects.exists() and not Build.objects.exists()


# ===================================================================== in progress


def test_a_retry_while_the_first_is_running_is_409(api, pipeline, monkeypatch):
    real = build_services.create_build
    during: list[Any] = []

    def create_and_meanwhile_retry(**kwargs: Any) -> Build:
        during.append(post(api, builds_url(pipeline), BUILD))
        return real(**kwargs)

    monkeypatch.setattr(build_services, "create_build", create_and_meanwhile_retry)
    first = post(api, builds_url(pipeline), BUILD)

    assert first.status_code == 201
    assert_error(during[0], 409, "idempotency_key_in_progress")
    assert build_numbers(pipeline) == [1]
    monkeypatch.setattr(build_services, "create_build", real)
    assert post(api, builds_url(pipeline), BUILD).content == first.content


def test_a_key_left_in_progress_is_409_and_creates_nothing(api, pipeline):
    assert post(api, builds_url(pipeline), BUILD).status_code == 201
    # As a request whose process died before it could answer leaves it.
    IdempotencyKey.objects.update(state=IdempotencyState.IN_PROGRESS, response_status=None, response_body="")

    assert_error(post(api, builds_url(pipeline), BUILD), 409, "idempotency_key_in_progress")
    assert build_numbers(pipeline) == [1]


def test_another_body_wins_over_in_progress(api, pipeline):
    assert post(api, builds_url(pipeline), BUILD).status_code == 201
    IdempotencyKey.objects.update(state=IdempotencyState.IN_PROGRESS)

    assert_error(post(api, builds_url(pipeline), {**BUILD, "commit": "def456"}), 422, "idempotency_key_reused")


# ===================================================================== expiry


def test_a_key_is_kept_24_hours(api, pipeline):
    assert post(api, builds_url(pipeline), BUILD).status_code == 201
    row = IdempotencyKey.objects.get()
    assert row.expires_at - row.created_at == timedelta(hours=24)

    assert idempotency.prune_idempotency_keys(now=row.expires_at - timedelta(seconds=1)) == 0
    assert idempotency.prune_idempotency_keys(now=row.expires_at) == 1
    assert not IdempotencyKey.objects.exists()


def test_the_reaper_pass_prunes_expired_keys_and_the_key_then_creates_again(api, pipeline):
    assert post(api, builds_url(pipeline), BUILD).status_code == 201
    assert post(api, builds_url(pipeline), {**BUILD, "commit": "f7e5f00d"}, key="fresh").status_code == 201
    day_ago = timezone.now() - timedelta(hours=24, seconds=1)
    IdempotencyKey.objects.filter(key=KEY).update(created_at=day_ago, expires_at=day_ago + timedelta(hours=24))

    run_reaper(stop=threading.Event(), interval=0, once=True)

    assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["fresh"]
    again = post(api, builds_url(pipeline), BUILD)
    assert again.status_code == 201 and "Idempotent-Replayed" not in again
    assert again.json()["number"] == 3
    assert build_numbers(pipeline) == [1, 2, 3]


def test_an_expired_key_not_yet_pruned_is_free_again(api, pipeline):
    assert post(api, builds_url(pipeline), BUILD).status_code == 201
    IdempotencyKey.objects.update(expires_at=timezone.now() - timedelta(seconds=1))

    again = post(api, builds_url(pipeline), {**BUILD, "commit": "def456"})

    assert again.status_code == 201 and again.json()["number"] == 2
    assert IdempotencyKey.objects.get().expires_at > timezone.now()


def test_the_retention_is_a_setting(api, pipeline, settings):
    settings.IDEMPOTENCY_KEY_TTL_SECONDS = 600
    assert post(api, builds_url(pipeline), BUILD).status_code == 201
    row = IdempotencyKey.objects.get()
    assert row.expires_at - row.created_at == timedelta(minutes=10)


# ===================================================================== the header


@pytest.mark.parametrize("key", ["", "x" * 256, "clé", "tab\there", "bell\x07", "del\x7f", "日本"],
                         ids=["empty", "256-chars", "non-ascii", "tab", "control", "del", "cjk"])
def test_a_malformed_key_is_400_and_changes_nothing(api, pipeline, key):
    response = post(api, builds_url(pipeline), BUILD, key=key)

    assert_error(response, 400, "idempotency_key_invalid")
    assert not Build.objects.exists() and not IdempotencyKey.objects.exists()


@pytest.mark.parametrize("key", ["x" * 255, "a", "with spaces and ~!@#$%^&*()[]{}"], ids=["255-chars", "1-char", "punct"])
def test_any_printable_ascii_key_up_to_255_characters_works(api, pipeline, key):
    assert post(api, builds_url(pipeline), BUILD, key=key).status_code == 201
    assert post(api, builds_url(pipeline), BUILD, key=key)["Idempotent-Replayed"] == "true"
    assert IdempotencyKey.objects.get().key == key


# ===================================================================== whose key, for what


def test_different_callers_with_the_same_key_are_independent(api, admin_api, pipeline):
    mine = post(api, builds_url(pipeline), BUILD)
    theirs = post(admin_api, builds_url(pipeline), BUILD)

    assert mine.status_code == theirs.status_code == 201
    assert "Idempotent-Replayed" not in theirs
    assert (mine.json()["number"], theirs.json()["number"]) == (1, 2)
    assert IdempotencyKey.objects.count() == 2


def test_a_session_token_and_an_api_token_of_one_person_are_one_caller(api, owner, pipeline):
    first = post(api, builds_url(pipeline), BUILD)
    session = bearer(org_services.issue_session_token(user=owner).raw)

    again = post(session, builds_url(pipeline), BUILD)

    assert again["Idempotent-Replayed"] == "true" and again.content == first.content
    assert build_numbers(pipeline) == [1]


def test_the_same_key_on_another_route_is_independent(api, org, pipeline):
    second = post(api, ROUTES["pipeline"].url(pipeline), {**NEW_PIPELINE, "definition": two_step_ir()})
    assert second.status_code == 201
    other = Pipeline.objects.get(slug=second.json()["slug"])

    here = post(api, builds_url(pipeline), BUILD)
    there = post(api, builds_url(other), BUILD)

    assert here.status_code == there.status_code == 201 and "Idempotent-Replayed" not in there
    assert build_numbers(pipeline) == build_numbers(other) == [1]
    assert IdempotencyKey.objects.count() == 3


# ===================================================================== races (PostgreSQL)

THREADS = 20


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_with_one_key_create_exactly_one_build(api, pipeline):
    if not is_postgres():
        pytest.skip("racing creates needs PostgreSQL (SQLite serialises all writers)")
    url = builds_url(pipeline)

    def create(i: int) -> tuple[int, str | None, bytes]:
        response = post(bearer(api.raw_token), url, BUILD)
        return response.status_code, response.get("Idempotent-Replayed"), response.content

    results = race(THREADS, create)

    assert build_numbers(pipeline) == [1]
    originals = [r for r in results if r[0] == 201 and r[1] is None]
    assert len(originals) == 1
    replays = [r for r in results if r[1] == "true"]
    assert all(r[0] == 201 and r[2] == originals[0][2] for r in replays)
    assert Counter(r[0] for r in results if r[1] is None) == {201: 1, 409: THREADS - 1 - len(replays)}
    row = IdempotencyKey.objects.get()
    assert row.state == IdempotencyState.COMPLETE and row.response_body.encode() == originals[0][2]


# ===================================================================== the document


OPTED_IN = {("post", "/api/v0/organizations/{org}/pipelines/{pipeline}/builds"),
            ("post", "/api/v0/organizations/{org}/pipelines/{pipeline}/builds/{number}/rebuild"),
            ("post", "/api/v0/organizations/{org}/builds"),
            ("post", "/api/v0/organizations/{org}/pipelines"),
            ("post", "/api/v0/organizations/{org}/pipelines/register"),
            ("post", "/api/v0/organizations/{org}/secrets"),
            ("post", "/api/v0/organizations/{org}/pipelines/{pipeline}/secrets"),
            ("post", "/api/v0/organizations/{org}/pipelines/{pipeline}/schedules"),
            ("post", "/api/v0/organizations/{org}/webhooks")}


def test_the_openapi_document_names_the_header_where_it_works(client):
    doc = client.get("/api/v0/openapi.json").json()
    with_header = set()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            headers = [p for p in operation.get("parameters", []) if p["in"] == "header" and p["name"] == "Idempotency-Key"]
            if headers:
                with_header.add((method, path))
                assert {"400", "409", "422"} <= set(operation["responses"]), (method, path)
                assert headers[0]["schema"] == {"type": "string"} and not headers[0].get("required")
    assert with_header == OPTED_IN
