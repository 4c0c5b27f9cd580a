"""Secrets: the org- and pipeline-level endpoints, encryption at rest, the admin, and what a claimed job gets.

Values go in and never come out: not in any response, log line, admin page or repr.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone as dt_timezone
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from harmont.crypto import decrypt_text
from organizations.models import ApiToken, User
from pipelines import secrets as secret_services
from pipelines.models import Pipeline, Secret
from tests.helpers import assert_error, bearer, claim, is_postgres, iso, make_build, race

pytestmark = pytest.mark.django_db

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=dt_timezone.utc)
VALUE = "s3cr3t-Value-that-must-not-leak"
MAX_VALUE_BYTES = 64 * 1024


def org_url(org_slug: str, name: str | None = None) -> str:
    base = f"/api/v0/organizations/{org_slug}/secrets"
    return base if name is None else f"{base}/{name}"


def pipeline_url(org_slug: str, pipeline_slug: str, name: str | None = None) -> str:
    base = f"/api/v0/organizations/{org_slug}/pipelines/{pipeline_slug}/secrets"
    return base if name is None else f"{base}/{name}"


SCOPES = ["org", "pipeline"]


@pytest.fixture(params=SCOPES)
def scope(request, org, pipeline) -> dict[str, Any]:
    """Both levels run the same contract: the URL maker and the `pipeline` argument of the services."""
    if request.param == "org":
        return {"url": lambda name=None: org_url(org.slug, name), "pipeline": None}
    return {"url": lambda name=None: pipeline_url(org.slug, pipeline.slug, name), "pipeline": pipeline}


def rows(org, pipeline: Pipeline | None = None) -> list[tuple[str, str]]:
    """(name, plain value) of the stored secrets of the scope, by name."""
    return [(s.name, decrypt_text(s.value_encrypted))
            for s in Secret.objects.filter(organization=org, pipeline=pipeline).order_by("name")]


def post(client, url: str, body: Any):
    return client.post(url, body, format="json")


# ===================================================================== set (POST)


def test_post_creates_a_secret_201_encrypted_at_rest(api, org, scope):
    response = post(api, scope["url"](), {"name": "DEPLOY_TOKEN", "value": VALUE})

    assert response.status_code == 201, response.content
    secret = Secret.objects.get(organization=org, name="DEPLOY_TOKEN")
    assert response.json() == {"name": "DEPLOY_TOKEN", "protected": True, "updated_at": iso(secret.updated_at)}
    assert secret.pipeline == scope["pipeline"]
    assert secret.created_at == secret.updated_at
    # Stored encrypted: neither the plain text nor anything containing it.
    assert VALUE not in secret.value_encrypted
    assert secret.value_encrypted != VALUE
    assert decrypt_text(secret.value_encrypted) == VALUE
    assert VALUE.encode() not in response.content


def test_post_of_an_existing_name_replaces_the_value_200(api, org, scope):
    secret_services.set_secret(organization=org, pipeline=scope["pipeline"], name="TOKEN", value="old-value",
                               now=T0)

    response = post(api, scope["url"](), {"name": "TOKEN", "value": VALUE})

    assert response.status_code == 200, response.content
    secret = Secret.objects.get(organization=org, pipeline=scope["pipeline"], name="TOKEN")
    assert response.json() == {"name": "TOKEN", "protected": True, "updated_at": iso(secret.updated_at)}
    assert secret.created_at == T0 and secret.updated_at > T0
    assert rows(org, scope["pipeline"]) == [("TOKEN", VALUE)]
    assert VALUE.encode() not in response.content


def test_org_and_pipeline_secrets_of_one_name_are_separate(api, org, pipeline):
    assert post(api, org_url(org.slug), {"name": "TOKEN", "value": "org-value"}).status_code == 201
    assert post(api, pipeline_url(org.slug, pipeline.slug), {"name": "TOKEN", "value": "pipe-value"}).status_code == 201

    assert rows(org) == [("TOKEN", "org-value")]
    assert rows(org, pipeline) == [("TOKEN", "pipe-value")]


def test_an_admin_may_set_secrets(admin_api, org, scope):
    assert post(admin_api, scope["url"](), {"name": "TOKEN", "value": VALUE}).status_code == 201
    assert rows(org, scope["pipeline"]) == [("TOKEN", VALUE)]


def test_names_and_values_at_their_limits_are_accepted(api, org, scope):
    name, value = "N" * 255, "é" * (MAX_VALUE_BYTES // 2)  # 2 bytes each: exactly 64 KiB

    assert post(api, scope["url"](), {"name": name, "value": value}).status_code == 201
    assert post(api, scope["url"](), {"name": "_lower_2", "value": " \n"}).status_code == 201

    assert rows(org, scope["pipeline"]) == [(name, value), ("_lower_2", " \n")]


@pytest.mark.parametrize(("body", "field", "message"), [
    ({"name": "1TOKEN", "value": VALUE}, "name", "Must be an environment variable name"),
    ({"name": "MY-TOKEN", "value": VALUE}, "name", "Must be an environment variable name"),
    ({"name": "MY TOKEN", "value": VALUE}, "name", "Must be an environment variable name"),
    ({"name": "TÖKEN", "value": VALUE}, "name", "Must be an environment variable name"),
    ({"name": "N" * 256, "value": VALUE}, "name", "Must be at most 255 characters."),
    ({"name": "", "value": VALUE}, "name", "This field may not be blank."),
    ({"name": 12, "value": VALUE}, "name", "Not a valid string."),
    ({"value": VALUE}, "name", "This field is required."),
    ({"name": "CI", "value": VALUE}, "name", "CI, HARMONT and HARMONT_* are set by the server"),
    ({"name": "HARMONT", "value": VALUE}, "name", "CI, HARMONT and HARMONT_* are set by the server"),
    ({"name": "HARMONT_BUILD_ID", "value": VALUE}, "name", "CI, HARMONT and HARMONT_* are set by the server"),
    ({"name": "TOKEN", "value": ""}, "value", "Must be a non-empty string."),
    ({"name": "TOKEN", "value": 123}, "value", "Not a valid string."),
    ({"name": "TOKEN", "value": None}, "value", "This field may not be null."),
    ({"name": "TOKEN", "value": ["a"]}, "value", "Not a valid string."),
    ({"name": "TOKEN"}, "value", "This field is required."),
    ({"name": "TOKEN", "value": "a\x00b"}, "value", "Null characters are not allowed."),
    ({"name": "TOKEN", "value": "x" * (MAX_VALUE_BYTES + 1)}, "value", "Must be at most 65536 bytes (UTF-8)."),
    ({"name": "TOKEN", "value": "é" * (MAX_VALUE_BYTES // 2) + "x"}, "value", "Must be at most 65536 bytes (UTF-8)."),
], ids=["digit-first", "dash", "space", "non-ascii", "too-long", "blank", "number", "missing", "CI", "HARMONT",
        "HARMONT_", "empty-value", "number-value", "null-value", "list-value", "missing-value", "nul-value",
        "value-too-big", "value-too-big-utf8"])
def test_bad_name_or_value_is_422_and_nothing_written(api, org, scope, body, field, message):
    secret_services.set_secret(organization=org, pipeline=scope["pipeline"], name="TOKEN", value="kept", now=T0)

    response = post(api, scope["url"](), body)

    error = assert_error(response, 422, "validation_failed")
    assert list(error["fields"]) == [field]
    assert error["fields"][field][0].startswith(message), error["fields"]
    assert rows(org, scope["pipeline"]) == [("TOKEN", "kept")]
    assert Secret.objects.get(name="TOKEN").updated_at == T0
    assert VALUE.encode() not in response.content


def test_name_and_value_both_bad_reports_both(api, org, scope):
    error = assert_error(post(api, scope["url"](), {"name": "9x", "value": ""}), 422, "validation_failed")
    assert set(error["fields"]) == {"name", "value"}
    assert not Secret.objects.exists()


def test_a_body_that_is_no_object_is_400(api, scope):
    assert_error(api.post(scope["url"](), ["TOKEN", VALUE], format="json"), 400, "invalid_request")
    assert not Secret.objects.exists()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_sets_of_one_new_name_create_it_once(api, org, scope):
    if not is_postgres():
        pytest.skip("racing writers need PostgreSQL (SQLite serialises all writers)")
    url = scope["url"]()

    def set_value(i: int) -> int:
        return bearer(api.raw_token).post(url, {"name": "TOKEN", "value": f"value-{i}"}, format="json").status_code

    statuses = race(12, set_value)

    assert sorted(statuses) == [200] * 11 + [201]
    (name, value), = rows(org, scope["pipeline"])
    assert name == "TOKEN" and value in {f"value-{i}" for i in range(12)}


# ===================================================================== list (GET)


def test_list_shows_names_and_times_of_the_scope_only_never_values(api, org, pipeline, other_org, scope):
    other_pipeline = Pipeline.objects.create(organization=org, slug="other", name="Other", repository="r",
                                             default_branch="main", source_slug="other")
    this = scope["pipeline"]
    secret_services.set_secret(organization=org, pipeline=this, name="B_TOKEN", value=VALUE + "-b", now=T0)
    secret_services.set_secret(organization=org, pipeline=this, name="A_TOKEN", value=VALUE + "-a",
                               now=T0.replace(hour=13))
    # Neither of these is in the scope's list.
    secret_services.set_secret(organization=org, pipeline=None if this else pipeline, name="OTHER_SCOPE",
                               value=VALUE)
    secret_services.set_secret(organization=org, pipeline=other_pipeline, name="OTHER_PIPELINE", value=VALUE)
    secret_services.set_secret(organization=other_org, name="OTHER_ORG", value=VALUE)

    response = api.get(scope["url"]())

    assert response.status_code == 200
    assert response.json() == {"secrets": [
        {"name": "A_TOKEN", "protected": True, "updated_at": "2025-03-01T13:00:00.000000Z"},
        {"name": "B_TOKEN", "protected": True, "updated_at": "2025-03-01T12:00:00.000000Z"},
    ], "next_cursor": None}
    assert VALUE.encode() not in response.content


def test_empty_list(api, scope):
    response = api.get(scope["url"]())
    assert (response.status_code, response.json()) == (200, {"secrets": [], "next_cursor": None})


@pytest.mark.parametrize("count", [1, 10])
def test_list_query_count_is_independent_of_the_number_of_secrets(api, owner, org, scope, count,
                                                                   django_assert_num_queries):
    for i in range(count):
        secret_services.set_secret(organization=org, pipeline=scope["pipeline"], name=f"S{i}", value=VALUE)
    ApiToken.objects.filter(user=owner).update(last_used_at=timezone.now())  # authenticating won't write

    # token, membership with organization, [the pipeline,] the secrets
    with django_assert_num_queries(3 if scope["pipeline"] is None else 4):
        response = api.get(scope["url"]())

    assert len(response.json()["secrets"]) == count


# ===================================================================== delete


def test_delete_removes_the_secret_then_404(api, org, pipeline, scope):
    secret_services.set_secret(organization=org, pipeline=scope["pipeline"], name="TOKEN", value=VALUE)
    secret_services.set_secret(organization=org, pipeline=scope["pipeline"], name="KEEP", value=VALUE)
    # The same name at the other level stays.
    secret_services.set_secret(organization=org, pipeline=None if scope["pipeline"] else pipeline, name="TOKEN",
                               value="other-level")

    response = api.delete(scope["url"]("TOKEN"))

    assert response.status_code == 204 and response.content == b""
    assert [name for name, _ in rows(org, scope["pipeline"])] == ["KEEP"]
    assert rows(org, None if scope["pipeline"] else pipeline) == [("TOKEN", "other-level")]
    error = assert_error(api.delete(scope["url"]("TOKEN")), 404, "secret_not_found")
    assert "TOKEN" in error["message"]
    assert api.get(scope["url"]()).json() == {"secrets": [{"name": "KEEP", "protected": True, "updated_at": iso(
        Secret.objects.get(organization=org, pipeline=scope["pipeline"], name="KEEP").updated_at)}], "next_cursor": None}


def test_delete_of_an_unknown_or_malformed_name_is_404(api, org, scope):
    secret_services.set_secret(organization=org, pipeline=scope["pipeline"], name="TOKEN", value=VALUE)
    assert_error(api.delete(scope["url"]("token")), 404, "secret_not_found")  # names are case-sensitive
    assert_error(api.delete(scope["url"]("not-a-name")), 404, "secret_not_found")
    assert Secret.objects.count() == 1


# ===================================================================== who may


def test_members_get_403_on_every_secrets_endpoint_and_nothing_changes(member_api, org, scope):
    secret_services.set_secret(organization=org, pipeline=scope["pipeline"], name="TOKEN", value=VALUE, now=T0)

    for response in (member_api.get(scope["url"]()),
                     member_api.head(scope["url"]()),
                     post(member_api, scope["url"](), {"name": "TOKEN", "value": "member-value"}),
                     post(member_api, scope["url"](), {"name": "NEW", "value": "member-value"}),
                     member_api.delete(scope["url"]("TOKEN"))):
        if response.request["REQUEST_METHOD"] == "HEAD":
            assert response.status_code == 403
            continue
        error = assert_error(response, 403, "insufficient_org_role")
        assert "manage secrets" in error["message"]
        assert VALUE.encode() not in response.content

    assert rows(org, scope["pipeline"]) == [("TOKEN", VALUE)]
    assert Secret.objects.get().updated_at == T0


def test_another_organization_is_404_on_every_secrets_endpoint(stranger_api, other_api_cases, org):
    for method, url in other_api_cases:
        response = getattr(stranger_api, method)(url, {"name": "TOKEN", "value": "x-value"}, format="json") \
            if method == "post" else getattr(stranger_api, method)(url)
        assert_error(response, 404, "organization_not_found")
    assert rows(org) == [("TOKEN", VALUE)]


@pytest.fixture
def other_api_cases(org, pipeline) -> list[tuple[str, str]]:
    secret_services.set_secret(organization=org, name="TOKEN", value=VALUE)
    return [(method, url) for url in (org_url(org.slug), pipeline_url(org.slug, pipeline.slug))
            for method in ("get", "post")] + [
        ("delete", org_url(org.slug, "TOKEN")), ("delete", pipeline_url(org.slug, pipeline.slug, "TOKEN"))]


def test_another_organizations_pipeline_is_404_for_us(api, org, other_org, other_pipeline):
    # Our organization in the URL, their pipeline's slug: no such pipeline here.
    secret_services.set_secret(organization=other_org, pipeline=other_pipeline, name="TOKEN", value=VALUE)
    assert_error(api.get(pipeline_url(org.slug, other_pipeline.slug)), 404, "pipeline_not_found")
    assert_error(post(api, pipeline_url(org.slug, other_pipeline.slug), {"name": "TOKEN", "value": "x-value"}),
                 404, "pipeline_not_found")
    assert_error(api.delete(pipeline_url(org.slug, other_pipeline.slug, "TOKEN")), 404, "pipeline_not_found")
    # Their organization in the URL: not ours to see.
    assert_error(api.get(pipeline_url(other_org.slug, other_pipeline.slug)), 404, "organization_not_found")
    assert rows(other_org, other_pipeline) == [("TOKEN", VALUE)]
    assert not Secret.objects.filter(organization=org).exists()


def test_archived_pipeline_has_no_secrets_endpoint(api, org, pipeline):
    Pipeline.objects.filter(pk=pipeline.pk).update(archived_at=timezone.now())
    assert_error(api.get(pipeline_url(org.slug, pipeline.slug)), 404, "pipeline_not_found")


def test_anonymous_is_401(anon, org, pipeline):
    assert_error(anon.get(org_url(org.slug)), 401, "unauthorized")
    assert_error(anon.post(pipeline_url(org.slug, pipeline.slug), {"name": "A", "value": "bbb"}, format="json"),
                 401, "unauthorized")


# ===================================================================== values never leak


def test_values_appear_in_no_response_and_no_log_line(api, org, pipeline, caplog):
    caplog.set_level(logging.DEBUG)
    responses = [
        post(api, org_url(org.slug), {"name": "TOKEN", "value": VALUE}),
        post(api, org_url(org.slug), {"name": "TOKEN", "value": VALUE}),
        post(api, pipeline_url(org.slug, pipeline.slug), {"name": "TOKEN", "value": VALUE}),
        post(api, org_url(org.slug), {"name": "bad-name", "value": VALUE}),
        post(api, org_url(org.slug), {"name": "BIG", "value": VALUE * 3000}),
        api.get(org_url(org.slug)),
        api.get(pipeline_url(org.slug, pipeline.slug)),
        api.get("/api/v0/openapi.json"),
        api.delete(org_url(org.slug, "TOKEN")),
    ]
    assert [r.status_code for r in responses] == [201, 200, 201, 422, 422, 200, 200, 200, 204]
    for response in responses:
        assert VALUE.encode() not in response.content
    assert all(VALUE not in record.getMessage() for record in caplog.records)


def test_repr_and_str_of_a_secret_hold_no_value(org):
    secret, created = secret_services.set_secret(organization=org, name="TOKEN", value=VALUE)
    assert created
    assert VALUE not in repr(secret) and VALUE not in str(secret)
    assert repr(Secret.objects.get(pk=secret.pk)) == "<Secret: TOKEN>"


def test_a_value_no_key_opens_is_left_out_and_logged_never_replaced_by_the_orgs(org, pipeline, settings, caplog):
    from cryptography.fernet import Fernet

    secret_services.set_secret(organization=org, name="SHARED", value="org-value")
    secret_services.set_secret(organization=org, pipeline=pipeline, name="SHARED", value=VALUE)
    secret_services.set_secret(organization=org, pipeline=pipeline, name="LOST", value=VALUE)
    old = settings.SECRETS_KEYS[0]
    settings.SECRETS_KEYS = [Fernet.generate_key().decode()]
    secret_services.set_secret(organization=org, name="READABLE", value="readable-value")
    Secret.objects.filter(name="SHARED", pipeline=None).update(
        value_encrypted=Fernet(settings.SECRETS_KEYS[0].encode()).encrypt(b"org-value").decode())

    got = secret_services.secrets_for_job(organization_id=org.pk, pipeline_id=pipeline.pk)

    # SHARED: the pipeline's value is unreadable, and the organization's is not used instead.
    assert got == {"READABLE": "readable-value"}
    messages = sorted(r.getMessage() for r in caplog.records if r.name == "harmont.secrets")
    assert messages == [
        f"secret LOST of organization {org.pk} (pipeline {pipeline.pk}) can't be decrypted with HARMONT_SECRETS_KEY; "
        "jobs run without it",
        f"secret SHARED of organization {org.pk} (pipeline {pipeline.pk}) can't be decrypted with "
        "HARMONT_SECRETS_KEY; jobs run without it"]
    assert all(VALUE not in r.getMessage() for r in caplog.records)
    settings.SECRETS_KEYS = [settings.SECRETS_KEYS[0], old]
    assert secret_services.secrets_for_job(organization_id=org.pk, pipeline_id=pipeline.pk)["SHARED"] == VALUE


def test_key_rotation_reads_old_values_and_writes_with_the_new_key(org, settings):
    from cryptography.fernet import Fernet

    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.SECRETS_KEYS = [old]
    secret_services.set_secret(organization=org, name="OLD", value="old-value")
    settings.SECRETS_KEYS = [new, old]
    secret_services.set_secret(organization=org, name="NEW", value="new-value")

    assert secret_services.secrets_for_job(organization_id=org.pk, pipeline_id=None) == {
        "OLD": "old-value", "NEW": "new-value"}
    Fernet(new.encode()).decrypt(Secret.objects.get(name="NEW").value_encrypted.encode())  # the new key wrote it


# ===================================================================== secrets_for_job and the job spec


def test_secrets_for_job_pipeline_wins_over_org_in_one_query(org, pipeline, other_org, other_pipeline,
                                                             django_assert_num_queries):
    second = Pipeline.objects.create(organization=org, slug="second", name="Second", repository="r",
                                     default_branch="main", source_slug="second")
    secret_services.set_secret(organization=org, name="SHARED", value="org-shared")
    secret_services.set_secret(organization=org, name="ORG_ONLY", value="org-only")
    secret_services.set_secret(organization=org, pipeline=pipeline, name="SHARED", value="pipeline-shared")
    secret_services.set_secret(organization=org, pipeline=pipeline, name="PIPE_ONLY", value="pipe-only")
    secret_services.set_secret(organization=org, pipeline=second, name="SECOND_ONLY", value="second-only")
    secret_services.set_secret(organization=other_org, name="THEIRS", value="theirs")
    secret_services.set_secret(organization=other_org, pipeline=other_pipeline, name="SHARED", value="theirs")

    with django_assert_num_queries(1):
        got = secret_services.secrets_for_job(organization_id=org.pk, pipeline_id=pipeline.pk)

    assert got == {"SHARED": "pipeline-shared", "ORG_ONLY": "org-only", "PIPE_ONLY": "pipe-only"}
    assert secret_services.secrets_for_job(organization_id=org.pk, pipeline_id=second.pk) == {
        "SHARED": "org-shared", "ORG_ONLY": "org-only", "SECOND_ONLY": "second-only"}
    assert secret_services.secrets_for_job(organization_id=org.pk, pipeline_id=None) == {
        "SHARED": "org-shared", "ORG_ONLY": "org-only"}


def test_claimed_job_gets_secrets_in_env_and_their_values_to_mask(session, org, pipeline):
    # Unprotected: a build with a request's env gets no protected secret (tests/test_protected_secrets.py).
    unprotected = {"protected": False}
    secret_services.set_secret(organization=org, name="TERM", value="org-term", **unprotected)  # overrides the IR's
    secret_services.set_secret(organization=org, name="DEPLOY_ENV", value="org-deploy", **unprotected)
    secret_services.set_secret(organization=org, pipeline=pipeline, name="DEPLOY_ENV", value="pipeline-deploy",
                               **unprotected)
    # One mask entry per value.
    secret_services.set_secret(organization=org, name="SAME", value="pipeline-deploy", **unprotected)
    build = make_build(pipeline, env={"DEPLOY_ENV": "from-the-request", "OTHER": "kept"})

    spec, _ = claim(session)

    assert spec["env"] == {
        "DEBIAN_FRONTEND": "noninteractive", "TERM": "org-term", "DEPLOY_ENV": "pipeline-deploy", "OTHER": "kept",
        "SAME": "pipeline-deploy",
        "CI": "true", "HARMONT": "true", "HARMONT_BUILD_ID": str(build.id), "HARMONT_BUILD_NUMBER": "1",
        "HARMONT_PIPELINE_SLUG": "web-ci", "HARMONT_BRANCH": "main", "HARMONT_COMMIT": "abc123",
        "HARMONT_STEP_KEY": "a", "HARMONT_PULL_REQUEST_FORK": "false"}
    assert sorted(spec["mask"]) == ["org-term", "pipeline-deploy"]


def test_claimed_job_without_secrets_has_an_empty_mask(session, pipeline):
    make_build(pipeline)
    spec, _ = claim(session)
    assert spec["mask"] == []
    assert "TOKEN" not in spec["env"]


def claim_queries(session_client, org, pipeline) -> list[str]:  # noqa: ANN001
    make_build(pipeline)
    with CaptureQueriesContext(connection) as queries:
        response = session_client.post("/api/v0/agent/claim")
    assert response.status_code == 200
    return [q["sql"] for q in queries.captured_queries]


def test_claim_costs_one_query_for_secrets_however_many_there_are(session, org, pipeline):
    without = claim_queries(session, org, pipeline)
    for i in range(10):
        secret_services.set_secret(organization=org, name=f"ORG_{i}", value=f"org-value-{i}")
        secret_services.set_secret(organization=org, pipeline=pipeline, name=f"PIPE_{i}", value=f"pipe-value-{i}")
    with_secrets = claim_queries(session, org, pipeline)

    assert len(with_secrets) == len(without)
    assert sum("pipelines_secret" in sql for sql in with_secrets) == 1


def test_secrets_reach_every_job_of_the_build(session, org, pipeline):
    secret_services.set_secret(organization=org, name="TOKEN", value=VALUE)
    build = make_build(pipeline, commit="HEAD")  # the default branch's tip: protected secrets too
    first, job_client = claim(session)
    job_client.post(f"/api/v0/agent/jobs/{first['id']}/start")
    assert job_client.post(f"/api/v0/agent/jobs/{first['id']}/finish", {"exit_code": 0},
                           format="json").status_code == 200
    second, _ = claim(session)
    assert (first["step_key"], second["step_key"]) == ("a", "b")
    assert first["env"]["TOKEN"] == second["env"]["TOKEN"] == VALUE
    assert second["mask"] == [VALUE]
    # The secret is not copied into the stored job or build.
    assert all("TOKEN" not in job.env for job in build.jobs.all())
    build.refresh_from_db()
    assert "TOKEN" not in build.env


# ===================================================================== admin


@pytest.fixture
def ops(db) -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("ops@example.com", "a-long-passphrase"))
    return client


def admin_url(action: str, *args: Any) -> str:
    return reverse(f"admin:pipelines_secret_{action}", args=args)


def test_admin_add_encrypts_the_value_through_the_service(ops, org, pipeline):
    response = ops.post(admin_url("add"), {"organization": org.pk, "pipeline": pipeline.pk, "name": "TOKEN",
                                           "value": VALUE})

    assert response.status_code == 302, response.content[:2000]
    secret = Secret.objects.get()
    assert (secret.organization, secret.pipeline, secret.name) == (org, pipeline, "TOKEN")
    assert decrypt_text(secret.value_encrypted) == VALUE and VALUE not in secret.value_encrypted


def test_admin_pages_never_show_the_value(ops, org, pipeline):
    secret, _ = secret_services.set_secret(organization=org, pipeline=pipeline, name="TOKEN", value=VALUE)
    for url in (admin_url("changelist"), admin_url("change", secret.pk), admin_url("add"),
                admin_url("delete", secret.pk), admin_url("history", secret.pk)):
        response = ops.get(url)
        assert response.status_code == 200, url
        assert VALUE.encode() not in response.content, url
        assert secret.value_encrypted.encode() not in response.content, url
    page = ops.get(admin_url("changelist")).content.decode()
    assert "TOKEN" in page and org.slug in page


def test_admin_change_with_an_empty_value_keeps_it_and_a_new_one_replaces_it(ops, org):
    secret, _ = secret_services.set_secret(organization=org, name="TOKEN", value="old-value", now=T0)

    assert ops.post(admin_url("change", secret.pk), {"value": "", "protected": "on"}).status_code == 302
    secret.refresh_from_db()
    assert (decrypt_text(secret.value_encrypted), secret.updated_at) == ("old-value", T0)

    assert ops.post(admin_url("change", secret.pk), {"value": VALUE, "protected": "on"}).status_code == 302
    secret.refresh_from_db()
    assert decrypt_text(secret.value_encrypted) == VALUE and secret.updated_at > T0
    assert (secret.name, secret.pipeline) == ("TOKEN", None)


def test_admin_add_refuses_bad_names_duplicates_and_foreign_pipelines(ops, org, other_pipeline):
    secret_services.set_secret(organization=org, name="TOKEN", value="kept")
    cases = [
        ({"organization": org.pk, "name": "bad-name", "value": VALUE}, "name"),
        ({"organization": org.pk, "name": "HARMONT_X", "value": VALUE}, "name"),
        ({"organization": org.pk, "name": "OK", "value": ""}, "value"),
        ({"organization": org.pk, "name": "OK", "value": "a\x00b"}, "value"),
        ({"organization": org.pk, "pipeline": other_pipeline.pk, "name": "OK", "value": VALUE}, "pipeline"),
    ]
    for data, field in cases:
        response = ops.post(admin_url("add"), data)
        assert response.status_code == 200, data
        assert field in response.context["adminform"].form.errors, (data, response.context["adminform"].form.errors)
        assert VALUE.encode() not in response.content
    duplicate = ops.post(admin_url("add"), {"organization": org.pk, "name": "TOKEN", "value": VALUE})
    assert duplicate.status_code == 200 and duplicate.context["adminform"].form.errors
    assert rows(org) == [("TOKEN", "kept")]
    assert Secret.objects.count() == 1
