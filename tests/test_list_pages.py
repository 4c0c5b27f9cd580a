"""Members, invites, secrets, API tokens, agent tokens and agents come in keyset pages.

Each list keeps its key (`data`, or `api_tokens` and `secrets`) and its order,
adds `next_cursor`, and costs the same few queries whatever the page size or
depth. Rows are made with creation times in ties, so the pages must order by
the time and then the id to neither skip nor repeat one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone as dt_timezone
from typing import Any, Callable

import pytest
from django.utils import timezone

from builds.models import Agent
from harmont.pagination import _encode
from organizations import services as org_services
from organizations.models import AgentToken, ApiToken, Invite, Membership, Organization, TokenKind, User
from pipelines import secrets as secret_services
from pipelines.models import Pipeline
from tests.helpers import assert_error, make_agent

pytestmark = pytest.mark.django_db

ROWS = 30
T0 = datetime(2026, 3, 1, tzinfo=dt_timezone.utc)
# The bearer token (with its user), then the caller's membership (with its organization).
AUTH = 1
AUTH_AND_MEMBERSHIP = 2


def tied(model: type, rows: Any) -> None:
    """Creation times three to a minute, so a page can end inside a tie."""
    for i, row in enumerate(rows):
        model.objects.filter(pk=row.pk).update(created_at=T0 + timedelta(minutes=i // 3))


def make_members(org: Organization, owner: User, pipeline: Pipeline) -> None:
    users = [org_services.create_user(email=f"m{i}@example.com", password="pw-123456-long") for i in range(ROWS)]
    tied(Membership, [Membership.objects.create(organization=org, user=user) for user in users])


def make_invites(org: Organization, owner: User, pipeline: Pipeline) -> None:
    issued = [org_services.create_invite(organization=org, invited_by=owner, email=f"i{i}@example.com", role="member")
              for i in range(ROWS)]
    tied(Invite, [i.invite for i in issued])


def make_api_tokens(org: Organization, owner: User, pipeline: Pipeline) -> None:
    tied(ApiToken, [org_services.create_personal_token(user=owner, description=f"t{i}").token for i in range(ROWS)])


def make_agent_tokens(org: Organization, owner: User, pipeline: Pipeline) -> None:
    tied(AgentToken, [org_services.create_agent_token(organization=org, description=f"a{i}").token
                      for i in range(ROWS)])


def make_org_secrets(org: Organization, owner: User, pipeline: Pipeline) -> None:
    for i in range(ROWS):
        secret_services.set_secret(organization=org, name=f"S_{i:02d}", value="value")


def make_pipeline_secrets(org: Organization, owner: User, pipeline: Pipeline) -> None:
    for i in range(ROWS):
        secret_services.set_secret(organization=org, pipeline=pipeline, name=f"P_{i:02d}", value="value")
    secret_services.set_secret(organization=org, name="ORG_ONLY", value="value")


def make_agents(org: Organization, owner: User, pipeline: Pipeline) -> None:
    tied(Agent, [make_agent(org, name=f"agent-{i}") for i in range(ROWS)])
    gone = make_agent(org, name="gone")  # seen more than a day ago: not listed
    Agent.objects.filter(pk=gone.pk).update(last_seen_at=timezone.now() - timedelta(days=2))


@dataclass(frozen=True)
class ListCase:
    make: Callable[[Organization, User, Pipeline], None]
    url: Callable[[Organization, Pipeline], str]
    key: str  # the list's key in the answer
    ident: str  # what names an item in it
    expected: Callable[[Organization, User, Pipeline], list[str]]  # every item's ident, in the list's order
    queries: int


def ids(rows: Any) -> list[str]:
    return [str(value) for value in rows]


CASES = {
    "members": ListCase(
        make_members, lambda org, p: f"/api/v0/organizations/{org.slug}/members", "data", "user_uuid",
        lambda org, owner, p: ids(Membership.objects.filter(organization=org).order_by("created_at", "id")
                                  .values_list("user__uuid", flat=True)),
        AUTH_AND_MEMBERSHIP + 1),
    "invites": ListCase(
        make_invites, lambda org, p: f"/api/v0/organizations/{org.slug}/invites", "data", "id",
        lambda org, owner, p: ids(Invite.objects.filter(organization=org).order_by("created_at", "id")
                                  .values_list("id", flat=True)),
        AUTH_AND_MEMBERSHIP + 1),
    "api_tokens": ListCase(
        make_api_tokens, lambda org, p: "/api/v0/user/api-tokens", "api_tokens", "id",
        lambda org, owner, p: ids(ApiToken.objects.filter(user=owner, kind=TokenKind.PERSONAL)
                                  .order_by("-created_at", "-pk").values_list("id", flat=True)),
        AUTH + 1),
    "agent_tokens": ListCase(
        make_agent_tokens, lambda org, p: f"/api/v0/organizations/{org.slug}/agent-tokens", "data", "id",
        lambda org, owner, p: ids(AgentToken.objects.filter(organization=org).order_by("-created_at", "-pk")
                                  .values_list("id", flat=True)),
        AUTH_AND_MEMBERSHIP + 1),
    "org_secrets": ListCase(
        make_org_secrets, lambda org, p: f"/api/v0/organizations/{org.slug}/secrets", "secrets", "name",
        lambda org, owner, p: [f"S_{i:02d}" for i in range(ROWS)],
        AUTH_AND_MEMBERSHIP + 1),
    "pipeline_secrets": ListCase(
        make_pipeline_secrets, lambda org, p: f"/api/v0/organizations/{org.slug}/pipelines/{p.slug}/secrets",
        "secrets", "name", lambda org, owner, p: [f"P_{i:02d}" for i in range(ROWS)],
        AUTH_AND_MEMBERSHIP + 2),  # the pipeline, then the page
    "agents": ListCase(
        make_agents, lambda org, p: f"/api/v0/organizations/{org.slug}/agents", "data", "id",
        lambda org, owner, p: ids(Agent.objects.filter(organization=org).exclude(name="gone")
                                  .order_by("-created_at", "-pk").values_list("id", flat=True)),
        AUTH_AND_MEMBERSHIP + 2),  # the page with its tokens, then the page's live jobs
}


@pytest.fixture
def quiet_api(api: Any, owner: User) -> Any:
    """The owner's client, with `last_used_at` fresh so authenticating never writes."""
    assert ApiToken.objects.filter(user=owner).update(last_used_at=timezone.now()) == 1
    return api


@pytest.fixture(params=list(CASES))
def case(request: Any, org: Organization, owner: User, pipeline: Pipeline) -> tuple[ListCase, str, list[str]]:
    case = CASES[request.param]
    case.make(org, owner, pipeline)
    expected = case.expected(org, owner, pipeline)
    assert len(expected) >= ROWS
    return case, case.url(org, pipeline), expected


def test_a_list_walked_in_pages_of_7_has_every_row_once_in_order_at_constant_cost(quiet_api, case,
                                                                                   django_assert_num_queries):
    list_case, url, expected = case
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        with django_assert_num_queries(list_case.queries):
            response = quiet_api.get(url, {"limit": 7, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.content
        body = response.json()
        assert set(body) == {list_case.key, "next_cursor"}
        assert len(body[list_case.key]) <= 7
        seen += [str(item[list_case.ident]) for item in body[list_case.key]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == expected
    assert pages == -(-len(expected) // 7)


@pytest.mark.parametrize("limit", [1, 100])
def test_a_page_costs_the_same_for_any_size(quiet_api, case, django_assert_num_queries, limit):
    list_case, url, expected = case
    with django_assert_num_queries(list_case.queries):
        body = quiet_api.get(url, {"limit": limit}).json()
    assert [str(item[list_case.ident]) for item in body[list_case.key]] == expected[:limit]
    assert (body["next_cursor"] is None) == (limit >= len(expected))


def test_a_row_added_between_pages_is_neither_skipped_nor_repeated(quiet_api, org, owner, pipeline):
    first = quiet_api.get(f"/api/v0/organizations/{org.slug}/secrets", {"limit": 2})
    assert first.json() == {"secrets": [], "next_cursor": None}
    for name in ("A", "C", "E"):
        secret_services.set_secret(organization=org, name=name, value="value")
    page = quiet_api.get(f"/api/v0/organizations/{org.slug}/secrets", {"limit": 2}).json()
    assert [s["name"] for s in page["secrets"]] == ["A", "C"]
    secret_services.set_secret(organization=org, name="B", value="value")  # before the cursor: not shown
    secret_services.set_secret(organization=org, name="D", value="value")  # after it: shown
    rest = quiet_api.get(f"/api/v0/organizations/{org.slug}/secrets", {"limit": 2, "cursor": page["next_cursor"]})
    assert [s["name"] for s in rest.json()["secrets"]] == ["D", "E"]


@pytest.mark.parametrize("cursor", ["not-base64!", _encode({"v": ["2026-01-01T00:00:00"]}), _encode({"v": []}),
                                    _encode({"v": ["2026-01-01T00:00:00+00:00", "not-a-uuid"]}),
                                    _encode({"v": [1, 2]}), _encode({"k": 5}), _encode({"v": "x"})],
                         ids=["garbage", "naive-time", "empty", "bad-id", "numbers", "other-list", "not-a-list"])
def test_a_cursor_that_does_not_decode_is_400(quiet_api, org, cursor):
    response = quiet_api.get(f"/api/v0/organizations/{org.slug}/agent-tokens", {"cursor": cursor})
    assert_error(response, 400, "invalid_cursor")


@pytest.mark.parametrize("path", ["members", "invites", "agent-tokens", "secrets", "agents",
                                  "pipelines/web-ci/secrets"])
def test_a_limit_out_of_range_is_400(quiet_api, org, pipeline, path):
    assert_error(quiet_api.get(f"/api/v0/organizations/{org.slug}/{path}", {"limit": 101}), 400, "invalid_limit")


def test_a_limit_out_of_range_on_api_tokens_is_400(quiet_api):
    assert_error(quiet_api.get("/api/v0/user/api-tokens", {"limit": 0}), 400, "invalid_limit")


def test_the_openapi_document_gives_every_paged_list_limit_and_cursor(api):
    document = api.get("/api/v0/openapi.json").json()
    operations = {op["operationId"]: op for path in document["paths"].values() for op in path.values()
                  if isinstance(op, dict) and "operationId" in op}
    for operation_id in ("listOrgMembers", "listInvites", "listApiTokens", "listAgentTokens", "listOrgSecrets",
                         "listPipelineSecrets", "listAgents"):
        names = {p["name"] for p in operations[operation_id].get("parameters", []) if p["in"] == "query"}
        assert {"limit", "cursor"} <= names, operation_id
