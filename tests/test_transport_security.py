"""Transport and page hardening: cookies, HSTS, and a Content-Security-Policy the pages live within.

Served over https (`HARMONT_APP_URL`, by default `HARMONT_PUBLIC_URL`), cookies are Secure and
browsers get HSTS; cookies are HttpOnly always. Every HTML page, the admin's included, says
that only the server's own scripts and styles may run, and no page carries an inline script or
style that such a policy would block.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.test import Client

from builds.models import Build
from organizations.models import User
from tests.helpers import settings_from_env

pytestmark = pytest.mark.django_db

PASSWORD = "pw-123456-long"
TRANSPORT = ("SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE", "SESSION_COOKIE_HTTPONLY", "CSRF_COOKIE_HTTPONLY",
             "SECURE_HSTS_SECONDS")


def test_https_deployments_get_secure_cookies_and_hsts() -> None:
    https = settings_from_env(TRANSPORT, HARMONT_PUBLIC_URL="https://ci.example.com")
    assert https == {"SESSION_COOKIE_SECURE": True, "CSRF_COOKIE_SECURE": True, "SESSION_COOKIE_HTTPONLY": True,
                     "CSRF_COOKIE_HTTPONLY": True, "SECURE_HSTS_SECONDS": 31536000}
    pages_on_https = settings_from_env(TRANSPORT, HARMONT_PUBLIC_URL="http://10.0.0.5:8000",
                                       HARMONT_APP_URL="https://app.ci.example.com", HARMONT_HSTS_SECONDS="600")
    assert pages_on_https["SESSION_COOKIE_SECURE"] is True and pages_on_https["SECURE_HSTS_SECONDS"] == 600
    local = settings_from_env(TRANSPORT, HARMONT_PUBLIC_URL="http://127.0.0.1:8000")
    assert local == {"SESSION_COOKIE_SECURE": False, "CSRF_COOKIE_SECURE": False, "SESSION_COOKIE_HTTPONLY": True,
                     "CSRF_COOKIE_HTTPONLY": True, "SECURE_HSTS_SECONDS": 0}


def test_the_session_and_csrf_cookies_are_secure_and_httponly_on_https(settings: Any, owner: User) -> None:
    settings.SESSION_COOKIE_SECURE = settings.CSRF_COOKIE_SECURE = True
    settings.SECURE_HSTS_SECONDS = 31536000
    browser = Client()
    form = browser.get("/login", secure=True)
    assert form["Strict-Transport-Security"] == "max-age=31536000"
    csrf = form.cookies["csrftoken"]
    assert csrf["secure"] and csrf["httponly"]
    signed_in = browser.post("/login", {"username": owner.email, "password": PASSWORD}, secure=True)
    session = signed_in.cookies["sessionid"]
    assert signed_in.status_code == 302 and session["secure"] and session["httponly"]


def test_plain_http_gets_no_hsts(client: Client) -> None:
    assert "Strict-Transport-Security" not in client.get("/login")


def csp_of(response: Any) -> dict[str, str]:
    header = response["Content-Security-Policy"]
    return {part.split()[0]: " ".join(part.split()[1:]) for part in header.split("; ")}


# A JSON data block (`json_script`) is not a script: browsers never run it, and CSP lets it be.
INLINE_SCRIPT = re.compile(r"<script(?![^>]*\b(?:src=|type=\"application/json\"))[^>]*>", re.IGNORECASE)
INLINE_STYLE = re.compile(r"<style\b|\sstyle=|\son[a-z]+=", re.IGNORECASE)


def assert_within_the_policy(response: Any, url: str) -> None:
    assert response.status_code == 200, url
    policy = csp_of(response)
    assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'", url
    assert policy["object-src"] == "'none'" and policy["frame-ancestors"] == "'none'", url
    page = response.content.decode()
    assert not INLINE_SCRIPT.search(page), (url, INLINE_SCRIPT.search(page))
    assert not INLINE_STYLE.search(page), (url, INLINE_STYLE.search(page))


def test_every_page_allows_only_the_servers_own_scripts_and_styles(owner: User, build: Build, settings: Any) -> None:
    settings.SIGNUP_ENABLED = True
    org, pipeline = build.pipeline.organization.slug, build.pipeline.slug
    assert_within_the_policy(Client().get("/login"), "/login")
    assert_within_the_policy(Client().get("/signup"), "/signup")
    browser = Client()
    browser.force_login(owner)
    for url in [f"/orgs/{org}/", f"/orgs/{org}/pipelines/{pipeline}/", f"/orgs/{org}/pipelines/{pipeline}/builds/1",
                f"/orgs/{org}/agents", "/settings/tokens", "/cli-login?port=5000&nonce=n", "/cli-login?paste=true",
                "/docs/errors/", "/docs/errors/build_not_found", "/api/v0/docs/"]:
        assert_within_the_policy(browser.get(url), url)


def test_the_cli_login_may_still_hand_over_to_the_cli_on_localhost(owner: User) -> None:
    browser = Client()
    browser.force_login(owner)
    assert "http://localhost:*" in csp_of(browser.get("/cli-login?port=5000&nonce=n"))["form-action"]


def test_the_admin_pages_carry_the_policy_too(owner: User) -> None:
    staff = Client()
    staff.force_login(User.objects.create_superuser(email="root@example.com", password="root-password-long"))
    for url in ["/admin/", "/admin/builds/build/", "/admin/organizations/user/"]:
        response = staff.get(url)
        assert response.status_code == 200 and csp_of(response)["script-src"] == "'self'", url
        assert not INLINE_SCRIPT.search(response.content.decode()), url


def test_api_answers_carry_no_page_policy(api: Any) -> None:
    assert "Content-Security-Policy" not in api.get("/api/v0/ping")
