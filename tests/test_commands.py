"""Operator tooling: the createtoken / createorg management commands and the Django admin."""

from __future__ import annotations

import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from organizations import services
from organizations.models import ApiToken, Membership, Organization, Role, TokenKind, User
from tests.helpers import bearer

BASE_DIR = Path(__file__).resolve().parent.parent


def run(command: str, *args: str) -> str:
    out, err = StringIO(), StringIO()
    call_command(command, *args, stdout=out, stderr=err)
    assert err.getvalue() == ""
    return out.getvalue()


# ---------------------------------------------------------------- createtoken

def test_createtoken_creates_the_user_and_prints_only_a_working_token(db):
    out = run("createtoken", "--email", "ci@example.com")
    token = out.strip()
    assert out == token + "\n"
    assert token.startswith("hm_") and len(token) == 46
    body = bearer(token).get("/api/v0/user").json()
    assert body["email"] == "ci@example.com"
    assert body["personal_org_slug"] == "ci"
    issued = ApiToken.objects.get(user__email="ci@example.com")
    assert issued.kind == TokenKind.PERSONAL and issued.description == "created by manage.py createtoken"


def test_createtoken_for_an_existing_user_adds_them_to_the_org_as_member(org, member, make_user):
    user = make_user("bot@example.com")
    token = run("createtoken", "--email", "BOT@example.com", "--org", org.slug, "--description", "deploy bot").strip()
    assert User.objects.filter(email__iexact="bot@example.com").count() == 1
    assert Membership.objects.get(organization=org, user=user).role == Role.MEMBER
    assert ApiToken.objects.get(user=user).description == "deploy bot"
    assert bearer(token).get(f"/api/v0/organizations/{org.slug}").status_code == 200


def test_createtoken_with_role_updates_an_existing_membership(org, member):
    run("createtoken", "--email", "member@example.com", "--org", org.slug, "--role", "admin")
    assert Membership.objects.get(organization=org, user=member).role == Role.ADMIN


def test_createtoken_without_role_keeps_an_owners_role(org, owner):
    run("createtoken", "--email", "owner@example.com", "--org", org.slug)
    assert Membership.objects.get(organization=org, user=owner).role == Role.OWNER


def test_createtoken_cannot_demote_the_last_owner(org, owner):
    before = ApiToken.objects.count()
    with pytest.raises(CommandError, match="last owner"):
        run("createtoken", "--email", "owner@example.com", "--org", org.slug, "--role", "member")
    assert Membership.objects.get(organization=org, user=owner).role == Role.OWNER
    assert ApiToken.objects.count() == before


def test_createtoken_for_an_unknown_org_fails_and_creates_nothing(db):
    with pytest.raises(CommandError, match="no-such-org"):
        run("createtoken", "--email", "new@example.com", "--org", "no-such-org")
    assert not User.objects.exists() and not ApiToken.objects.exists()


@pytest.mark.parametrize("args", [["--email", "not-an-email"], ["--email", "a@example.com", "--role", "admin"]])
def test_createtoken_with_bad_arguments_fails_and_creates_nothing(db, args):
    with pytest.raises(CommandError):
        run("createtoken", *args)
    assert not User.objects.exists()


def test_command_errors_go_to_stderr_with_a_non_zero_exit():
    # A real process: what scripts see. Fails before touching any database.
    env = os.environ | {"DATABASE_URL": ""}
    result = subprocess.run([sys.executable, "manage.py", "createtoken", "--email", "not-an-email"], cwd=BASE_DIR,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stdout == ""
    assert "not a valid email" in result.stderr


# ---------------------------------------------------------------- createorg

def test_createorg_prints_only_the_slug_and_creates_the_owner(db):
    out = run("createorg", "--name", "Acme Corp", "--owner", "boss@example.com")
    assert out == "acme-corp\n"
    org = Organization.objects.get(slug="acme-corp")
    boss = User.objects.get(email="boss@example.com")
    assert Membership.objects.get(organization=org).user == boss
    assert Membership.objects.get(organization=org).role == Role.OWNER
    assert Organization.objects.filter(personal_for=boss).exists()


def test_createorg_again_with_the_same_name_gets_suffix_2(owner):
    assert run("createorg", "--name", "Twice", "--owner", "owner@example.com") == "twice\n"
    assert run("createorg", "--name", "Twice", "--owner", "owner@example.com") == "twice-2\n"
    assert Organization.objects.filter(slug__startswith="twice").count() == 2
    assert User.objects.filter(email="owner@example.com").count() == 1


@pytest.mark.parametrize("args", [["--name", "  ", "--owner", "a@example.com"],
                                  ["--name", "x" * 256, "--owner", "a@example.com"],
                                  ["--name", "!!!", "--owner", "a@example.com"],
                                  ["--name", "Fine", "--owner", "nope"]])
def test_createorg_with_bad_arguments_fails_and_creates_nothing(db, args):
    with pytest.raises(CommandError):
        run("createorg", *args)
    assert not Organization.objects.exists() and not User.objects.exists()


# ---------------------------------------------------------------- admin

@pytest.fixture
def staff_client(db) -> Client:
    staff = services.create_user(email="ops@example.com", password="ops-password-long", is_staff=True)
    client = Client()
    client.force_login(staff)
    return client


@pytest.mark.parametrize("model", ["user", "organization", "membership", "apitoken", "invite", "clilogingrant"])
def test_admin_changelists_render(staff_client, org, owner, model):
    services.create_invite(organization=org, invited_by=owner, email="x@example.com", role=Role.MEMBER)
    services.park_cli_transfer(user=owner, nonce="some-nonce-value-123")
    response = staff_client.get(f"/admin/organizations/{model}/")
    assert response.status_code == 200


def test_admin_pages_never_show_secret_hashes(staff_client, org, owner):
    token = services.create_personal_token(user=owner, description="seen").token
    issued = services.create_invite(organization=org, invited_by=owner, email="x@example.com", role=Role.MEMBER)
    grant = services.park_cli_transfer(user=owner, nonce="some-nonce-value-123")
    pages = [f"/admin/organizations/apitoken/{token.pk}/change/",
             f"/admin/organizations/invite/{issued.invite.pk}/change/",
             f"/admin/organizations/clilogingrant/{grant.pk}/change/", "/admin/organizations/apitoken/"]
    for page in pages:
        response = staff_client.get(page)
        assert response.status_code == 200, page
        text = response.content.decode()
        assert token.token_hash not in text and issued.invite.token_hash not in text and grant.secret_hash not in text


def test_admin_revoke_action_revokes_selected_tokens(staff_client, owner, stranger):
    mine = services.create_personal_token(user=owner, description="a").token
    theirs = services.create_personal_token(user=stranger, description="b").token
    response = staff_client.post("/admin/organizations/apitoken/",
                                 {"action": "revoke_selected", "_selected_action": [str(mine.pk)]})
    assert response.status_code == 302
    mine.refresh_from_db()
    theirs.refresh_from_db()
    assert mine.revoked_at is not None and theirs.revoked_at is None


def test_admin_cannot_add_tokens_invites_or_orgs(staff_client):
    for model in ("apitoken", "invite", "organization", "clilogingrant"):
        assert staff_client.get(f"/admin/organizations/{model}/add/").status_code == 403, model


def test_admin_added_user_gets_a_personal_org(staff_client):
    response = staff_client.post("/admin/organizations/user/add/", {
        "email": "Added@Example.com", "name": "Ann Added", "usable_password": "true",
        "password1": "a-long-password-1", "password2": "a-long-password-1",
    })
    assert response.status_code == 302, response.content[:2000]
    user = User.objects.get(email="added@example.com")
    assert user.name == "Ann Added" and user.check_password("a-long-password-1")
    assert Organization.objects.get(personal_for=user).slug == "ann-added"
    assert staff_client.get(f"/admin/organizations/user/{user.pk}/change/").status_code == 200


def test_admin_rename_keeps_the_slug_and_refuses_a_name_without_one(staff_client, org):
    page = f"/admin/organizations/organization/{org.pk}/change/"
    response = staff_client.post(page, {"name": "!!!", "url": ""})
    assert response.status_code == 200 and "Must contain a letter a-z or a digit 0-9" in response.content.decode()
    org.refresh_from_db()
    assert (org.slug, org.name) == ("acme-corp", "Acme Corp")
    assert staff_client.post(page, {"name": "Acme Renamed", "url": ""}).status_code == 302
    org.refresh_from_db()
    assert (org.slug, org.name) == ("acme-corp", "Acme Renamed")


def test_admin_refuses_a_user_name_with_a_control_character(staff_client, owner):
    response = staff_client.post(f"/admin/organizations/user/{owner.pk}/change/", {
        "email": owner.email, "name": "Olive\nOwner", "is_active": "on"})
    assert response.status_code == 200 and "Must not contain control characters" in response.content.decode()
    owner.refresh_from_db()
    assert owner.name == "Olive Owner"
    response = staff_client.post("/admin/organizations/user/add/", {
        "email": "added@example.com", "name": "Ann\x07Added", "usable_password": "false"})
    assert response.status_code == 200 and "Must not contain control characters" in response.content.decode()
    assert not User.objects.filter(email="added@example.com").exists()


def test_admin_is_staff_only(client, owner):
    client.force_login(owner)
    response = client.get("/admin/organizations/apitoken/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
