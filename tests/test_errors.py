"""The error envelope and X-Request-Id on every failure path under /api/v0 (SPEC §1)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from django.test import Client

from builds.models import Build
from tests.helpers import assert_error


def test_unknown_route_is_envelope_404(api):
    assert_error(api.get("/api/v0/no/such/route"), 404, "route_not_found")


def test_unknown_route_without_auth_is_still_envelope(anon):
    assert_error(anon.post("/api/v0/nothing-here"), 404, "route_not_found")


@pytest.mark.parametrize("method", ["get", "post", "put", "patch", "delete", "options"])
def test_unknown_route_is_404_for_every_method_even_from_a_signed_in_browser_without_csrf(owner, method):
    """A session cookie and no CSRF token once made POST/PUT/DELETE to an unknown path a 403."""
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(owner)
    response = browser.generic(method.upper(), "/api/v0/no/such/route", data="{}", content_type="application/json")
    assert_error(response, 404, "route_not_found")


def test_api_routes_ignore_csrf_for_signed_in_browsers(owner, org):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(owner)
    # No bearer token: the API never accepts the session, and never asks for a CSRF token either.
    assert_error(browser.post(f"/api/v0/organizations/{org.slug}/pipelines", data="{}",
                              content_type="application/json"), 401, "unauthorized")
    assert_error(browser.delete("/api/v0/ping"), 405, "method_not_allowed")


def test_bare_api_prefix_is_envelope(anon):
    assert_error(anon.get("/api/v0"), 404, "route_not_found")


def test_wrong_method_is_envelope_405(api):
    error = assert_error(api.delete("/api/v0/ping"), 405, "method_not_allowed")
    assert "DELETE" in error["message"]


def test_missing_token_is_401_with_bearer_challenge(anon, org):
    response = anon.get(f"/api/v0/organizations/{org.slug}/pipelines")
    assert_error(response, 401, "unauthorized")
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("header", ["Token abc", "Bearer", "Bearer short", "Basic dXNlcjpwYXNz",
                                    "Bearer " + "x" * 300, "Bearer hm_doesnotexist0000000000000000000000000000"])
def test_malformed_or_unknown_token_is_401(anon, org, header):
    response = anon.get(f"/api/v0/organizations/{org.slug}/pipelines", HTTP_AUTHORIZATION=header)
    assert_error(response, 401, "unauthorized")


def test_malformed_json_is_400_and_writes_nothing(api, pipeline, org):
    response = api.post(f"/api/v0/organizations/{org.slug}/pipelines/{pipeline.slug}/builds",
                        data='{"branch": "main",', content_type="application/json")
    assert_error(response, 400, "invalid_json")
    assert Build.objects.count() == 0


def test_wrong_content_type_is_415_envelope(api, pipeline, org):
    response = api.post(f"/api/v0/organizations/{org.slug}/pipelines/{pipeline.slug}/builds",
                        data="branch=main&commit=abc", content_type="application/x-www-form-urlencoded")
    error = assert_error(response, 415, "unsupported_media_type")
    assert error["type"] == "invalid_request"
    assert Build.objects.count() == 0


def test_body_too_large_is_413_before_anything_is_read(api, pipeline, org, settings):
    settings.MAX_REQUEST_BYTES = 2048
    body = '{"branch": "main", "commit": "abc123", "message": "' + "x" * 4096 + '"}'
    response = api.post(f"/api/v0/organizations/{org.slug}/pipelines/{pipeline.slug}/builds",
                        data=body, content_type="application/json")
    assert_error(response, 413, "payload_too_large")
    assert Build.objects.count() == 0


def test_unhandled_exception_is_500_envelope_without_details(api, build, monkeypatch):
    from builds import api as builds_api

    def explode(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(builds_api.BuildDetailView, "get", explode)
    pipeline = build.pipeline
    response = api.get(f"/api/v0/organizations/{pipeline.organization.slug}/pipelines/{pipeline.slug}/builds/1")
    error = assert_error(response, 500, "server_error")
    assert "secret internals" not in response.content.decode()
    assert error["type"] == "server_error"


def test_disallowed_host_is_envelope(client):
    response = client.get("/api/v0/ping", HTTP_HOST="evil.example")
    assert_error(response, 400, "invalid_request")


def test_validation_error_lists_fields(api, org):
    response = api.post("/api/v0/user/api-tokens", {"description": "x" * 256, "expires_at": "soon"}, format="json")
    error = assert_error(response, 422, "validation_failed")
    assert set(error["fields"]) == {"description", "expires_at"}
    assert error["type"] == "validation_failed"


def test_an_endpoints_own_validation_code_keeps_type_and_fields(api, org):
    response = api.post(f"/api/v0/organizations/{org.slug}/pipelines", {"name": "x"}, format="json")
    error = assert_error(response, 422, "pipeline_invalid")
    assert error["type"] == "validation_failed"
    assert error["fields"] == {"repository": ["This field is required."], "default_branch": ["This field is required."]}


def test_sane_request_id_is_echoed(anon):
    response = anon.get("/api/v0/ping", HTTP_X_REQUEST_ID="abc-123_x.y")
    assert response["X-Request-Id"] == "abc-123_x.y"


@pytest.mark.parametrize("bad", ["has space", "x" * 129, "semi;colon", "ünïcode"])
def test_insane_request_id_is_replaced(anon, bad):
    response = anon.get("/api/v0/no-route", HTTP_X_REQUEST_ID=bad)
    assert response["X-Request-Id"] != bad
    assert len(response["X-Request-Id"]) == 32
    assert response.json()["error"]["request_id"] == response["X-Request-Id"]


def test_request_id_is_on_success_responses_too(anon):
    assert len(anon.get("/api/v0/ping")["X-Request-Id"]) == 32


def test_every_doc_url_is_served(client, api):
    from harmont.errors import CATALOG

    for code in CATALOG:
        response = client.get(f"/docs/errors/{code}")
        assert response.status_code == 200, code
        assert code in response.content.decode()
    assert client.get("/docs/errors/").status_code == 200
    assert client.get("/docs/errors/not-a-code").status_code == 404


def test_doc_pages_give_the_status_the_answers_carry(client):
    assert "HTTP status <strong>503</strong>" in client.get("/docs/errors/database_unavailable").content.decode()
    assert "HTTP status <strong>500</strong>" in client.get("/docs/errors/server_error").content.decode()
    assert "HTTP status <strong>409</strong>" in client.get("/docs/errors/build_not_held").content.decode()
    index = client.get("/docs/errors/").content.decode()
    row = index[index.index("database_unavailable"):]
    assert row[:row.index("</tr>")].count(">503<") == 1


def raised_codes() -> dict[str, str]:
    """Every error code the server's source names where an error is made: {code: file:line}."""
    found: dict[str, str] = {}
    root = Path(__file__).resolve().parent.parent
    for path in sorted(p for app in ("harmont", "organizations", "pipelines", "builds")
                       for p in (root / app).rglob("*.py")):
        for call in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(call, ast.Call):
                continue
            name = getattr(call.func, "id", getattr(call.func, "attr", None))
            literals = []
            if name == "ApiError" and call.args:
                literals.append(call.args[0])
            if name == "envelope_response" and len(call.args) > 1:
                literals.append(call.args[1])
            for keyword in call.keywords:
                if keyword.arg == "code" and name in ("ApiError", "validation_error", "validated"):
                    literals.append(keyword.value)
                if keyword.arg == "field_codes" and isinstance(keyword.value, ast.Dict):
                    literals.extend(keyword.value.values)
            for node in literals:
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    found.setdefault(node.value, f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_every_code_the_source_raises_is_in_the_catalog_with_a_page(client, db):
    from harmont.errors import CATALOG

    codes = raised_codes()
    assert {"organization_invalid", "invalid_role", "invite_unacceptable", "pipeline_invalid",
            "user_name_invalid", "source_not_found", "api_token_not_found"} <= set(codes)
    assert {code: where for code, where in codes.items() if code not in CATALOG} == {}
    for code in codes:
        page = client.get(f"/docs/errors/{code}")
        assert page.status_code == 200 and CATALOG[code].title in page.content.decode(), code


def test_error_doc_url_points_at_public_url(api, settings):
    settings.PUBLIC_URL = "https://ci.example.org"
    error = assert_error(api.get("/api/v0/nope"), 404, "route_not_found")
    assert error["doc_url"] == "https://ci.example.org/docs/errors/route_not_found"


def test_ping_and_healthz(anon, client, db):
    assert anon.get("/api/v0/ping").json() == {"status": "ok"}
    response = client.get("/healthz")
    assert response.status_code == 200 and response.content == b"ok"


def test_healthz_is_503_while_database_is_unreachable(client, monkeypatch):
    from django.db import OperationalError, connection

    def broken_cursor(*args, **kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr(connection, "cursor", broken_cursor)
    response = client.get("/healthz")
    assert response.status_code == 503


def test_pathologically_nested_json_is_400_not_a_crash(api, pipeline, org):
    response = api.post(f"/api/v0/organizations/{org.slug}/pipelines/{pipeline.slug}/builds",
                        data="[" * 100_000, content_type="application/json")
    assert_error(response, 400, "invalid_json")
