"""Build-scoped log tokens: the endpoint and the codec (harmont.logtokens)."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime, timedelta, timezone as dt_timezone

import jwt
import pytest
from django.conf import settings
from django.utils import timezone
from rest_framework.test import APIClient

from harmont.logtokens import LogTokenInvalid, log_token_opens_build, mint_log_token, verify_log_token
from tests.helpers import assert_error, builds_url, make_build


def token_url(build) -> str:
    return builds_url(build.pipeline, f"/{build.number}/log-token")


def claims_for(build_id: uuid.UUID, **overrides: object) -> dict[str, object]:
    now = int(timezone.now().timestamp())
    return {"iss": "harmont", "aud": "logs", "sub": str(build_id), "iat": now, "exp": now + 3600, **overrides}


def parse_z(value: str) -> datetime:
    assert value.endswith("Z"), value
    return datetime.fromisoformat(value[:-1]).replace(tzinfo=dt_timezone.utc)


# ===================================================================== the endpoint


@pytest.mark.django_db
def test_log_token_endpoint_returns_token_valid_for_an_hour(api, build):
    before = timezone.now()
    response = api.get(token_url(build))
    after = timezone.now()

    assert response.status_code == 200, response.content
    body = response.json()
    assert set(body) == {"token", "expires_at"}
    expires_at = parse_z(body["expires_at"])
    assert before + timedelta(hours=1) - timedelta(seconds=1) <= expires_at <= after + timedelta(hours=1)
    assert verify_log_token(body["token"]) == build.id
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert (claims["aud"], claims["sub"], claims["exp"]) == ("logs", str(build.id), int(expires_at.timestamp()))


@pytest.mark.django_db
def test_log_token_opens_only_its_own_build(api, pipeline, build):
    other = make_build(pipeline)
    token = api.get(token_url(build)).json()["token"]

    assert log_token_opens_build(token, build.id) is True
    assert log_token_opens_build(token, other.id) is False
    assert verify_log_token(api.get(token_url(other)).json()["token"]) == other.id


@pytest.mark.django_db
def test_member_may_get_a_log_token(member_api, build):
    assert verify_log_token(member_api.get(token_url(build)).json()["token"]) == build.id


@pytest.mark.django_db
def test_log_token_of_other_orgs_build_is_404(api, other_pipeline):
    foreign = make_build(other_pipeline)
    assert_error(api.get(token_url(foreign)), 404, "organization_not_found")


@pytest.mark.django_db
def test_log_token_of_unknown_build_is_404(api, pipeline, build):
    assert_error(api.get(builds_url(pipeline, "/2/log-token")), 404, "build_not_found")
    assert_error(api.get(builds_url(pipeline, "/abc/log-token")), 404, "build_not_found")


@pytest.mark.django_db
def test_log_token_needs_a_bearer_token(anon, build):
    assert_error(anon.get(token_url(build)), 401, "unauthorized")


@pytest.mark.django_db
def test_log_token_is_not_a_bearer_token(api, build):
    token = api.get(token_url(build)).json()["token"]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")

    assert_error(client.get(builds_url(build.pipeline, f"/{build.number}")), 401, "unauthorized")
    assert_error(client.get(token_url(build)), 401, "unauthorized")
    assert_error(client.get(f"/api/v0/organizations/{build.pipeline.organization.slug}/pipelines"),
                 401, "unauthorized")
    assert_error(client.get("/api/v0/user"), 401, "unauthorized")


# ===================================================================== the codec


def test_verify_returns_the_build_id():
    build_id = uuid.uuid4()
    assert verify_log_token(mint_log_token(build_id=build_id).token) == build_id


def test_custom_ttl():
    now = timezone.now()
    minted = mint_log_token(build_id=uuid.uuid4(), now=now, ttl_seconds=60)
    assert minted.expires_at == (now + timedelta(seconds=60)).replace(microsecond=0)


def test_expired_token_is_invalid():
    build_id = uuid.uuid4()
    minted = mint_log_token(build_id=build_id, now=timezone.now() - timedelta(hours=2))

    with pytest.raises(LogTokenInvalid):
        verify_log_token(minted.token)
    assert log_token_opens_build(minted.token, build_id) is False


def test_token_minted_59_minutes_ago_still_works():
    build_id = uuid.uuid4()
    minted = mint_log_token(build_id=build_id, now=timezone.now() - timedelta(minutes=59))
    assert verify_log_token(minted.token) == build_id


def test_token_signed_with_another_secret_is_invalid():
    build_id = uuid.uuid4()
    forged = jwt.encode(claims_for(build_id), "another-secret-that-is-long-enough-for-hs256", algorithm="HS256")

    with pytest.raises(LogTokenInvalid):
        verify_log_token(forged)
    assert log_token_opens_build(forged, build_id) is False


def test_token_signed_with_the_session_secret_key_is_invalid():
    # The log token has its own secret, not Django's SECRET_KEY.
    assert settings.LOG_TOKEN_SECRET != settings.SECRET_KEY
    forged = jwt.encode(claims_for(uuid.uuid4()), settings.SECRET_KEY, algorithm="HS256")
    with pytest.raises(LogTokenInvalid):
        verify_log_token(forged)


def test_token_is_invalid_after_the_secret_rotates(settings):
    minted = mint_log_token(build_id=uuid.uuid4())
    settings.LOG_TOKEN_SECRET = "a-rotated-secret-long-enough-for-hs256-keys"
    with pytest.raises(LogTokenInvalid):
        verify_log_token(minted.token)


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def test_tampered_token_is_invalid():
    build_id, other_id = uuid.uuid4(), uuid.uuid4()
    token = mint_log_token(build_id=build_id).token
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))

    swapped = ".".join([header, _b64({**claims, "sub": str(other_id)}), signature])
    flipped_sig = ".".join([header, payload, signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]])

    for bad in (swapped, flipped_sig, token[:-1], token + "x", token.replace(".", "", 1)):
        with pytest.raises(LogTokenInvalid):
            verify_log_token(bad)
    assert log_token_opens_build(swapped, other_id) is False


@pytest.mark.parametrize("overrides", [
    {"aud": "api"}, {"iss": "someone-else"}, {"sub": "not-a-uuid"}, {"sub": 7},
])
def test_token_with_wrong_claims_is_invalid(overrides):
    token = jwt.encode(claims_for(uuid.uuid4(), **overrides), settings.LOG_TOKEN_SECRET, algorithm="HS256")
    with pytest.raises(LogTokenInvalid):
        verify_log_token(token)


@pytest.mark.parametrize("missing", ["exp", "sub", "aud", "iss"])
def test_token_missing_a_required_claim_is_invalid(missing):
    claims = claims_for(uuid.uuid4())
    del claims[missing]
    token = jwt.encode(claims, settings.LOG_TOKEN_SECRET, algorithm="HS256")
    with pytest.raises(LogTokenInvalid):
        verify_log_token(token)


def test_unsigned_token_is_invalid():
    token = jwt.encode(claims_for(uuid.uuid4()), None, algorithm="none")
    with pytest.raises(LogTokenInvalid):
        verify_log_token(token)


def test_token_with_another_algorithm_is_invalid():
    token = jwt.encode(claims_for(uuid.uuid4()), settings.LOG_TOKEN_SECRET, algorithm="HS512")
    with pytest.raises(LogTokenInvalid):
        verify_log_token(token)


@pytest.mark.parametrize("token", [None, "", "garbage", "a.b.c", "ééé"])
def test_missing_or_garbage_token_is_invalid(token):
    with pytest.raises(LogTokenInvalid):
        verify_log_token(token)
    assert log_token_opens_build(token, uuid.uuid4()) is False
