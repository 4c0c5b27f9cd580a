"""Agent tokens: created and revoked by admins (API, admin site, management command),
stored only as a hash, and revoking one stops every agent that registered with it."""

from __future__ import annotations

import hashlib
import re
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from builds.models import Agent
from organizations import services as org_services
from organizations.models import AgentToken
from tests.helpers import assert_error, bearer, iso, make_build, register

TOKEN_KEYS = {"id", "description", "created_at", "last_used_at", "revoked_at"}
RAW_AGENT_TOKEN = re.compile(r"hma_[A-Za-z0-9_-]{43}")


def tokens_url(org_slug: str, suffix: str = "") -> str:
    return f"/api/v0/organizations/{org_slug}/agent-tokens{suffix}"


# ===================================================================== create


@pytest.mark.django_db
def test_admin_creates_token_201_with_raw_value_once_and_only_its_hash_stored(admin_api, admin_user, org):
    response = admin_api.post(tokens_url(org.slug), {"description": "build box"}, format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    stored = AgentToken.objects.get()
    assert body == {
        "token": body["token"],
        "agent_token": {"id": str(stored.id), "description": "build box", "created_at": iso(stored.created_at),
                        "last_used_at": None, "revoked_at": None},
    }
    raw = body["token"]
    assert RAW_AGENT_TOKEN.fullmatch(raw)
    assert stored.organization == org
    assert stored.created_by == admin_user
    assert stored.token_hash == hashlib.sha256(raw.encode()).hexdigest()
    # The raw value is nowhere in the row.
    assert all(raw not in str(getattr(stored, field.attname)) for field in AgentToken._meta.concrete_fields)


@pytest.mark.django_db
def test_created_token_registers_an_agent(admin_api, org):
    raw = admin_api.post(tokens_url(org.slug), {}, format="json").json()["token"]

    response = register(raw)

    assert response.status_code == 201, response.content
    assert Agent.objects.get().organization == org
    assert AgentToken.objects.get().last_used_at is not None


@pytest.mark.django_db
def test_owner_may_create_tokens_and_description_defaults_to_blank(api, org):
    response = api.post(tokens_url(org.slug), {}, format="json")

    assert response.status_code == 201, response.content
    assert response.json()["agent_token"]["description"] == ""


@pytest.mark.django_db
def test_member_may_not_create_tokens(member_api, org):
    assert_error(member_api.post(tokens_url(org.slug), {"description": "x"}, format="json"), 403,
                 "insufficient_org_role")
    assert not AgentToken.objects.exists()


@pytest.mark.django_db
def test_create_in_another_org_is_404(api, other_org):
    assert_error(api.post(tokens_url(other_org.slug), {}, format="json"), 404, "organization_not_found")
    assert not AgentToken.objects.exists()


@pytest.mark.django_db
def test_create_with_too_long_description_is_422_and_writes_nothing(admin_api, org):
    error = assert_error(admin_api.post(tokens_url(org.slug), {"description": "x" * 256}, format="json"), 422,
                         "validation_failed")
    assert set(error["fields"]) == {"description"}
    assert not AgentToken.objects.exists()


@pytest.mark.django_db
def test_create_without_credentials_is_401(anon, org):
    assert_error(anon.post(tokens_url(org.slug), {}, format="json"), 401, "unauthorized")


# ===================================================================== list


@pytest.mark.django_db
def test_list_shows_live_tokens_newest_first_without_secrets(admin_api, org, other_org):
    first = admin_api.post(tokens_url(org.slug), {"description": "first"}, format="json").json()
    second = admin_api.post(tokens_url(org.slug), {"description": "second"}, format="json").json()
    revoked = org_services.create_agent_token(organization=org, description="revoked")
    org_services.revoke_agent_token(token=revoked.token)
    org_services.create_agent_token(organization=other_org, description="theirs")

    response = admin_api.get(tokens_url(org.slug))

    assert response.status_code == 200
    assert response.json() == {"data": [second["agent_token"], first["agent_token"]], "next_cursor": None}
    assert first["token"] not in response.content.decode()
    assert second["token"] not in response.content.decode()
    assert set(response.json()["data"][0]) == TOKEN_KEYS


@pytest.mark.django_db
def test_member_may_not_list_tokens(member_api, org):
    org_services.create_agent_token(organization=org)
    assert_error(member_api.get(tokens_url(org.slug)), 403, "insufficient_org_role")


@pytest.mark.django_db
def test_list_of_another_org_is_404(api, other_org):
    org_services.create_agent_token(organization=other_org)
    assert_error(api.get(tokens_url(other_org.slug)), 404, "organization_not_found")


# ===================================================================== revoke


@pytest.fixture
def running_agent(org, pipeline):
    """A token, an agent registered with it, and a claimed job: (token, session client, job client, job id)."""
    issued = org_services.create_agent_token(organization=org)
    session = register(issued.raw).json()["session_token"]
    make_build(pipeline)
    claim = bearer(session).post("/api/v0/agent/claim")
    assert claim.status_code == 200, claim.content
    return issued.token, bearer(session), bearer(claim.json()["job_token"]), claim.json()["job"]["id"]


@pytest.mark.django_db
def test_revoke_is_204_and_stops_its_agents_sessions_and_job_credentials(admin_api, org, running_agent):
    token, session, job_client, job_id = running_agent
    assert job_client.post(f"/api/v0/agent/jobs/{job_id}/heartbeat", {}, format="json").status_code == 200

    response = admin_api.delete(tokens_url(org.slug, f"/{token.id}"))

    assert response.status_code == 204
    assert response.content == b""
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert_error(session.post("/api/v0/agent/claim"), 401, "unauthorized")
    assert_error(job_client.post(f"/api/v0/agent/jobs/{job_id}/heartbeat", {}, format="json"), 401, "unauthorized")
    assert_error(job_client.post(f"/api/v0/agent/jobs/{job_id}/finish", {"exit_code": 0}, format="json"), 401,
                 "unauthorized")
    assert admin_api.get(tokens_url(org.slug)).json() == {"data": [], "next_cursor": None}


@pytest.mark.django_db
def test_revoked_token_can_not_register_again(admin_api, org):
    issued = org_services.create_agent_token(organization=org)
    assert admin_api.delete(tokens_url(org.slug, f"/{issued.token.id}")).status_code == 204

    assert_error(register(issued.raw), 401, "unauthorized")
    assert not Agent.objects.exists()


@pytest.mark.django_db
def test_revoke_twice_is_a_204_no_op_keeping_the_first_time(admin_api, org):
    issued = org_services.create_agent_token(organization=org)
    assert admin_api.delete(tokens_url(org.slug, f"/{issued.token.id}")).status_code == 204
    issued.token.refresh_from_db()
    first = issued.token.revoked_at

    assert admin_api.delete(tokens_url(org.slug, f"/{issued.token.id}")).status_code == 204

    issued.token.refresh_from_db()
    assert issued.token.revoked_at == first


@pytest.mark.django_db
def test_revoking_one_token_leaves_the_others_agents_working(admin_api, org, pipeline):
    keep = org_services.create_agent_token(organization=org)
    drop = org_services.create_agent_token(organization=org)
    session = register(keep.raw).json()["session_token"]

    assert admin_api.delete(tokens_url(org.slug, f"/{drop.token.id}")).status_code == 204

    assert bearer(session).post("/api/v0/agent/claim").status_code == 204


@pytest.mark.django_db
def test_member_may_not_revoke(member_api, org):
    issued = org_services.create_agent_token(organization=org)
    assert_error(member_api.delete(tokens_url(org.slug, f"/{issued.token.id}")), 403, "insufficient_org_role")
    issued.token.refresh_from_db()
    assert issued.token.revoked_at is None


@pytest.mark.django_db
def test_revoke_of_another_orgs_token_is_404(api, org, other_org):
    theirs = org_services.create_agent_token(organization=other_org)
    # Through their organization's URL (not a member) and through ours (not our token).
    assert_error(api.delete(tokens_url(other_org.slug, f"/{theirs.token.id}")), 404, "organization_not_found")
    assert_error(api.delete(tokens_url(org.slug, f"/{theirs.token.id}")), 404, "agent_token_not_found")
    theirs.token.refresh_from_db()
    assert theirs.token.revoked_at is None


@pytest.mark.django_db
@pytest.mark.parametrize("token_id", ["not-a-uuid", "12345", "00000000-0000-0000-0000-000000000000",
                                      "%E2%82%AC", "a" * 300])
def test_revoke_of_malformed_or_unknown_id_is_404(api, org, token_id):
    org_services.create_agent_token(organization=org)
    assert_error(api.delete(tokens_url(org.slug, f"/{token_id}")), 404, "agent_token_not_found")
    assert not AgentToken.objects.filter(revoked_at__isnull=False).exists()


# ===================================================================== management command


@pytest.mark.django_db
def test_createagenttoken_prints_only_a_working_token(org):
    out = StringIO()

    call_command("createagenttoken", "--org", org.slug, "--description", "rack 4", stdout=out)

    printed = out.getvalue()
    raw = printed.strip()
    assert printed == raw + "\n"
    assert RAW_AGENT_TOKEN.fullmatch(raw)
    stored = AgentToken.objects.get()
    assert (stored.organization, stored.description) == (org, "rack 4")
    assert stored.token_hash == hashlib.sha256(raw.encode()).hexdigest()
    assert register(raw).status_code == 201


@pytest.mark.django_db
def test_createagenttoken_for_unknown_org_fails_and_creates_nothing():
    with pytest.raises(CommandError, match="nope"):
        call_command("createagenttoken", "--org", "nope", stdout=StringIO())
    assert not AgentToken.objects.exists()


# ===================================================================== admin site


@pytest.fixture
def staff(make_user) -> Client:
    client = Client()
    client.force_login(make_user("root@example.com", is_staff=True))
    return client


@pytest.mark.django_db
def test_admin_changelist_lists_tokens_without_hashes(staff, org):
    issued = org_services.create_agent_token(organization=org, description="shown in admin")

    response = staff.get("/admin/organizations/agenttoken/")

    assert response.status_code == 200
    page = response.content.decode()
    assert "shown in admin" in page
    assert issued.token.token_hash not in page
    assert issued.raw not in page


@pytest.mark.django_db
def test_admin_add_creates_a_token_and_shows_the_raw_value_once(staff, org):
    assert staff.get("/admin/organizations/agenttoken/add/").status_code == 200

    response = staff.post("/admin/organizations/agenttoken/add/", {"organization": org.pk, "description": "from admin"},
                          follow=True)

    assert response.redirect_chain == [("/admin/organizations/agenttoken/", 302)], response.content.decode()[:2000]
    stored = AgentToken.objects.get()
    assert (stored.organization, stored.description, stored.created_by.email) == (org, "from admin",
                                                                                 "root@example.com")
    shown = [str(message) for message in response.context["messages"]]
    raws = [match for message in shown for match in RAW_AGENT_TOKEN.findall(message)]
    assert len(raws) == 1, shown
    assert raws[0] in response.content.decode()
    assert stored.token_hash == hashlib.sha256(raws[0].encode()).hexdigest()
    assert register(raws[0]).status_code == 201
    # Shown once: the next pages never show it (nor the hash).
    for url in ("/admin/organizations/agenttoken/", f"/admin/organizations/agenttoken/{stored.pk}/change/"):
        page = staff.get(url).content.decode()
        assert raws[0] not in page and stored.token_hash not in page


@pytest.mark.django_db
def test_admin_revoke_action_stops_the_tokens_agents(staff, org):
    issued = org_services.create_agent_token(organization=org)
    session = register(issued.raw).json()["session_token"]

    response = staff.post("/admin/organizations/agenttoken/",
                          {"action": "revoke_selected", "_selected_action": [str(issued.token.pk)]})

    assert response.status_code == 302
    issued.token.refresh_from_db()
    assert issued.token.revoked_at is not None
    assert_error(bearer(session).post("/api/v0/agent/claim"), 401, "unauthorized")


@pytest.mark.django_db
def test_admin_is_closed_to_non_staff(make_user, org):
    client = Client()
    client.force_login(make_user("plain@example.com"))
    response = client.get("/admin/organizations/agenttoken/")
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]
