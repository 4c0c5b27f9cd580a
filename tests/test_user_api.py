"""GET/PATCH/DELETE /user, personal API tokens, logout, and how dead tokens are refused."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from harmont.errors import ApiError
from organizations import services
from organizations.authentication import LAST_USED_RESOLUTION, record_token_use
from organizations.models import ApiToken, Membership, Organization, Role, TokenKind, User
from tests.helpers import assert_error, iso, make_api


def token_body(token: ApiToken) -> dict:
    token.refresh_from_db()
    return {"id": str(token.id), "description": token.description, "created_at": iso(token.created_at),
            "expires_at": iso(token.expires_at), "last_used_at": iso(token.last_used_at)}


# ---------------------------------------------------------------- GET /user

def test_get_user_returns_profile_with_personal_org_slug(api, owner):
    response = api.get("/api/v0/user")
    assert response.status_code == 200
    assert response.json() == {
        "uuid": str(owner.uuid), "id": str(owner.uuid), "email": "owner@example.com", "name": "Olive Owner",
        "personal_org_slug": "olive-owner",
    }
    assert Organization.objects.get(personal_for=owner).slug == "olive-owner"


def test_get_user_without_name_has_null_name_and_email_based_personal_org(make_user):
    user = make_user("nameless@example.com")
    body = make_api(user).get("/api/v0/user").json()
    assert body["name"] is None
    assert body["personal_org_slug"] == "nameless"


def test_get_user_without_token_is_401(anon, db):
    assert_error(anon.get("/api/v0/user"), 401, "unauthorized")


# ---------------------------------------------------------------- PATCH /user

def test_patch_user_changes_name(api, owner):
    response = api.patch("/api/v0/user", {"name": "Olivia O."}, format="json")
    assert response.status_code == 200
    assert response.json() == {
        "uuid": str(owner.uuid), "id": str(owner.uuid), "email": "owner@example.com", "name": "Olivia O.",
        "personal_org_slug": "olive-owner",
    }
    owner.refresh_from_db()
    assert owner.name == "Olivia O."


@pytest.mark.parametrize("body", [{"name": ""}, {"name": "   "}, {"name": "x" * 256}, {}, {"name": None},
                                  {"name": ["Olivia"]}, {"name": "Olivia\nO."}, {"name": "Olivia\x1b[31m"}])
def test_patch_user_with_bad_name_is_422_user_name_invalid_and_keeps_name(api, owner, body):
    error = assert_error(api.patch("/api/v0/user", body, format="json"), 422, "user_name_invalid")
    assert error["type"] == "validation_failed"
    assert set(error["fields"]) == {"name"} and error["fields"]["name"]
    owner.refresh_from_db()
    assert owner.name == "Olive Owner"


def test_patch_user_with_a_control_character_is_422_user_name_invalid(api, owner):
    error = assert_error(api.patch("/api/v0/user", {"name": "Olive\tOwner"}, format="json"), 422,
                         "user_name_invalid")
    assert error["type"] == "validation_failed"
    assert error["fields"] == {"name": ["Must not contain control characters such as a newline or a tab."]}
    owner.refresh_from_db()
    assert owner.name == "Olive Owner"


def test_patch_user_trims_the_name(api, owner):
    assert api.patch("/api/v0/user", {"name": "  Olivia  "}, format="json").json()["name"] == "Olivia"
    owner.refresh_from_db()
    assert owner.name == "Olivia"


@pytest.mark.parametrize("name", ["   ", "x" * 256, "a\nb"])
def test_user_name_services_refuse_a_bad_name_with_user_name_invalid(owner, name):
    with pytest.raises(ApiError) as caught:
        services.update_user(user=owner, name=name)
    assert (caught.value.code, list(caught.value.fields)) == ("user_name_invalid", ["name"])
    with pytest.raises(ApiError) as caught:
        services.create_user(email="new@example.com", name=name)
    assert (caught.value.code, list(caught.value.fields)) == ("user_name_invalid", ["name"])
    owner.refresh_from_db()
    assert owner.name == "Olive Owner"
    assert not User.objects.filter(email="new@example.com").exists()


def test_patch_user_accepts_255_characters(api, owner):
    assert api.patch("/api/v0/user", {"name": "x" * 255}, format="json").status_code == 200
    owner.refresh_from_db()
    assert owner.name == "x" * 255


# ---------------------------------------------------------------- DELETE /user

def test_delete_user_removes_user_tokens_and_personal_org(make_user):
    user = make_user("leaver@example.com", name="Lee Leaver")
    client = make_api(user)
    personal = Organization.objects.get(personal_for=user)
    response = client.delete("/api/v0/user")
    assert response.status_code == 204
    assert response.content == b""
    assert not User.objects.filter(pk=user.pk).exists()
    assert not ApiToken.objects.filter(user_id=user.pk).exists()
    assert not Organization.objects.filter(pk=personal.pk).exists()
    assert_error(client.get("/api/v0/user"), 401, "unauthorized")


def test_delete_user_who_is_last_owner_of_org_with_members_is_409_and_changes_nothing(api, owner, org, member):
    error = assert_error(api.delete("/api/v0/user"), 409, "last_owner")
    assert org.slug in error["message"]
    assert User.objects.filter(pk=owner.pk).exists()
    assert Organization.objects.filter(pk=org.pk).exists()
    assert Organization.objects.filter(personal_for=owner).exists()
    assert ApiToken.objects.filter(user=owner, revoked_at__isnull=True).count() == 1
    assert api.get("/api/v0/user").status_code == 200


def test_delete_user_with_a_co_owner_leaves_the_org_to_them(api, owner, org, admin_user):
    Membership.objects.filter(organization=org, user=admin_user).update(role=Role.OWNER)
    assert api.delete("/api/v0/user").status_code == 204
    assert list(Membership.objects.filter(organization=org).values_list("user__email", "role")) == [
        ("admin@example.com", Role.OWNER)]


def test_delete_user_deletes_orgs_they_own_alone(api, owner, org):
    # Nobody else could ever reach an organization whose only member is gone.
    assert api.delete("/api/v0/user").status_code == 204
    assert not Organization.objects.filter(pk=org.pk).exists()


def test_delete_user_who_is_plain_member_elsewhere_keeps_that_org(member_api, member, org, owner):
    assert member_api.delete("/api/v0/user").status_code == 204
    assert Organization.objects.filter(pk=org.pk).exists()
    assert list(Membership.objects.filter(organization=org).values_list("user__email", flat=True)) == [
        "owner@example.com"]


# ---------------------------------------------------------------- API tokens

def test_list_api_tokens_shows_personal_unrevoked_tokens_newest_first_without_secrets(api, owner):
    now = timezone.now()
    older = services.create_personal_token(user=owner, description="older", now=now - timedelta(days=2)).token
    newer = services.create_personal_token(user=owner, description="newer", expires_at=now + timedelta(days=9),
                                           now=now - timedelta(days=1)).token
    revoked = services.create_personal_token(user=owner, description="revoked").token
    services.revoke_api_token(token=revoked)
    services.issue_session_token(user=owner)  # session tokens are not API keys
    presented = ApiToken.objects.get(user=owner, description="tests")

    response = api.get("/api/v0/user/api-tokens")
    assert response.status_code == 200
    assert response.json() == {"api_tokens": [token_body(presented), token_body(newer), token_body(older)],
                               "next_cursor": None}
    text = response.content.decode()
    assert api.raw_token not in text
    assert presented.token_hash not in text and "token_hash" not in text


def test_list_api_tokens_is_only_the_callers(api, stranger_api):
    body = stranger_api.get("/api/v0/user/api-tokens").json()
    assert [t["description"] for t in body["api_tokens"]] == ["tests"]
    assert body["api_tokens"][0]["id"] == str(ApiToken.objects.get(user__email="stranger@example.com").id)


def test_create_api_token_returns_secret_once_and_it_works(api, owner):
    expires = timezone.now() + timedelta(days=30)
    response = api.post("/api/v0/user/api-tokens", {"description": "laptop", "expires_at": iso(expires)},
                        format="json")
    assert response.status_code == 201
    body = response.json()
    token = ApiToken.objects.get(user=owner, description="laptop")
    assert body == {"token": body["token"], "api_token": token_body(token)}
    assert body["token"].startswith("hm_") and len(body["token"]) == 46
    assert token.kind == TokenKind.PERSONAL and token.expires_at == expires
    assert token.token_hash != body["token"]
    fresh = make_api(owner)
    fresh.credentials(HTTP_AUTHORIZATION=f"Bearer {body['token']}")
    assert fresh.get("/api/v0/user").json()["email"] == "owner@example.com"
    listed = api.get("/api/v0/user/api-tokens").content.decode()
    assert body["token"] not in listed


def test_create_api_token_without_expiry_never_expires(api, owner):
    response = api.post("/api/v0/user/api-tokens", {"description": "ci"}, format="json")
    assert response.status_code == 201
    assert response.json()["api_token"]["expires_at"] is None


@pytest.mark.parametrize("body, field", [
    ({"description": "x", "expires_at": "next tuesday"}, "expires_at"),
    ({"description": "x", "expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
    ({"description": "x", "expires_at": 12}, "expires_at"),
    ({"expires_at": None}, "description"),
    ({"description": "x" * 256}, "description"),
])
def test_create_api_token_with_bad_fields_is_422_and_creates_nothing(api, owner, body, field):
    before = ApiToken.objects.count()
    error = assert_error(api.post("/api/v0/user/api-tokens", body, format="json"), 422, "validation_failed")
    assert field in error["fields"]
    assert ApiToken.objects.count() == before


def test_revoke_api_token_sets_revoked_at_and_the_token_stops_working(api, owner):
    other = make_api(owner)
    token = ApiToken.objects.get(token_hash=services.hash_secret(other.raw_token))
    assert api.delete(f"/api/v0/user/api-tokens/{token.id}").status_code == 204
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert_error(other.get("/api/v0/user"), 401, "unauthorized")
    assert str(token.id) not in api.get("/api/v0/user/api-tokens").content.decode()


def test_revoking_an_already_revoked_token_is_404_and_keeps_first_time(api, owner):
    token = services.create_personal_token(user=owner, description="old").token
    first = timezone.now() - timedelta(hours=1)
    services.revoke_api_token(token=token, now=first)
    error = assert_error(api.delete(f"/api/v0/user/api-tokens/{token.id}"), 404, "api_token_not_found")
    assert error["type"] == "not_found" and "fields" not in error
    token.refresh_from_db()
    assert token.revoked_at == first


def test_revoking_twice_is_204_then_404(api, owner):
    token = services.create_personal_token(user=owner, description="twice").token
    assert api.delete(f"/api/v0/user/api-tokens/{token.id}").status_code == 204
    token.refresh_from_db()
    first = token.revoked_at
    assert_error(api.delete(f"/api/v0/user/api-tokens/{token.id}"), 404, "api_token_not_found")
    token.refresh_from_db()
    assert token.revoked_at == first


def test_revoking_an_expired_token_is_204(api, owner):
    token = services.create_personal_token(user=owner, description="old",
                                           expires_at=timezone.now() - timedelta(days=1)).token
    assert api.delete(f"/api/v0/user/api-tokens/{token.id}").status_code == 204
    token.refresh_from_db()
    assert token.revoked_at is not None


@pytest.mark.parametrize("token_id", ["not-a-uuid", str(uuid.uuid4()), "1"])
def test_revoke_unknown_or_malformed_token_is_404(api, token_id):
    assert_error(api.delete(f"/api/v0/user/api-tokens/{token_id}"), 404, "api_token_not_found")


def test_revoke_another_users_token_is_404_and_leaves_it(api, stranger):
    theirs = services.create_personal_token(user=stranger, description="theirs").token
    assert_error(api.delete(f"/api/v0/user/api-tokens/{theirs.id}"), 404, "api_token_not_found")
    theirs.refresh_from_db()
    assert theirs.revoked_at is None


def test_revoke_a_session_token_through_api_tokens_is_404(api, owner):
    session = services.issue_session_token(user=owner).token
    assert_error(api.delete(f"/api/v0/user/api-tokens/{session.id}"), 404, "api_token_not_found")


# ---------------------------------------------------------------- logout and dead tokens

def test_logout_revokes_the_presented_personal_token(api, owner):
    assert api.post("/api/v0/auth/logout").status_code == 204
    token = ApiToken.objects.get(token_hash=services.hash_secret(api.raw_token))
    assert token.revoked_at is not None
    assert_error(api.get("/api/v0/user"), 401, "unauthorized")


def test_logout_then_logout_again_is_401(api):
    assert api.post("/api/v0/auth/logout").status_code == 204
    assert_error(api.post("/api/v0/auth/logout"), 401, "unauthorized")


def test_logout_revokes_only_the_presented_session_token(owner, anon):
    first = services.issue_session_token(user=owner)
    second = services.issue_session_token(user=owner)
    anon.credentials(HTTP_AUTHORIZATION=f"Bearer {first.raw}")
    assert anon.post("/api/v0/auth/logout").status_code == 204
    first.token.refresh_from_db()
    second.token.refresh_from_db()
    assert first.token.revoked_at is not None and second.token.revoked_at is None
    anon.credentials(HTTP_AUTHORIZATION=f"Bearer {second.raw}")
    assert anon.get("/api/v0/user").status_code == 200


def test_revoked_token_is_401_envelope(owner, anon):
    issued = services.create_personal_token(user=owner, description="gone")
    services.revoke_api_token(token=issued.token)
    anon.credentials(HTTP_AUTHORIZATION=f"Bearer {issued.raw}")
    response = anon.get("/api/v0/user")
    assert_error(response, 401, "unauthorized")
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_expired_token_is_401(owner, anon):
    issued = services.create_personal_token(user=owner, description="old",
                                            expires_at=timezone.now() - timedelta(seconds=1))
    anon.credentials(HTTP_AUTHORIZATION=f"Bearer {issued.raw}")
    assert_error(anon.get("/api/v0/user"), 401, "unauthorized")


def test_expired_session_token_is_401(owner, anon):
    issued = services.issue_session_token(user=owner, now=timezone.now() - timedelta(days=31))
    anon.credentials(HTTP_AUTHORIZATION=f"Bearer {issued.raw}")
    assert_error(anon.get("/api/v0/user"), 401, "unauthorized")


def test_session_token_shape_and_expiry(owner):
    now = datetime(2026, 6, 4, tzinfo=UTC)
    issued = services.issue_session_token(user=owner, now=now)
    assert len(issued.raw) == 43 and not issued.raw.startswith("hm_")
    assert issued.token.expires_at == now + timedelta(days=30)


def test_list_api_tokens_query_count_is_independent_of_token_count(api, owner, django_assert_num_queries):
    api.get("/api/v0/user")  # a fresh token's first use also writes last_used_at
    with django_assert_num_queries(2):  # token, list
        assert len(api.get("/api/v0/user/api-tokens").json()["api_tokens"]) == 1
    for i in range(15):
        services.create_personal_token(user=owner, description=f"t{i}")
    with django_assert_num_queries(2):
        assert len(api.get("/api/v0/user/api-tokens").json()["api_tokens"]) == 16


# ---------------------------------------------------------------- last_used_at

def test_last_used_at_moves_at_most_once_a_minute(owner):
    token = services.create_personal_token(user=owner, description="used").token
    t0 = timezone.now()
    record_token_use(token, now=t0)
    token.refresh_from_db()
    assert token.last_used_at == t0 and LAST_USED_RESOLUTION == timedelta(minutes=1)

    record_token_use(token, now=t0 + timedelta(seconds=59, microseconds=999_999))
    token.refresh_from_db()
    assert token.last_used_at == t0  # just under a minute: unchanged

    record_token_use(token, now=t0 + timedelta(minutes=1))
    token.refresh_from_db()
    assert token.last_used_at == t0 + timedelta(minutes=1)  # a minute on: moved


def test_racing_requests_of_one_token_write_last_used_at_once(owner):
    token = services.create_personal_token(user=owner, description="raced").token
    t0 = timezone.now() - timedelta(minutes=5)
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=t0)
    token.refresh_from_db()
    stale_copy = ApiToken.objects.get(pk=token.pk)  # what a racing request authenticated with
    record_token_use(token, now=t0 + timedelta(minutes=2))
    record_token_use(stale_copy, now=t0 + timedelta(minutes=2, seconds=1))
    token.refresh_from_db()
    assert token.last_used_at == t0 + timedelta(minutes=2)  # one write, not two


def test_a_request_writes_last_used_at_when_it_is_a_minute_old(api, owner):
    token = ApiToken.objects.get(token_hash=services.hash_secret(api.raw_token))
    recent = timezone.now() - timedelta(seconds=30)
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=recent)
    assert api.get("/api/v0/user").status_code == 200
    token.refresh_from_db()
    assert token.last_used_at == recent
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now() - timedelta(seconds=61))
    before = timezone.now()
    assert api.get("/api/v0/user").status_code == 200
    token.refresh_from_db()
    assert token.last_used_at >= before
