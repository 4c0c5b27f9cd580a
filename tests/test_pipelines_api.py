"""Pipelines API: list (oldest first, keyset pages), create, get."""

from __future__ import annotations

import json
from typing import Any

import pytest

from harmont.pagination import encode_cursor
from pipelines import services as pipeline_services
from pipelines.models import Pipeline
from tests.dsl import hm
from tests.helpers import ISO_Z, assert_error, two_step_ir

PIPELINE_KEYS = {"slug", "name", "description", "repository", "repo_name", "default_branch", "visibility",
                 "allow_manual", "source_slug", "definition", "triggers", "fork_pull_requests", "protected_branches",
                 "default_retry", "cancel_intermediate_builds", "cancel_intermediate_builds_branch_filter",
                 "max_concurrent_builds", "default_agents", "test_results_glob", "created_at"}


def url(org_slug: str, pipeline_slug: str | None = None) -> str:
    base = f"/api/v0/organizations/{org_slug}/pipelines"
    return f"{base}/{pipeline_slug}" if pipeline_slug else base


def make_pipeline(org, name: str, **fields: Any) -> Pipeline:
    return pipeline_services.create_pipeline(
        org=org, name=name, repository=fields.pop("repository", f"https://github.com/acme/{name}.git"),
        default_branch="main", **fields,
    )


def create_body(**fields: Any) -> dict[str, Any]:
    return {"name": "Web CI", "repository": "https://github.com/acme/web.git", "default_branch": "main", **fields}


# --------------------------------------------------------------------- list


@pytest.mark.django_db
def test_list_is_oldest_first_with_full_body(api, org, pipeline, other_pipeline):
    second = make_pipeline(org, "second")

    response = api.get(url(org.slug))

    assert response.status_code == 200
    body = response.json()
    assert body["next_cursor"] is None
    assert [p["slug"] for p in body["data"]] == ["web-ci", "second"]  # other org's pipeline absent
    first = body["data"][0]
    assert set(first) == PIPELINE_KEYS
    assert first == {
        "slug": "web-ci", "name": "Web CI", "description": None,
        "repository": "https://github.com/acme/web.git", "repo_name": "acme/web", "default_branch": "main",
        "visibility": "private", "allow_manual": True, "source_slug": "ci", "definition": two_step_ir(),
        "triggers": None, "fork_pull_requests": "build_without_secrets", "protected_branches": [], "default_retry": None,
        "cancel_intermediate_builds": False, "cancel_intermediate_builds_branch_filter": None, "max_concurrent_builds": None, "default_agents": None,
        "test_results_glob": "test-results/**/*.xml", "created_at": first["created_at"],
    }
    assert ISO_Z.match(first["created_at"])
    assert body["data"][1]["slug"] == second.slug


@pytest.mark.django_db
def test_list_walks_keyset_pages(api, org):
    names = [f"p{i}" for i in range(5)]
    for name in names:
        make_pipeline(org, name)

    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        body = api.get(url(org.slug), params).json()
        pages += 1
        assert len(body["data"]) <= 2
        seen += [p["slug"] for p in body["data"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert pages < 10

    assert pages == 3
    assert seen == names


@pytest.mark.django_db
def test_list_limit_exactly_filling_the_last_page_has_no_cursor(api, org):
    for name in ("p0", "p1"):
        make_pipeline(org, name)

    body = api.get(url(org.slug), {"limit": 2}).json()

    assert [p["slug"] for p in body["data"]] == ["p0", "p1"]
    assert body["next_cursor"] is None


@pytest.mark.django_db
@pytest.mark.parametrize("limit", ["0", "101", "x", "-1", "1.5"])
def test_list_rejects_bad_limit(api, org, limit):
    assert_error(api.get(url(org.slug), {"limit": limit}), 400, "invalid_limit")


@pytest.mark.django_db
@pytest.mark.parametrize("cursor", ["garbage!", "bm90IGpzb24", "eyJ4IjogMX0", "eyJrIjogIjEifQ", "WzFd", "ñ"])
def test_list_rejects_bad_cursor(api, org, cursor):
    # not base64, not JSON, no "k", "k" not an int, a JSON array, not ASCII
    error = assert_error(api.get(url(org.slug), {"cursor": cursor}), 400, "invalid_cursor")
    assert error["type"] == "invalid_request"


@pytest.mark.django_db
@pytest.mark.parametrize(("key", "slugs"), [(10**30, []), (2**63, []), (-(10**30), ["web-ci"]), (0, ["web-ci"])])
def test_list_with_out_of_range_cursor_key_is_harmless(api, org, pipeline, key, slugs):
    response = api.get(url(org.slug), {"cursor": encode_cursor(key)})

    assert response.status_code == 200, response.content
    assert [p["slug"] for p in response.json()["data"]] == slugs


@pytest.mark.django_db
def test_list_of_another_org_is_404(api, other_org):
    assert_error(api.get(url(other_org.slug)), 404, "organization_not_found")


@pytest.mark.django_db
def test_list_without_token_is_401(anon, org):
    assert_error(anon.get(url(org.slug)), 401, "unauthorized")


# --------------------------------------------------------------------- create


@pytest.mark.django_db
def test_create_returns_full_body(admin_api, org):
    response = admin_api.post(url(org.slug), create_body(name="Web  CI / Nightly!", description="nightly"),
                              format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    assert body == {
        "slug": "web-ci-nightly", "name": "Web  CI / Nightly!", "description": "nightly",
        "repository": "https://github.com/acme/web.git", "repo_name": "acme/web", "default_branch": "main",
        "visibility": "private", "allow_manual": True, "source_slug": "web-ci-nightly", "definition": None,
        "triggers": None, "fork_pull_requests": "build_without_secrets", "protected_branches": [], "default_retry": None,
        "cancel_intermediate_builds": False, "cancel_intermediate_builds_branch_filter": None, "max_concurrent_builds": None, "default_agents": None,
        "test_results_glob": "test-results/**/*.xml", "created_at": body["created_at"],
    }
    assert ISO_Z.match(body["created_at"])
    stored = Pipeline.objects.get(organization=org, slug="web-ci-nightly")
    assert (stored.repo_name, stored.source_slug, stored.definition) == ("acme/web", "web-ci-nightly", None)


@pytest.mark.django_db
@pytest.mark.parametrize(("repository", "repo_name"), [
    ("https://github.com/acme/web.git", "acme/web"),
    ("https://github.com/acme/web", "acme/web"),
    ("https://github.com/acme/web/", "acme/web"),
    ("https://github.com/acme/web.git/", "acme/web"),
    ("git@github.com:acme/web.git", "acme/web"),
    ("git@github.com:acme/web", "acme/web"),
    ("ssh://git@gitlab.example.com:2222/group/sub/web.git", "sub/web"),
])
def test_create_derives_repo_name(admin_api, org, repository, repo_name):
    response = admin_api.post(url(org.slug), create_body(repository=repository), format="json")

    assert response.status_code == 201, response.content
    assert response.json()["repo_name"] == repo_name
    assert Pipeline.objects.get(organization=org).repo_name == repo_name


@pytest.mark.django_db
def test_create_explicit_repo_name_wins(admin_api, org):
    response = admin_api.post(url(org.slug), create_body(repo_name="Mirror/Web"), format="json")

    assert response.status_code == 201
    assert response.json()["repo_name"] == "Mirror/Web"


@pytest.mark.django_db
def test_create_honours_allow_manual_visibility_source_slug_and_definition(admin_api, org):
    definition = two_step_ir()
    response = admin_api.post(url(org.slug), create_body(
        allow_manual=False, visibility="public", source_slug="deploy", definition=definition,
    ), format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["allow_manual"], body["visibility"], body["source_slug"], body["definition"]) == (
        False, "public", "deploy", definition)
    stored = Pipeline.objects.get(organization=org, slug="web-ci")
    assert (stored.allow_manual, stored.visibility, stored.source_slug, stored.definition) == (
        False, "public", "deploy", definition)


@pytest.mark.django_db
def test_create_accepts_definition_as_json_string(admin_api, org):
    definition = hm.pipeline([hm.sh("make test", key="test")])

    response = admin_api.post(url(org.slug), create_body(definition=json.dumps(definition)), format="json")

    assert response.status_code == 201, response.content
    assert response.json()["definition"] == definition
    assert Pipeline.objects.get(organization=org).definition == definition


@pytest.mark.django_db
def test_create_with_cyclic_definition_is_422_and_creates_nothing(admin_api, org):
    cyclic = hm.pipeline([hm.sh("echo a", key="a").sh("echo b", key="b")])
    cyclic["graph"]["edges"].append([1, 0, "depends_on"])

    response = admin_api.post(url(org.slug), create_body(definition=cyclic), format="json")

    error = assert_error(response, 422, "pipeline_invalid")
    assert error["type"] == "validation_failed"
    assert list(error["fields"]) == ["definition"]
    assert error["fields"]["definition"][0].startswith("cycle: ")
    assert not Pipeline.objects.filter(organization=org).exists()


@pytest.mark.django_db
@pytest.mark.parametrize("definition", ["{not json", [1, 2], {"version": "1"}])
def test_create_with_unplannable_definition_is_422(admin_api, org, definition):
    error = assert_error(admin_api.post(url(org.slug), create_body(definition=definition), format="json"),
                         422, "pipeline_invalid")
    assert error["type"] == "validation_failed"
    assert list(error["fields"]) == ["definition"]
    assert not Pipeline.objects.filter(organization=org).exists()


@pytest.mark.django_db
def test_create_with_taken_slug_is_422(admin_api, org, pipeline):
    response = admin_api.post(url(org.slug), create_body(name="web ci"), format="json")  # slug "web-ci" again

    error = assert_error(response, 422, "pipeline_slug_taken")
    assert error["type"] == "validation_failed"
    assert Pipeline.objects.filter(organization=org).count() == 1


@pytest.mark.django_db
def test_same_slug_in_another_org_is_fine(admin_api, org, other_pipeline):
    assert admin_api.post(url(org.slug), create_body(), format="json").status_code == 201
    assert Pipeline.objects.filter(slug="web-ci").count() == 2


@pytest.mark.django_db
def test_owner_may_create(api, org):
    assert api.post(url(org.slug), create_body(), format="json").status_code == 201


@pytest.mark.django_db
def test_member_may_not_create(member_api, org):
    error = assert_error(member_api.post(url(org.slug), create_body(), format="json"), 403, "insufficient_org_role")
    assert error["type"] == "forbidden"
    assert not Pipeline.objects.exists()


@pytest.mark.django_db
def test_member_may_read(member_api, org, pipeline):
    assert member_api.get(url(org.slug)).json()["data"][0]["slug"] == "web-ci"
    assert member_api.get(url(org.slug, "web-ci")).status_code == 200


@pytest.mark.django_db
def test_create_in_another_org_is_404(api, other_org):
    assert_error(api.post(url(other_org.slug), create_body(), format="json"), 404, "organization_not_found")
    assert not Pipeline.objects.exists()


@pytest.mark.django_db
def test_create_without_required_fields_is_422_pipeline_invalid_with_fields(admin_api, org):
    error = assert_error(admin_api.post(url(org.slug), {}, format="json"), 422, "pipeline_invalid")

    assert error["type"] == "validation_failed"
    assert error["fields"] == {"name": ["This field is required."], "repository": ["This field is required."],
                               "default_branch": ["This field is required."]}
    assert not Pipeline.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(("field", "value"), [
    ("name", "!!!"), ("name", "日本"), ("name", "  "), ("name", 5 * [1]), ("visibility", "secret"),
    ("allow_manual", "maybe"), ("source_slug", "not a slug"), ("repository", None), ("default_branch", "x" * 256),
])
def test_create_with_bad_field_is_422_pipeline_invalid(admin_api, org, field, value):
    error = assert_error(admin_api.post(url(org.slug), create_body(**{field: value}), format="json"),
                         422, "pipeline_invalid")
    assert error["type"] == "validation_failed"
    assert list(error["fields"]) == [field] and error["fields"][field]
    assert not Pipeline.objects.exists()


@pytest.mark.django_db
def test_create_with_a_name_that_makes_no_slug_is_422_pipeline_invalid(admin_api, org):
    # Such a name once became the slug `pipeline`, which nobody had asked for.
    error = assert_error(admin_api.post(url(org.slug), create_body(name="!!!"), format="json"), 422,
                         "pipeline_invalid")
    assert error["type"] == "validation_failed"
    assert error["fields"] == {"name": ["Must contain a letter a-z or a digit 0-9: the pipeline's slug is made of "
                                        "them."]}
    assert not Pipeline.objects.exists()


@pytest.mark.django_db
def test_create_ignores_unknown_fields(admin_api, org):
    response = admin_api.post(url(org.slug), create_body(color="blue", build_counter=99, slug="chosen"),
                              format="json")

    assert response.status_code == 201
    assert response.json()["slug"] == "web-ci"
    assert set(response.json()) == PIPELINE_KEYS
    assert Pipeline.objects.get(organization=org).build_counter == 0


@pytest.mark.django_db
def test_create_with_long_name_truncates_slug(admin_api, org):
    name = "x" * 99 + " " + "y" * 150  # a valid 250-character name; its slug would be 250 characters

    response = admin_api.post(url(org.slug), create_body(name=name), format="json")

    assert response.status_code == 201, response.content
    slug = response.json()["slug"]
    assert slug == "x" * 99  # cut at 100, then the trailing "-" trimmed
    assert api_get_ok(admin_api, url(org.slug, slug))["name"] == name


@pytest.mark.django_db
def test_create_with_too_long_derived_repo_name_is_422(admin_api, org):
    repository = "https://example.com/" + "a" * 200 + "/" + "b" * 200  # fits the 500-character field

    error = assert_error(admin_api.post(url(org.slug), create_body(repository=repository), format="json"),
                         422, "pipeline_invalid")

    assert error["type"] == "validation_failed"
    assert list(error["fields"]) == ["repo_name"]
    assert not Pipeline.objects.exists()
    # Naming it explicitly is the way out.
    response = admin_api.post(url(org.slug), create_body(repository=repository, repo_name="a/b"), format="json")
    assert response.status_code == 201


def api_get_ok(client, path: str) -> dict[str, Any]:
    response = client.get(path)
    assert response.status_code == 200, response.content
    return response.json()


@pytest.mark.django_db
def test_create_with_malformed_json_is_400(admin_api, org):
    response = admin_api.post(url(org.slug), data="{nope", content_type="application/json")
    assert_error(response, 400, "invalid_json")


# --------------------------------------------------------------------- get


@pytest.mark.django_db
def test_get_returns_full_body(api, org, pipeline):
    body = api_get_ok(api, url(org.slug, "web-ci"))

    assert set(body) == PIPELINE_KEYS
    assert (body["slug"], body["repo_name"], body["source_slug"], body["definition"]) == (
        "web-ci", "acme/web", "ci", two_step_ir())


@pytest.mark.django_db
def test_get_unknown_pipeline_is_404(api, org, pipeline):
    assert_error(api.get(url(org.slug, "nope")), 404, "pipeline_not_found")


@pytest.mark.django_db
def test_get_other_orgs_pipeline_is_404(api, org, other_org, other_pipeline):
    # By the other org's slug: the org itself is hidden.
    assert_error(api.get(url(other_org.slug, other_pipeline.slug)), 404, "organization_not_found")


@pytest.mark.django_db
def test_stranger_cannot_see_our_pipeline(stranger_api, org, pipeline):
    assert_error(stranger_api.get(url(org.slug, pipeline.slug)), 404, "organization_not_found")


@pytest.mark.django_db
def test_create_with_array_body_is_400_like_every_non_object_body(admin_api, org):
    assert_error(admin_api.post(url(org.slug), [create_body()], format="json"), 400, "invalid_request")
    assert not Pipeline.objects.exists()
