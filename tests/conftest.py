"""Shared fixtures: an organization with an owner, an admin and a member, each
with an API client; another organization they cannot see; a pipeline and builds;
an agent token, a registered agent's session and a running job.

Plain helpers are in tests/helpers.py. The fixtures of live servers and agent
processes are in tests/e2e.py and tests/live.py, those of podman agents in
tests/containers.py, loaded as plugins below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.test import APIClient

from builds.models import Agent, Build
from organizations import services as org_services
from organizations.models import Membership, Organization, Role, User
from pipelines import services as pipeline_services
from pipelines.models import Pipeline

# Marked before it is imported, so that its asserts report their values on failure, as a test's do.
pytest.register_assert_rewrite("tests.helpers")
from tests.helpers import bearer, claim, make_api, make_build, register, start, two_step_ir  # noqa: E402

pytest_plugins = ["tests.e2e", "tests.live", "tests.containers"]


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


@pytest.fixture
def build(pipeline) -> Build:
    return make_build(pipeline, message="first build")


@pytest.fixture
def agent_token(org: Organization) -> org_services.IssuedAgentToken:
    """An agent token of `org`: `.raw` is the value agents register with (hma_), `.token` its row."""
    return org_services.create_agent_token(organization=org, description="tests")


@pytest.fixture
def session(agent_token: org_services.IssuedAgentToken) -> APIClient:
    """A registered agent's client (hms_); `.agent` is its row."""
    response = register(agent_token.raw)
    assert response.status_code == 201, response.content
    client = bearer(response.json()["session_token"])
    client.agent = Agent.objects.get(pk=response.json()["agent"]["id"])  # type: ignore[attr-defined]
    return client


@pytest.fixture
def running(session: APIClient, build: Build) -> tuple[dict[str, Any], APIClient]:
    """Job `a` of `build` claimed and started: (spec, job client)."""
    spec, job_client = claim(session)
    assert spec["step_key"] == "a"
    start(job_client, spec["id"])
    return spec, job_client


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings) -> None:
    # PBKDF2's deliberate slowness is for attackers, not for a test suite.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
