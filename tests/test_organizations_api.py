"""GET/POST /organizations and GET /organizations/{org}."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from harmont.errors import ApiError
from organizations import services
from organizations.models import Membership, Organization, Role
from tests.helpers import assert_error, iso, make_api


def org_body(org: Organization) -> dict:
    return {"slug": org.slug, "name": org.name, "url": org.url, "created_at": iso(org.created_at)}


# ---------------------------------------------------------------- list

def test_list_organizations_is_the_callers_oldest_first(api, owner, org, other_org):
    personal = Organization.objects.get(personal_for=owner)
    response = api.get("/api/v0/organizations")
    assert response.status_code == 200
    assert response.json() == {"data": [org_body(personal), org_body(org)], "next_cursor": None}


def test_list_organizations_pages_with_cursor(owner):
    client = make_api(owner)
    for i in range(4):
        services.create_organization(name=f"Team {i}", owner=owner)
    expected = list(Organization.objects.for_user(owner).order_by("id").values_list("slug", flat=True))
    assert len(expected) == 5
    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        body = client.get("/api/v0/organizations", params).json()
        seen += [o["slug"] for o in body["data"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == expected


@pytest.mark.parametrize("limit", ["0", "101", "ten", "-1"])
def test_list_organizations_with_bad_limit_is_400(api, limit):
    assert_error(api.get("/api/v0/organizations", {"limit": limit}), 400, "invalid_limit")


def test_list_organizations_with_bad_cursor_is_400(api):
    assert_error(api.get("/api/v0/organizations", {"cursor": "%%%"}), 400, "invalid_cursor")


def test_list_organizations_without_token_is_401(anon, db):
    assert_error(anon.get("/api/v0/organizations"), 401, "unauthorized")


def _warm(client) -> None:  # noqa: ANN001
    # The first request of a fresh token also writes its last_used_at; measure the steady state.
    client.get("/api/v0/user")


@pytest.mark.parametrize("limit", [1, 100])
def test_list_organizations_query_count_is_constant(owner, django_assert_num_queries, limit):
    client = make_api(owner)
    _warm(client)
    with django_assert_num_queries(2):  # token + page
        assert client.get("/api/v0/organizations", {"limit": limit}).status_code == 200
    Organization.objects.bulk_create(Organization(slug=f"many-{i}", name=f"Many {i}") for i in range(210))
    Membership.objects.bulk_create(Membership(organization=o, user=owner, role=Role.MEMBER)
                                   for o in Organization.objects.filter(slug__startswith="many-"))
    with django_assert_num_queries(2):
        body = client.get("/api/v0/organizations", {"limit": limit}).json()
    assert len(body["data"]) == limit
    with django_assert_num_queries(2):  # a page deep in the list costs the same
        assert len(client.get("/api/v0/organizations", {"limit": limit, "cursor": body["next_cursor"]})
                   .json()["data"]) == limit


# ---------------------------------------------------------------- create

def test_create_organization_makes_caller_owner(api, owner):
    response = api.post("/api/v0/organizations", {"name": "Rocket Labs!", "url": "https://rocket.example"},
                        format="json")
    assert response.status_code == 201
    org = Organization.objects.get(slug="rocket-labs")
    assert response.json() == org_body(org)
    assert response.json()["url"] == "https://rocket.example"
    assert Membership.objects.get(organization=org).user == owner
    assert Membership.objects.get(organization=org).role == Role.OWNER
    assert org.personal_for is None
    assert api.get("/api/v0/organizations/rocket-labs").status_code == 200


def test_create_organization_with_taken_slug_gets_a_suffix(api, org, stranger_api):
    assert org.slug == "acme-corp"
    assert api.post("/api/v0/organizations", {"name": "ACME corp"}, format="json").json()["slug"] == "acme-corp-2"
    assert stranger_api.post("/api/v0/organizations", {"name": "Acme  Corp."}, format="json").json()["slug"] == \
        "acme-corp-3"


def test_create_organization_without_url_has_null_url(api):
    body = api.post("/api/v0/organizations", {"name": "Plain", "url": ""}, format="json").json()
    assert body["url"] is None


def test_create_organization_with_a_long_name_keeps_the_slug_in_its_column(api):
    response = api.post("/api/v0/organizations", {"name": "long " * 51}, format="json")
    assert response.status_code == 201
    assert len(response.json()["slug"]) <= 100
    again = api.post("/api/v0/organizations", {"name": "long " * 51}, format="json").json()["slug"]
    assert again.endswith("-2") and len(again) <= 100


@pytest.mark.parametrize("body, field", [
    ({}, "name"), ({"name": ""}, "name"), ({"name": "  "}, "name"), ({"name": "x" * 256}, "name"),
    ({"name": 5 * [1]}, "name"), ({"name": "!!!"}, "name"), ({"name": "日本"}, "name"),
    ({"name": "ok", "url": "u" * 501}, "url"),
])
def test_create_organization_with_bad_fields_is_422_organization_invalid_and_creates_nothing(api, body, field):
    before = Organization.objects.count(), Membership.objects.count()
    error = assert_error(api.post("/api/v0/organizations", body, format="json"), 422, "organization_invalid")
    assert error["type"] == "validation_failed"
    assert set(error["fields"]) == {field} and error["fields"][field]
    assert (Organization.objects.count(), Membership.objects.count()) == before


def test_create_organization_whose_name_makes_no_slug_is_422_organization_invalid(api, owner):
    # "!!!" once became the slug `org`, an organization named by nothing anyone typed.
    before = Organization.objects.count(), Membership.objects.count()
    response = api.post("/api/v0/organizations", {"name": "!!!"}, format="json")
    error = assert_error(response, 422, "organization_invalid")
    assert error["type"] == "validation_failed"
    assert error["fields"] == {"name": ["Must contain a letter a-z or a digit 0-9: the organization's slug is made "
                                        "of them."]}
    assert (Organization.objects.count(), Membership.objects.count()) == before
    assert not Organization.objects.filter(slug="org").exists()


def test_create_organization_service_refuses_a_name_without_a_slug(owner):
    with pytest.raises(ApiError) as caught:
        services.create_organization(name="-- ¿? --", owner=owner)
    assert (caught.value.code, caught.value.status, list(caught.value.fields)) == ("organization_invalid", 422,
                                                                                   ["name"])
    assert not Organization.objects.filter(personal_for=None).exists()


# ---------------------------------------------------------------- detail

def test_get_organization(member_api, org):
    response = member_api.get(f"/api/v0/organizations/{org.slug}")
    assert response.status_code == 200
    assert response.json() == org_body(org)


def test_get_organization_of_another_org_is_404(api, other_org):
    assert_error(api.get(f"/api/v0/organizations/{other_org.slug}"), 404, "organization_not_found")


def test_get_unknown_organization_is_404(api):
    assert_error(api.get("/api/v0/organizations/no-such-org"), 404, "organization_not_found")


def test_timestamps_are_iso_utc_with_microseconds(api, owner):
    org = services.create_organization(name="Timed", owner=owner,
                                       now=datetime(2026, 6, 4, 0, 0, 0, 123456, tzinfo=UTC))
    assert api.get(f"/api/v0/organizations/{org.slug}").json()["created_at"] == "2026-06-04T00:00:00.123456Z"


def test_created_at_is_now(api):
    before = timezone.now() - timedelta(seconds=1)
    api.post("/api/v0/organizations", {"name": "Fresh"}, format="json")
    assert Organization.objects.get(slug="fresh").created_at > before


# ---------------------------------------------------------------- schema

def test_request_bodies_of_account_and_org_operations_follow_the_reference(client):
    """Request components keep the reference's names and required fields (PATCH bodies included)."""
    reference = json.loads((Path(__file__).parent / "fixtures" / "harmont-openapi.public.json").read_text())
    ours = client.get("/api/v0/openapi.json").json()
    prefixes = ("/api/v0/user", "/api/v0/auth/", "/api/v0/organizations", "/api/v0/invites/")
    checked = 0
    for path, ops in reference["paths"].items():
        if not path.startswith(prefixes) or "/pipelines" in path or path.endswith("/builds"):
            continue
        for method, ref_op in ops.items():
            ref_body = ref_op.get("requestBody")
            if not ref_body:
                continue
            ref_name = ref_body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
            our_body = ours["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
            assert our_body["$ref"].rsplit("/", 1)[-1] == ref_name, (method, path)
            required = set(reference["components"]["schemas"][ref_name].get("required", []))
            assert required <= set(ours["components"]["schemas"][ref_name].get("required", [])), ref_name
            checked += 1
    assert checked == 9  # transfer, claim, redeem, accept, user, api token, organization, invite, member
