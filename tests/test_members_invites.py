"""Organization members (list, role changes, removal) and invites (list, create, revoke, accept)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.utils import timezone

from harmont.errors import ApiError
from organizations import services
from organizations.models import Invite, Membership, Organization, Role, User
from tests.helpers import assert_error, is_postgres, iso, make_api, race


def member_body(user: User, role: str) -> dict:
    return {"user_uuid": str(user.uuid), "email": user.email, "name": user.name or None, "role": role}


def role_of(org: Organization, user: User) -> str | None:
    return Membership.objects.filter(organization=org, user=user).values_list("role", flat=True).first()


def members_url(org: Organization, user: User | str | None = None) -> str:
    base = f"/api/v0/organizations/{org.slug}/members"
    if user is None:
        return base
    return f"{base}/{user.uuid if isinstance(user, User) else user}"


def invites_url(org: Organization, invite_id: Any = None) -> str:
    base = f"/api/v0/organizations/{org.slug}/invites"
    return base if invite_id is None else f"{base}/{invite_id}"


def run_concurrently(n: int, fn: Callable[[int], Any]) -> list[tuple[str, Any]]:
    """Run fn(0..n-1) in n threads released together; each returns ("ok", value) or ("error", code)."""
    def attempt(i: int) -> tuple[str, Any]:
        try:
            return "ok", fn(i)
        except ApiError as exc:
            return "error", exc.code

    return race(n, attempt)


# ================================================================ members: list

def test_list_members_in_join_order(org, owner, admin_user, member, member_api):
    response = member_api.get(members_url(org))
    assert response.status_code == 200
    assert response.json() == {"data": [
        member_body(owner, "owner"), member_body(admin_user, "admin"), member_body(member, "member"),
    ], "next_cursor": None}


def test_list_members_of_another_org_is_404(api, other_org):
    assert_error(api.get(members_url(other_org)), 404, "organization_not_found")


def test_list_members_query_count_is_independent_of_member_count(api, owner, org, django_assert_num_queries):
    api.get("/api/v0/user")  # a fresh token's first use also writes last_used_at
    with django_assert_num_queries(3):  # token, membership+org, members+users
        assert len(api.get(members_url(org)).json()["data"]) == 1
    users = User.objects.bulk_create(User(email=f"u{i}@example.com", uuid=uuid.uuid4()) for i in range(30))
    Membership.objects.bulk_create(Membership(organization=org, user=u) for u in users)
    with django_assert_num_queries(3):
        assert len(api.get(members_url(org)).json()["data"]) == 31


# ================================================================ members: change role

def test_owner_promotes_member_to_admin(api, org, member):
    response = api.patch(members_url(org, member), {"role": "admin"}, format="json")
    assert response.status_code == 200
    assert response.json() == member_body(member, "admin")
    assert role_of(org, member) == Role.ADMIN


def test_owner_makes_member_owner(api, org, member):
    assert api.patch(members_url(org, member), {"role": "owner"}, format="json").json()["role"] == "owner"
    assert role_of(org, member) == Role.OWNER


def test_admin_promotes_member_to_admin(admin_api, org, member):
    assert admin_api.patch(members_url(org, member), {"role": "admin"}, format="json").status_code == 200
    assert role_of(org, member) == Role.ADMIN


def test_admin_cannot_make_anyone_owner_is_403(admin_api, org, member, admin_user):
    assert_error(admin_api.patch(members_url(org, member), {"role": "owner"}, format="json"), 403,
                 "insufficient_org_role")
    assert_error(admin_api.patch(members_url(org, admin_user), {"role": "owner"}, format="json"), 403,
                 "insufficient_org_role")
    assert role_of(org, member) == Role.MEMBER and role_of(org, admin_user) == Role.ADMIN


def test_admin_cannot_demote_owner_is_403(admin_api, org, owner):
    assert_error(admin_api.patch(members_url(org, owner), {"role": "member"}, format="json"), 403,
                 "insufficient_org_role")
    assert role_of(org, owner) == Role.OWNER


def test_member_cannot_change_roles_is_403(member_api, org, member, admin_user):
    assert_error(member_api.patch(members_url(org, admin_user), {"role": "member"}, format="json"), 403,
                 "insufficient_org_role")
    assert_error(member_api.patch(members_url(org, member), {"role": "admin"}, format="json"), 403,
                 "insufficient_org_role")
    assert role_of(org, admin_user) == Role.ADMIN and role_of(org, member) == Role.MEMBER


def test_demoting_the_last_owner_is_409(api, org, owner):
    assert_error(api.patch(members_url(org, owner), {"role": "admin"}, format="json"), 409, "last_owner")
    assert role_of(org, owner) == Role.OWNER


def test_owner_demotes_another_owner(api, org, owner, admin_user):
    Membership.objects.filter(organization=org, user=admin_user).update(role=Role.OWNER)
    assert api.patch(members_url(org, admin_user), {"role": "member"}, format="json").json()["role"] == "member"
    assert role_of(org, admin_user) == Role.MEMBER
    # ...after which the remaining owner is the last one.
    assert_error(api.patch(members_url(org, owner), {"role": "member"}, format="json"), 409, "last_owner")


def test_setting_the_same_role_is_a_no_op_200(api, org, member):
    assert api.patch(members_url(org, member), {"role": "member"}, format="json").json() == member_body(member,
                                                                                                      "member")


@pytest.mark.parametrize("body", [{"role": "superuser"}, {"role": ""}, {}, {"role": None}, {"role": ["admin"]}])
def test_unknown_role_is_422_invalid_role_with_fields(api, org, member, body):
    error = assert_error(api.patch(members_url(org, member), body, format="json"), 422, "invalid_role")
    assert error["type"] == "validation_failed"
    assert set(error["fields"]) == {"role"} and error["fields"]["role"]
    assert role_of(org, member) == Role.MEMBER


def test_change_role_to_an_unknown_role_is_422_invalid_role_and_changes_nothing(api, org, member):
    error = assert_error(api.patch(members_url(org, member), {"role": "superuser"}, format="json"), 422,
                         "invalid_role")
    assert error["type"] == "validation_failed"
    assert error["fields"] == {"role": ['"superuser" is not a valid choice.']}
    assert role_of(org, member) == Role.MEMBER


def test_change_role_service_refuses_an_unknown_role_with_invalid_role(org, owner, member):
    with pytest.raises(ApiError) as caught:
        services.change_member_role(organization=org, actor=owner, user=member, role="superuser")
    assert (caught.value.code, caught.value.fields) == ("invalid_role",
                                                        {"role": ["must be one of owner, admin, member"]})
    assert role_of(org, member) == Role.MEMBER


@pytest.mark.parametrize("user_id", ["not-a-uuid", str(uuid.uuid4()), "0"])
def test_change_role_of_malformed_or_unknown_member_is_404(api, org, user_id):
    assert_error(api.patch(members_url(org, user_id), {"role": "admin"}, format="json"), 404, "member_not_found")


def test_change_role_of_someone_outside_the_org_is_404(api, org, stranger):
    assert_error(api.patch(members_url(org, stranger), {"role": "admin"}, format="json"), 404, "member_not_found")
    assert role_of(org, stranger) is None


def test_change_role_in_another_org_is_404(api, other_org, stranger):
    assert_error(api.patch(members_url(other_org, stranger), {"role": "member"}, format="json"), 404,
                 "organization_not_found")
    assert role_of(other_org, stranger) == Role.OWNER


def test_personal_org_owner_cannot_be_demoted_even_with_a_co_owner(owner, member):
    personal = Organization.objects.get(personal_for=owner)
    Membership.objects.create(organization=personal, user=member, role=Role.OWNER)
    assert_error(make_api(member).patch(members_url(personal, owner), {"role": "admin"}, format="json"), 409,
                 "personal_org_owner")
    assert role_of(personal, owner) == Role.OWNER


# ================================================================ members: remove

def test_owner_removes_member(api, org, member):
    response = api.delete(members_url(org, member))
    assert response.status_code == 204 and response.content == b""
    assert role_of(org, member) is None
    assert_error(make_api(member).get(f"/api/v0/organizations/{org.slug}"), 404, "organization_not_found")


def test_admin_removes_member_and_admin(admin_api, org, member, make_user):
    other_admin = make_user("admin2@example.com")
    Membership.objects.create(organization=org, user=other_admin, role=Role.ADMIN)
    assert admin_api.delete(members_url(org, member)).status_code == 204
    assert admin_api.delete(members_url(org, other_admin)).status_code == 204
    assert role_of(org, member) is None and role_of(org, other_admin) is None


def test_admin_cannot_remove_owner_is_403(admin_api, org, owner):
    assert_error(admin_api.delete(members_url(org, owner)), 403, "insufficient_org_role")
    assert role_of(org, owner) == Role.OWNER


def test_member_cannot_remove_others_is_403(member_api, org, admin_user):
    assert_error(member_api.delete(members_url(org, admin_user)), 403, "insufficient_org_role")
    assert role_of(org, admin_user) == Role.ADMIN


def test_member_may_leave(member_api, org, member):
    assert member_api.delete(members_url(org, member)).status_code == 204
    assert role_of(org, member) is None


def test_last_owner_cannot_leave_is_409(api, org, owner, member):
    assert_error(api.delete(members_url(org, owner)), 409, "last_owner")
    assert role_of(org, owner) == Role.OWNER


def test_owner_may_leave_when_another_owner_stays(api, org, owner, admin_user):
    Membership.objects.filter(organization=org, user=admin_user).update(role=Role.OWNER)
    assert api.delete(members_url(org, owner)).status_code == 204
    assert list(Membership.objects.filter(organization=org).values_list("role", flat=True)) == [Role.OWNER]


def test_owner_removes_another_owner(api, org, admin_user):
    Membership.objects.filter(organization=org, user=admin_user).update(role=Role.OWNER)
    assert api.delete(members_url(org, admin_user)).status_code == 204
    assert role_of(org, admin_user) is None


def test_personal_org_owner_cannot_leave_it(owner, member):
    personal = Organization.objects.get(personal_for=owner)
    Membership.objects.create(organization=personal, user=member, role=Role.OWNER)
    assert_error(make_api(owner).delete(members_url(personal, owner)), 409, "personal_org_owner")
    assert_error(make_api(member).delete(members_url(personal, owner)), 409, "personal_org_owner")
    assert role_of(personal, owner) == Role.OWNER


@pytest.mark.parametrize("user_id", ["not-a-uuid", str(uuid.uuid4())])
def test_remove_malformed_or_unknown_member_is_404(api, org, user_id):
    assert_error(api.delete(members_url(org, user_id)), 404, "member_not_found")


def test_remove_member_of_another_org_is_404(api, other_org, stranger):
    assert_error(api.delete(members_url(other_org, stranger)), 404, "organization_not_found")
    assert role_of(other_org, stranger) == Role.OWNER


def test_concurrent_demotions_of_the_last_two_owners_cannot_both_pass(transactional_db):
    if not is_postgres():
        pytest.skip("row locks need PostgreSQL; SQLite serializes writers anyway")
    first = services.create_user(email="first@example.com")
    second = services.create_user(email="second@example.com")
    org = services.create_organization(name="Race", owner=first)
    Membership.objects.create(organization=org, user=second, role=Role.OWNER)
    pairs = [(first, second), (second, first)]  # each owner demotes the other

    results = run_concurrently(2, lambda i: services.change_member_role(
        organization=org, actor=pairs[i][0], user=pairs[i][1], role=Role.MEMBER))
    assert sorted(kind for kind, _ in results) == ["error", "ok"]
    assert [value for kind, value in results if kind == "error"] in (["last_owner"], ["insufficient_org_role"])
    assert Membership.objects.filter(organization=org, role=Role.OWNER).count() == 1


# ================================================================ invites: create

def test_admin_creates_invite_with_token_shown_once(admin_api, org, admin_user):
    before = timezone.now()
    response = admin_api.post(invites_url(org), {"email": "New.Person@Example.com", "role": "admin"}, format="json")
    assert response.status_code == 201
    body = response.json()
    invite = Invite.objects.get()
    assert body == {"id": str(invite.id), "email": "new.person@example.com", "role": "admin",
                    "expires_at": iso(invite.expires_at), "token": body["token"]}
    assert len(body["token"]) == 43
    assert invite.token_hash == services.hash_secret(body["token"])
    assert invite.invited_by == admin_user and invite.organization == org
    assert before + timedelta(days=7) <= invite.expires_at <= timezone.now() + timedelta(days=7)
    listed = admin_api.get(invites_url(org)).json()["data"]
    assert listed == [body | {"token": None}]


@pytest.mark.parametrize("body, code, fields", [
    ({"email": "a@example.com", "role": "owner"}, "invalid_role", {"role"}),
    ({"email": "a@example.com", "role": "wizard"}, "invalid_role", {"role"}),
    ({"email": "a@example.com"}, "invalid_role", {"role"}),
    ({"email": "not-an-email", "role": "admin"}, "validation_failed", {"email"}),
    ({"role": "member"}, "validation_failed", {"email"}),
    # A bad role decides the code, whatever else is wrong; `fields` still lists everything.
    ({"email": "not-an-email", "role": "owner"}, "invalid_role", {"email", "role"}),
])
def test_create_invite_with_bad_fields_is_422_and_creates_nothing(api, org, body, code, fields):
    error = assert_error(api.post(invites_url(org), body, format="json"), 422, code)
    assert error["type"] == "validation_failed"
    assert set(error["fields"]) == fields
    assert not Invite.objects.exists()


def test_invite_as_owner_is_422_invalid_role_and_creates_nothing(api, org):
    error = assert_error(api.post(invites_url(org), {"email": "a@example.com", "role": "owner"}, format="json"),
                         422, "invalid_role")
    assert error["type"] == "validation_failed"
    assert error["fields"] == {"role": ['"owner" is not a valid choice.']}
    assert not Invite.objects.exists()


def test_invite_service_refuses_owner_role(org, owner):
    with pytest.raises(ApiError) as caught:
        services.create_invite(organization=org, invited_by=owner, email="x@example.com", role=Role.OWNER)
    assert caught.value.code == "invalid_role" and list(caught.value.fields) == ["role"]
    assert not Invite.objects.exists()


def test_inviting_a_member_is_409(api, org, member):
    assert_error(api.post(invites_url(org), {"email": "MEMBER@example.com", "role": "admin"}, format="json"), 409,
                 "already_member")
    assert not Invite.objects.exists()


def test_reinviting_revokes_the_open_invite_and_issues_a_new_one(api, org, make_user):
    first = api.post(invites_url(org), {"email": "x@example.com", "role": "member"}, format="json").json()
    second = api.post(invites_url(org), {"email": "X@example.com", "role": "admin"}, format="json").json()
    assert first["id"] != second["id"] and first["token"] != second["token"]
    assert Invite.objects.get(pk=first["id"]).revoked_at is not None
    assert [i["id"] for i in api.get(invites_url(org)).json()["data"]] == [second["id"]]
    invitee = make_api(make_user("x@example.com"))
    assert_error(invitee.post("/api/v0/invites/accept", {"token": first["token"]}, format="json"), 422,
                 "invite_unacceptable")
    assert invitee.post("/api/v0/invites/accept", {"token": second["token"]}, format="json").status_code == 200


def test_reinviting_after_an_unrevoked_invite_expired_works(api, org, owner):
    old = services.create_invite(organization=org, invited_by=owner, email="late@example.com", role=Role.MEMBER,
                                 now=timezone.now() - timedelta(days=8))
    response = api.post(invites_url(org), {"email": "late@example.com", "role": "member"}, format="json")
    assert response.status_code == 201
    old.invite.refresh_from_db()
    assert old.invite.revoked_at is not None


def test_member_cannot_invite_is_403(member_api, org):
    assert_error(member_api.post(invites_url(org), {"email": "x@example.com", "role": "member"}, format="json"),
                 403, "insufficient_org_role")
    assert not Invite.objects.exists()


def test_invite_into_another_org_is_404(api, other_org):
    assert_error(api.post(invites_url(other_org), {"email": "x@example.com", "role": "member"}, format="json"), 404,
                 "organization_not_found")
    assert not Invite.objects.exists()


# ================================================================ invites: list

def test_list_invites_shows_only_open_ones_oldest_first_without_tokens(admin_api, org, owner, make_user):
    now = timezone.now()
    first = services.create_invite(organization=org, invited_by=owner, email="a@example.com", role=Role.MEMBER,
                                   now=now - timedelta(hours=2)).invite
    second = services.create_invite(organization=org, invited_by=owner, email="b@example.com", role=Role.ADMIN,
                                    now=now - timedelta(hours=1)).invite
    services.create_invite(organization=org, invited_by=owner, email="expired@example.com", role=Role.MEMBER,
                           now=now - timedelta(days=8))
    revoked = services.create_invite(organization=org, invited_by=owner, email="r@example.com", role=Role.MEMBER)
    services.revoke_invite(organization=org, invite_id=revoked.invite.id)
    accepted = services.create_invite(organization=org, invited_by=owner, email="acc@example.com", role=Role.MEMBER)
    services.accept_invite(user=make_user("acc@example.com"), token=accepted.raw)

    response = admin_api.get(invites_url(org))
    assert response.status_code == 200
    assert response.json() == {"data": [
        {"id": str(first.id), "email": "a@example.com", "role": "member", "expires_at": iso(first.expires_at),
         "token": None},
        {"id": str(second.id), "email": "b@example.com", "role": "admin", "expires_at": iso(second.expires_at),
         "token": None},
    ], "next_cursor": None}


def test_member_cannot_list_invites_is_403(member_api, org):
    assert_error(member_api.get(invites_url(org)), 403, "insufficient_org_role")


def test_list_invites_of_another_org_is_404(api, other_org):
    assert_error(api.get(invites_url(other_org)), 404, "organization_not_found")


def test_list_invites_query_count_is_independent_of_invite_count(api, org, owner, django_assert_num_queries):
    api.get("/api/v0/user")
    services.create_invite(organization=org, invited_by=owner, email="one@example.com", role=Role.MEMBER)
    with django_assert_num_queries(3):  # token, membership+org, invites
        assert len(api.get(invites_url(org)).json()["data"]) == 1
    for i in range(20):
        services.create_invite(organization=org, invited_by=owner, email=f"i{i}@example.com", role=Role.MEMBER)
    with django_assert_num_queries(3):
        assert len(api.get(invites_url(org)).json()["data"]) == 21


# ================================================================ invites: revoke

def test_admin_revokes_invite(admin_api, org, owner):
    invite = services.create_invite(organization=org, invited_by=owner, email="x@example.com",
                                    role=Role.MEMBER).invite
    response = admin_api.delete(invites_url(org, invite.id))
    assert response.status_code == 204 and response.content == b""
    invite.refresh_from_db()
    assert invite.revoked_at is not None
    assert admin_api.get(invites_url(org)).json() == {"data": [], "next_cursor": None}


def test_revoking_twice_is_404(api, org, owner):
    invite = services.create_invite(organization=org, invited_by=owner, email="x@example.com",
                                    role=Role.MEMBER).invite
    assert api.delete(invites_url(org, invite.id)).status_code == 204
    assert_error(api.delete(invites_url(org, invite.id)), 404, "invite_not_found")


@pytest.mark.parametrize("invite_id", ["nope", str(uuid.uuid4()), "123"])
def test_revoke_malformed_or_unknown_invite_is_404(api, org, invite_id):
    assert_error(api.delete(invites_url(org, invite_id)), 404, "invite_not_found")


def test_revoke_another_orgs_invite_through_own_org_is_404(api, org, other_org, stranger):
    theirs = services.create_invite(organization=other_org, invited_by=stranger, email="x@example.com",
                                    role=Role.MEMBER).invite
    assert_error(api.delete(invites_url(org, theirs.id)), 404, "invite_not_found")
    assert_error(api.delete(invites_url(other_org, theirs.id)), 404, "organization_not_found")
    theirs.refresh_from_db()
    assert theirs.revoked_at is None


def test_revoke_accepted_invite_is_404(api, org, owner, make_user):
    issued = services.create_invite(organization=org, invited_by=owner, email="x@example.com", role=Role.MEMBER)
    services.accept_invite(user=make_user("x@example.com"), token=issued.raw)
    assert_error(api.delete(invites_url(org, issued.invite.id)), 404, "invite_not_found")
    issued.invite.refresh_from_db()
    assert issued.invite.revoked_at is None


def test_member_cannot_revoke_invite_is_403(member_api, org, owner):
    invite = services.create_invite(organization=org, invited_by=owner, email="x@example.com",
                                    role=Role.MEMBER).invite
    assert_error(member_api.delete(invites_url(org, invite.id)), 403, "insufficient_org_role")
    invite.refresh_from_db()
    assert invite.revoked_at is None


# ================================================================ invites: accept

@pytest.fixture
def invitee(make_user) -> User:
    return make_user("Invitee@Example.com", name="Ivy Invitee")


@pytest.fixture
def invitee_api(invitee):  # noqa: ANN201
    return make_api(invitee)


def invite(org: Organization, email: str = "INVITEE@example.com", role: str = Role.ADMIN,
           now: datetime | None = None) -> services.IssuedInvite:
    return services.create_invite(organization=org, invited_by=None, email=email, role=role, now=now)


def accept(client, token: Any):  # noqa: ANN001, ANN201
    return client.post("/api/v0/invites/accept", {"token": token}, format="json")


def test_accept_invite_joins_with_the_invited_role(invitee_api, invitee, org):
    issued = invite(org)
    response = accept(invitee_api, issued.raw)
    assert response.status_code == 200
    assert response.json() == {"slug": org.slug, "name": org.name, "url": org.url, "created_at": iso(org.created_at)}
    assert role_of(org, invitee) == Role.ADMIN
    issued.invite.refresh_from_db()
    assert issued.invite.accepted_at is not None and issued.invite.accepted_by == invitee
    assert invitee_api.get(f"/api/v0/organizations/{org.slug}").status_code == 200
    assert invitee_api.get(invites_url(org)).json() == {"data": [], "next_cursor": None}  # no longer open


def unacceptable(response: Any) -> dict[str, Any]:
    """The envelope of a refused accept: 422 `invite_unacceptable`, type `validation_failed`."""
    error = assert_error(response, 422, "invite_unacceptable")
    assert error["type"] == "validation_failed"
    return error


def test_accepting_twice_is_422_invite_unacceptable(invitee_api, invitee, org):
    issued = invite(org)
    assert accept(invitee_api, issued.raw).status_code == 200
    accepted_at = Invite.objects.get().accepted_at
    error = unacceptable(accept(invitee_api, issued.raw))
    assert "already been accepted" in error["message"] and "fields" not in error
    assert Invite.objects.get().accepted_at == accepted_at
    assert Membership.objects.filter(organization=org, user=invitee).count() == 1


def test_accept_invite_for_another_email_is_422_invite_unacceptable_and_changes_nothing(api, org, stranger):
    issued = invite(org)
    error = unacceptable(accept(make_api(stranger), issued.raw))
    assert "different email" in error["message"] and "fields" not in error
    assert role_of(org, stranger) is None
    issued.invite.refresh_from_db()
    assert issued.invite.accepted_at is None


def test_accept_expired_invite_is_422_invite_unacceptable(invitee_api, invitee, org):
    issued = invite(org, now=timezone.now() - timedelta(days=7, seconds=1))
    error = unacceptable(accept(invitee_api, issued.raw))
    assert "expired" in error["message"] and "fields" not in error
    assert role_of(org, invitee) is None
    issued.invite.refresh_from_db()
    assert issued.invite.accepted_at is None


def test_accept_revoked_invite_is_422_invite_unacceptable(invitee_api, invitee, org):
    issued = invite(org)
    services.revoke_invite(organization=org, invite_id=issued.invite.id)
    error = unacceptable(accept(invitee_api, issued.raw))
    assert "revoked" in error["message"] and "fields" not in error
    assert role_of(org, invitee) is None
    issued.invite.refresh_from_db()
    assert issued.invite.accepted_at is None


@pytest.mark.parametrize("token", ["no-such-token", "x" * 43])
def test_accept_unknown_token_is_422_invite_unacceptable(invitee_api, invitee, token):
    memberships = Membership.objects.count()
    error = unacceptable(accept(invitee_api, token))
    assert error["message"] == "No invite has this token." and "fields" not in error
    assert Membership.objects.count() == memberships


@pytest.mark.parametrize("body", [{}, {"token": ""}, {"token": None}, {"token": 7 * [1]}, {"token": "x" * 257}])
def test_accept_without_a_usable_token_is_422_invite_unacceptable_with_fields(invitee_api, invitee, org, body):
    issued = invite(org)
    error = unacceptable(invitee_api.post("/api/v0/invites/accept", body, format="json"))
    assert set(error["fields"]) == {"token"} and error["fields"]["token"]
    assert role_of(org, invitee) is None
    issued.invite.refresh_from_db()
    assert issued.invite.accepted_at is None


def test_accept_when_already_a_member_is_422_invite_unacceptable_and_changes_nothing(api, invitee_api, invitee,
                                                                                     org):
    issued = invite(org, role=Role.ADMIN)
    Membership.objects.create(organization=org, user=invitee, role=Role.MEMBER)  # joined some other way meanwhile
    error = unacceptable(accept(invitee_api, issued.raw))
    assert error["message"] == f"You are already a member of {org.slug!r}." and "fields" not in error
    assert role_of(org, invitee) == Role.MEMBER
    issued.invite.refresh_from_db()
    assert (issued.invite.accepted_at, issued.invite.accepted_by) == (None, None)
    # Still open: an admin may revoke it.
    assert [i["id"] for i in api.get(invites_url(org)).json()["data"]] == [str(issued.invite.id)]


def test_accept_needs_a_bearer_token(anon, org):
    issued = invite(org)
    assert_error(accept(anon, issued.raw), 401, "unauthorized")
    issued.invite.refresh_from_db()
    assert issued.invite.accepted_at is None


def test_racing_accepts_of_one_invite_succeed_once(transactional_db):
    if not is_postgres():
        pytest.skip("needs PostgreSQL's concurrent writers")
    owner = services.create_user(email="boss@example.com")
    org = services.create_organization(name="Race", owner=owner)
    invitee = services.create_user(email="racer@example.com")
    issued = services.create_invite(organization=org, invited_by=owner, email="racer@example.com", role=Role.ADMIN)
    results = run_concurrently(4, lambda i: services.accept_invite(user=invitee, token=issued.raw).slug)
    assert sorted(kind for kind, _ in results) == ["error", "error", "error", "ok"]
    assert {value for kind, value in results if kind == "error"} == {"invite_unacceptable"}
    assert Membership.objects.filter(organization=org, user=invitee).count() == 1
