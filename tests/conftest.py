"""Shared fixtures: an organization with an owner, an admin and a member, each
with an API client; another organization they cannot see; a pipeline and builds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.dsl import hm
import pytest
from django.db import connection
from rest_framework.test import APIClient

from builds import services as build_services
from builds.models import Build
from organizations import services as org_services
from organizations.models import Membership, Organization, Role, User
from pipelines import services as pipeline_services
from pipelines.models import Pipeline


def two_step_ir() -> dict[str, Any]:
    """`a` then `b` (b builds in a's files), rendered by the real harmont package."""
    first = hm.sh("echo a", key="a")
    return hm.pipeline([first.sh("echo b", key="b")])


def make_api(user: User) -> APIClient:
    client = APIClient()
    raw = org_services.create_personal_token(user=user, description="tests").raw
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    client.raw_token = raw  # type: ignore[attr-defined]
    return client


@pytest.fixture
def make_user(db) -> Callable[..., User]:
    def make(email: str, **kwargs: Any) -> User:
        return org_services.create_user(email=email, password=kwargs.pop("password", "pw-123456-long"), **kwargs)
    return make


@pytest.fixture
def owner(make_user) -> User:
    return make_user("owner@example.com", name="Olive Owner")


@pytest.fixture
def org(owner) -> Organization:
    return org_services.create_organization(name="Acme Corp", owner=owner)


def _join(org: Organization, user: User, role: str) -> User:
    Membership.objects.create(organization=org, user=user, role=role)
    return user


@pytest.fixture
def admin_user(make_user, org) -> User:
    return _join(org, make_user("admin@example.com", name="Ada Admin"), Role.ADMIN)


@pytest.fixture
def member(make_user, org) -> User:
    return _join(org, make_user("member@example.com", name="Mo Member"), Role.MEMBER)


@pytest.fixture
def stranger(make_user) -> User:
    return make_user("stranger@example.com", name="Stan Stranger")


@pytest.fixture
def other_org(stranger) -> Organization:
    return org_services.create_organization(name="Other Inc", owner=stranger)


@pytest.fixture
def api(owner) -> APIClient:
    """The org owner's client."""
    return make_api(owner)


@pytest.fixture
def admin_api(admin_user) -> APIClient:
    return make_api(admin_user)


@pytest.fixture
def member_api(member) -> APIClient:
    return make_api(member)


@pytest.fixture
def stranger_api(stranger) -> APIClient:
    return make_api(stranger)


@pytest.fixture
def anon() -> APIClient:
    return APIClient()


@pytest.fixture
def pipeline(org) -> Pipeline:
    return pipeline_services.create_pipeline(
        org=org, name="Web CI", repository="https://github.com/acme/web.git", default_branch="main",
        source_slug="ci", definition=two_step_ir(),
    )


@pytest.fixture
def other_pipeline(other_org) -> Pipeline:
    return pipeline_services.create_pipeline(
        org=other_org, name="Web CI", repository="https://github.com/other/web.git", default_branch="main",
        definition=two_step_ir(),
    )


def make_build(pipeline: Pipeline, **fields: Any) -> Build:
    request = build_services.validate_build_request(**{"branch": "main", "commit": "abc123", **fields})
    return build_services.create_build(pipeline=pipeline, request=request)


@pytest.fixture
def build(pipeline) -> Build:
    return make_build(pipeline, message="first build")


def is_postgres() -> bool:
    return connection.vendor == "postgresql"


def assert_error(response, status: int, code: str) -> dict[str, Any]:
    """The response is the error envelope with this status and code; returns the error body."""
    assert response.status_code == status, (response.status_code, response.content[:500])
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error["code"] == code, error
    assert error["type"] and error["message"]
    assert error["doc_url"].endswith(f"/docs/errors/{code}")
    assert error["request_id"] == response["X-Request-Id"]
    return error


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings) -> None:
    # PBKDF2's deliberate slowness is for attackers, not for a test suite.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
