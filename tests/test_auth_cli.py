"""CLI login: loopback transfer/claim and paste code/redeem (SPEC §2, §10)."""

from __future__ import annotations

import re
import secrets
from datetime import timedelta
from unittest import mock

import pytest
from django.core.cache import cache
from django.utils import timezone
from rest_framework.test import APIClient

from harmont.errors import ApiError
from harmont.throttling import RateBudget
from organizations import services
from organizations.models import ApiToken, CliGrantKind, CliLoginGrant, TokenKind
from tests.helpers import assert_error, is_postgres, race

CODE_PATTERN = re.compile(r"^[0-9ABCDEFGHJKMNPQRSTVWXYZ]{16}$")


@pytest.fixture(autouse=True)
def fresh_throttle():
    """Claim/redeem are throttled per client address through the cache; start and end each test clean."""
    cache.clear()
    yield
    cache.clear()


def new_nonce() -> str:
    return secrets.token_urlsafe(32)


def claim(anon, nonce):  # noqa: ANN001, ANN201
    return anon.post("/api/v0/auth/cli/claim", {"nonce": nonce}, format="json")


def redeem(anon, code):  # noqa: ANN001, ANN201
    return anon.post("/api/v0/auth/cli/redeem", {"code": code}, format="json")


def as_bearer(anon, token: str):  # noqa: ANN001, ANN201
    anon.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return anon


# ---------------------------------------------------------------- transfer / claim

def test_transfer_then_claim_gives_a_working_session_token(api, anon, owner):
    nonce = new_nonce()
    response = api.post("/api/v0/auth/cli/transfer", {"nonce": nonce}, format="json")
    assert response.status_code == 204 and response.content == b""
    grant = CliLoginGrant.objects.get()
    assert grant.kind == CliGrantKind.TRANSFER and grant.user == owner and grant.used_at is None
    assert grant.secret_hash == services.hash_secret(nonce)
    assert grant.expires_at == grant.created_at + timedelta(seconds=60)

    response = claim(anon, nonce)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"token"}
    assert len(body["token"]) == 43 and re.fullmatch(r"[A-Za-z0-9_-]{43}", body["token"])
    session = ApiToken.objects.get(token_hash=services.hash_secret(body["token"]))
    assert session.kind == TokenKind.SESSION and session.user == owner
    grant.refresh_from_db()
    assert grant.used_at is not None
    assert as_bearer(anon, body["token"]).get("/api/v0/user").json()["email"] == "owner@example.com"


def test_transfer_stores_no_usable_token(api, owner):
    before = ApiToken.objects.count()
    assert api.post("/api/v0/auth/cli/transfer", {"nonce": new_nonce()}, format="json").status_code == 204
    assert ApiToken.objects.count() == before  # the session token is minted at claim time


def test_claim_twice_is_400(api, anon):
    nonce = new_nonce()
    api.post("/api/v0/auth/cli/transfer", {"nonce": nonce}, format="json")
    assert claim(anon, nonce).status_code == 200
    assert_error(claim(anon, nonce), 400, "cli_code_invalid")
    assert ApiToken.objects.filter(kind=TokenKind.SESSION).count() == 1


def test_claim_before_transfer_is_400_and_does_not_block_the_later_claim(api, anon):
    nonce = new_nonce()
    assert_error(claim(anon, nonce), 400, "cli_code_invalid")
    api.post("/api/v0/auth/cli/transfer", {"nonce": nonce}, format="json")
    assert claim(anon, nonce).status_code == 200


def test_claim_after_60_seconds_is_400_and_consumes_the_grant(api, anon):
    nonce = new_nonce()
    api.post("/api/v0/auth/cli/transfer", {"nonce": nonce}, format="json")
    later = timezone.now() + timedelta(seconds=61)
    with mock.patch("django.utils.timezone.now", return_value=later):
        assert_error(claim(anon, nonce), 400, "cli_code_invalid")
    grant = CliLoginGrant.objects.get()
    assert grant.used_at == later
    assert not ApiToken.objects.filter(kind=TokenKind.SESSION).exists()
    assert_error(claim(anon, nonce), 400, "cli_code_invalid")


def test_claim_service_honours_the_60_second_window(owner):
    start = timezone.now()
    services.park_cli_transfer(user=owner, nonce="n" * 32, now=start)
    assert services.claim_cli_transfer(nonce="n" * 32, now=start + timedelta(seconds=59)).token.user == owner


def test_nonce_parked_twice_is_400_invalid_request(api, stranger_api, owner):
    nonce = new_nonce()
    assert api.post("/api/v0/auth/cli/transfer", {"nonce": nonce}, format="json").status_code == 204
    assert_error(stranger_api.post("/api/v0/auth/cli/transfer", {"nonce": nonce}, format="json"), 400,
                 "invalid_request")
    assert CliLoginGrant.objects.get().user == owner


@pytest.mark.parametrize("body", [{}, {"nonce": ""}, {"nonce": "   "}, {"nonce": 42}, {"nonce": "x" * 513}])
def test_transfer_without_a_usable_nonce_is_400(api, body):
    assert_error(api.post("/api/v0/auth/cli/transfer", body, format="json"), 400, "invalid_request")
    assert not CliLoginGrant.objects.exists()


def test_transfer_of_a_json_array_is_400(api):
    assert_error(api.post("/api/v0/auth/cli/transfer", ["nonce"], format="json"), 400, "invalid_request")


def test_transfer_needs_a_bearer_token(anon, db):
    assert_error(anon.post("/api/v0/auth/cli/transfer", {"nonce": new_nonce()}, format="json"), 401, "unauthorized")
    assert not CliLoginGrant.objects.exists()


@pytest.mark.parametrize("body", [{}, {"nonce": ""}, {"nonce": None}, {"nonce": ["a"]}])
def test_claim_without_nonce_is_400(anon, db, body):
    assert_error(anon.post("/api/v0/auth/cli/claim", body, format="json"), 400, "cli_code_invalid")


def test_claim_ignores_a_bearer_header(api, anon):
    nonce = new_nonce()
    api.post("/api/v0/auth/cli/transfer", {"nonce": nonce}, format="json")
    anon.credentials(HTTP_AUTHORIZATION="Bearer garbage-garbage-garbage")
    assert claim(anon, nonce).status_code == 200


# ---------------------------------------------------------------- code / redeem

def test_code_then_redeem_gives_a_working_session_token(api, anon, owner):
    response = api.post("/api/v0/auth/cli/code")
    assert response.status_code == 200
    code = response.json()["code"]
    assert response.json() == {"code": code}
    assert CODE_PATTERN.match(code)
    grant = CliLoginGrant.objects.get()
    assert grant.kind == CliGrantKind.CODE and grant.secret_hash == services.hash_secret(code)
    assert grant.expires_at == grant.created_at + timedelta(seconds=300)

    response = redeem(anon, code)
    assert response.status_code == 200
    token = response.json()["token"]
    assert len(token) == 43
    assert as_bearer(anon, token).get("/api/v0/user").json()["uuid"] == str(owner.uuid)


def test_redeem_accepts_lower_case_and_separators(api, anon):
    code = api.post("/api/v0/auth/cli/code").json()["code"]
    typed = f"{code[:4].lower()}-{code[4:8].lower()} {code[8:]}"
    assert redeem(anon, typed).status_code == 200


def test_redeem_twice_is_400(api, anon):
    code = api.post("/api/v0/auth/cli/code").json()["code"]
    assert redeem(anon, code).status_code == 200
    assert_error(redeem(anon, code), 400, "cli_code_invalid")
    assert ApiToken.objects.filter(kind=TokenKind.SESSION).count() == 1


def test_redeem_after_five_minutes_is_400_and_consumes_the_code(owner, anon):
    start = timezone.now() - timedelta(seconds=301)
    code = services.create_cli_code(user=owner, now=start)
    assert_error(redeem(anon, code), 400, "cli_code_invalid")
    assert CliLoginGrant.objects.get().used_at is not None
    assert not ApiToken.objects.filter(kind=TokenKind.SESSION).exists()


@pytest.mark.parametrize("body", [{}, {"code": ""}, {"code": None}, {"code": "0000000000000000"}, {"code": "short"}])
def test_redeem_without_a_valid_code_is_400(anon, db, body):
    assert_error(anon.post("/api/v0/auth/cli/redeem", body, format="json"), 400, "cli_code_invalid")


def test_redeem_with_a_transfer_nonce_is_400(api, anon):
    # The two grant kinds never stand in for each other.
    nonce = "0123456789ABCDEF"
    api.post("/api/v0/auth/cli/transfer", {"nonce": nonce}, format="json")
    assert_error(redeem(anon, nonce), 400, "cli_code_invalid")
    assert claim(anon, nonce).status_code == 200


def test_code_needs_a_bearer_token(anon, db):
    assert_error(anon.post("/api/v0/auth/cli/code"), 401, "unauthorized")


def test_codes_are_distinct(api):
    codes = {api.post("/api/v0/auth/cli/code").json()["code"] for _ in range(5)}
    assert len(codes) == 5


class FakeClock:
    """Stands in for the throttles' clock, so minutes of polling take no time."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch, db) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(RateBudget, "timer", staticmethod(fake))
    return fake


def test_a_cli_polling_claim_at_its_pace_for_its_whole_window_gets_400s_then_the_token(api, anon, clock):
    """The CLI polls every 750 ms for 3 minutes and gives up on anything but 400 cli_code_invalid."""
    nonce = new_nonce()
    for _ in range(239):
        assert_error(claim(anon, nonce), 400, "cli_code_invalid")
        clock.advance(0.75)
    assert api.post("/api/v0/auth/cli/transfer", {"nonce": nonce}, format="json").status_code == 204
    response = claim(anon, nonce)
    assert response.status_code == 200 and response.json()["token"]


def test_one_nonce_polled_faster_than_any_cli_is_refused_but_not_other_nonces(anon, clock):
    nonce = new_nonce()
    for _ in range(100):
        assert_error(claim(anon, nonce), 400, "cli_code_invalid")
    response = claim(anon, nonce)
    assert_error(response, 429, "rate_limited")
    assert response["RateLimit-Limit"] == "100" and response["RateLimit-Remaining"] == "0"
    assert response["Retry-After"] == "60" and response["RateLimit-Reset"] == "60"
    assert_error(claim(anon, new_nonce()), 400, "cli_code_invalid")
    clock.advance(60)  # the oldest poll has left the window
    assert_error(claim(anon, nonce), 400, "cli_code_invalid")


def test_a_flood_from_one_address_is_refused_across_claim_and_redeem(anon, clock):
    for i in range(300):
        response = claim(anon, new_nonce()) if i % 2 else redeem(anon, f"{i:016d}")
        assert_error(response, 400, "cli_code_invalid")
        clock.advance(0.125)
    for response in (claim(anon, new_nonce()), redeem(anon, "0" * 16)):
        error = assert_error(response, 429, "rate_limited")
        assert response["RateLimit-Limit"] == "300" and response["RateLimit-Remaining"] == "0"
        # The first request leaves the window 60 s after it was made, 22.5 s from now.
        assert response["Retry-After"] == "23" and "23 s" in error["message"]
    other_address = APIClient(REMOTE_ADDR="203.0.113.9")
    assert_error(claim(other_address, new_nonce()), 400, "cli_code_invalid")


def test_every_spelling_of_one_code_shares_its_budget(anon, clock):
    for i in range(100):
        assert_error(redeem(anon, "abcd-efgh-jkmn-pqrs" if i % 2 else "ABCDEFGHJKMNPQRS"), 400, "cli_code_invalid")
    assert_error(redeem(anon, "abcdefghjkmnpqrs"), 429, "rate_limited")
    assert_error(redeem(anon, "ABCDEFGHJKMNPQRT"), 400, "cli_code_invalid")


def test_throttled_answers_say_what_is_left(anon, owner, clock):
    code = services.create_cli_code(user=owner)
    first = claim(anon, new_nonce())
    assert (first["RateLimit-Limit"], first["RateLimit-Remaining"], first["RateLimit-Reset"]) == ("100", "99", "60")
    clock.advance(20)
    response = redeem(anon, code)
    assert response.status_code == 200
    # The address budget (298 of 300 left) is wider than the code's (99 of 100): the tightest is reported.
    assert (response["RateLimit-Limit"], response["RateLimit-Remaining"], response["RateLimit-Reset"]) == ("100", "99", "60")


def test_a_request_without_a_credential_spends_only_the_address_budget(anon, clock, monkeypatch):
    monkeypatch.setattr(RateBudget, "THROTTLE_RATES", {"cli_login": "2/min", "cli_login_credential": "100/min"})
    for _ in range(2):
        response = anon.post("/api/v0/auth/cli/claim", {}, format="json")
        assert response.status_code == 400 and response["RateLimit-Limit"] == "2"
    assert_error(anon.post("/api/v0/auth/cli/claim", {}, format="json"), 429, "rate_limited")


def test_the_limits_come_from_the_settings(anon, clock, monkeypatch):
    monkeypatch.setattr(RateBudget, "THROTTLE_RATES", {"cli_login": "3/min", "cli_login_credential": "100/min"})
    for _ in range(3):
        assert_error(claim(anon, "guess-guess-guess"), 400, "cli_code_invalid")
    response = redeem(anon, "0000000000000000")
    assert_error(response, 429, "rate_limited")
    assert int(response["Retry-After"]) >= 1


def test_old_grants_are_swept_when_new_ones_are_made(owner):
    long_ago = timezone.now() - timedelta(days=2)
    services.park_cli_transfer(user=owner, nonce="old-nonce-old-nonce", now=long_ago)
    services.create_cli_code(user=owner)
    assert list(CliLoginGrant.objects.values_list("kind", flat=True)) == [CliGrantKind.CODE]


@pytest.mark.parametrize("kind", [CliGrantKind.TRANSFER, CliGrantKind.CODE])
def test_racing_claims_of_one_grant_yield_exactly_one_token(transactional_db, kind):
    if not is_postgres():
        pytest.skip("needs PostgreSQL's concurrent writers")
    user = services.create_user(email="racer@example.com")
    if kind == CliGrantKind.TRANSFER:
        secret = new_nonce()
        services.park_cli_transfer(user=user, nonce=secret)
        consume = lambda: services.claim_cli_transfer(nonce=secret)  # noqa: E731
    else:
        secret = services.create_cli_code(user=user)
        consume = lambda: services.redeem_cli_code(code=secret)  # noqa: E731

    def worker(i: int) -> str:
        try:
            consume()
        except ApiError as exc:
            return exc.code
        return "token"

    outcomes = race(6, worker)
    assert sorted(outcomes) == ["cli_code_invalid"] * 5 + ["token"]
    assert ApiToken.objects.filter(kind=TokenKind.SESSION, user=user).count() == 1
