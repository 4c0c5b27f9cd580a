"""CORS for browser clients of the REST API (`HARMONT_CORS_ORIGINS`, django-cors-headers).

Preflights are answered before authentication (a browser never sends credentials on
one); the live log stream keeps its own origins (`HARMONT_LOG_STREAM_CORS_ORIGINS`).
"""

from __future__ import annotations

import pytest

from tests.helpers import assert_error, settings_from_env

pytestmark = pytest.mark.django_db

APP = "https://app.ci.example.com"


@pytest.fixture(autouse=True)
def allowed(settings):
    settings.CORS_ALLOWED_ORIGINS = [APP]
    settings.CORS_ALLOW_ALL_ORIGINS = False


def preflight(client, path: str, origin: str = APP, method: str = "POST"):  # noqa: ANN001, ANN201
    return client.options(path, HTTP_ORIGIN=origin, HTTP_ACCESS_CONTROL_REQUEST_METHOD=method,
                          HTTP_ACCESS_CONTROL_REQUEST_HEADERS="authorization, content-type, idempotency-key")


def test_an_unauthenticated_preflight_from_an_allowed_origin_is_answered(anon, org):
    response = preflight(anon, f"/api/v0/organizations/{org.slug}/pipelines")
    assert response.status_code == 200
    assert response["Access-Control-Allow-Origin"] == APP
    assert {"GET", "POST", "PUT", "PATCH", "DELETE"} <= {m.strip() for m in response["Access-Control-Allow-Methods"].split(",")}
    allowed = {h.strip() for h in response["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "idempotency-key"} <= allowed
    assert "Access-Control-Allow-Credentials" not in response  # bearer tokens, never cookies
    assert int(response["Access-Control-Max-Age"]) > 0


def test_the_actual_answer_carries_the_origin_and_exposes_the_headers_clients_read(api, org):
    response = api.get(f"/api/v0/organizations/{org.slug}/pipelines", HTTP_ORIGIN=APP)
    assert response.status_code == 200
    assert response["Access-Control-Allow-Origin"] == APP
    exposed = {h.strip().lower() for h in response["Access-Control-Expose-Headers"].split(",")}
    assert {"x-request-id", "retry-after", "ratelimit-remaining"} <= exposed
    # Errors too, so a browser client can read the envelope.
    error = api.get("/api/v0/organizations/nope/pipelines", HTTP_ORIGIN=APP)
    assert_error(error, 404, "organization_not_found")
    assert error["Access-Control-Allow-Origin"] == APP


def test_another_origin_gets_no_cors_headers(anon, api, org):
    path = f"/api/v0/organizations/{org.slug}/pipelines"
    response = preflight(anon, path, origin="https://evil.example")
    assert "Access-Control-Allow-Origin" not in response
    assert "Access-Control-Allow-Origin" not in api.get(path, HTTP_ORIGIN="https://evil.example")


def test_no_origins_by_default_means_no_cors_headers(anon, org, settings):
    settings.CORS_ALLOWED_ORIGINS = []
    assert "Access-Control-Allow-Origin" not in preflight(anon, f"/api/v0/organizations/{org.slug}/pipelines")


def test_pages_and_the_log_stream_are_not_covered(anon, settings):
    settings.CORS_ALLOW_ALL_ORIGINS = True
    assert "Access-Control-Allow-Origin" not in anon.get("/login", HTTP_ORIGIN=APP)
    assert "Access-Control-Allow-Origin" in anon.get("/api/v0/ping", HTTP_ORIGIN=APP)
    stream = anon.get("/v0/jobs/00000000-0000-0000-0000-000000000000/logs?token=x", HTTP_ORIGIN=APP)
    assert "Access-Control-Allow-Origin" not in stream


CORS_SETTINGS = ("CORS_ALLOWED_ORIGINS", "CORS_ALLOW_ALL_ORIGINS")


def test_the_origins_come_from_HARMONT_CORS_ORIGINS():
    read = settings_from_env(CORS_SETTINGS, HARMONT_CORS_ORIGINS=f"{APP}, http://localhost:5173")
    assert read["CORS_ALLOWED_ORIGINS"] == [APP, "http://localhost:5173"] and read["CORS_ALLOW_ALL_ORIGINS"] is False
    assert settings_from_env(CORS_SETTINGS, HARMONT_CORS_ORIGINS="*")["CORS_ALLOW_ALL_ORIGINS"] is True
    assert settings_from_env(CORS_SETTINGS, HARMONT_CORS_ORIGINS="")["CORS_ALLOWED_ORIGINS"] == []
    refused = settings_from_env(CORS_SETTINGS, HARMONT_CORS_ORIGINS="app.ci.example.com/path")
    assert "HARMONT_CORS_ORIGINS" in refused["error"] and "ImproperlyConfigured" in refused["error"]
