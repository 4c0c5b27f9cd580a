"""Serving the hm CLI's two host names from one process, behind a TLS-terminating proxy.

The CLI talks to `api.<domain>` and sends people to `app.<domain>`: the link it prints
after `hm run` (`{app}/{org}/pipelines/{pipeline}/builds/{n}`) reaches the build page,
and signing in on `https://app.<domain>` passes the CSRF origin check although the
proxy in front speaks plain http to us.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from builds.models import Build
from organizations.models import User
from tests.helpers import settings_from_env

pytestmark = pytest.mark.django_db

PASSWORD = "pw-123456-long"  # what conftest's make_user sets
API, APP = "https://api.ci.example.com", "https://app.ci.example.com"
HOST_SETTINGS = ("PUBLIC_URL", "APP_URL", "CSRF_TRUSTED_ORIGINS", "SECURE_PROXY_SSL_HEADER")


# ---------------------------------------------------------------- the link the CLI prints

def cli_link(build: Build) -> str:
    return f"/{build.pipeline.organization.slug}/pipelines/{build.pipeline.slug}/builds/{build.number}"


def page_of(build: Build) -> str:
    return f"/orgs/{build.pipeline.organization.slug}/pipelines/{build.pipeline.slug}/builds/{build.number}"


def test_the_cli_link_reaches_the_build_page(client: Client, owner: User, build: Build) -> None:
    client.force_login(owner)
    response = client.get(cli_link(build), follow=True)
    assert response.redirect_chain == [(page_of(build), 302)]
    assert response.status_code == 200 and f"#{build.number}" in response.content.decode()


def test_signed_out_people_sign_in_and_come_back_to_the_build(client: Client, owner: User, build: Build) -> None:
    response = client.get(cli_link(build), follow=True)
    assert response.redirect_chain[-1][0] == f"/login?next={page_of(build)}"
    response = client.post("/login", {"username": owner.email, "password": PASSWORD, "next": page_of(build)})
    assert response.status_code == 302 and response["Location"] == page_of(build)


def test_the_cli_link_of_another_organization_is_a_404_like_its_page(client: Client, stranger: User,
                                                                     other_org: Any, build: Build) -> None:
    client.force_login(stranger)
    assert client.get(cli_link(build), follow=True).status_code == 404


def test_the_cli_link_needs_a_build_number(client: Client, owner: User, build: Build) -> None:
    client.force_login(owner)
    assert client.get(cli_link(build).replace(f"/{build.number}", "/latest")).status_code == 404


# ---------------------------------------------------------------- the app host behind a proxy

def test_the_app_host_and_the_proxy_header_come_from_the_environment() -> None:
    read = settings_from_env(HOST_SETTINGS, HARMONT_PUBLIC_URL=f"{API}/", HARMONT_APP_URL=APP,
                             HARMONT_CSRF_TRUSTED_ORIGINS="https://ci.example.com",
                             HARMONT_SECURE_PROXY_SSL_HEADER="1")
    assert read == {"PUBLIC_URL": API, "APP_URL": APP, "CSRF_TRUSTED_ORIGINS": [API, APP, "https://ci.example.com"],
                    "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"]}
    alone = settings_from_env(HOST_SETTINGS, HARMONT_PUBLIC_URL=API, HARMONT_APP_URL="")
    assert alone["APP_URL"] == API and alone["CSRF_TRUSTED_ORIGINS"] == [API]
    assert alone["SECURE_PROXY_SSL_HEADER"] is None
    assert "HARMONT_APP_URL" in settings_from_env(HOST_SETTINGS, HARMONT_APP_URL="app.ci.example.com")["error"]


def sign_in_through_the_proxy(owner: User) -> Any:
    """What a browser on https://app.<domain> sends, as a TLS-terminating proxy passes it on over http."""
    browser = Client(enforce_csrf_checks=True, HTTP_HOST="app.ci.example.com", HTTP_X_FORWARDED_PROTO="https")
    form = browser.get("/login")
    assert form.status_code == 200
    token = form.context["csrf_token"]
    return browser.post("/login", {"username": owner.email, "password": PASSWORD, "csrfmiddlewaretoken": token},
                        HTTP_ORIGIN=APP, HTTP_REFERER=f"{APP}/login"), browser


@pytest.fixture
def app_host(settings: Any) -> Any:
    settings.ALLOWED_HOSTS = ["api.ci.example.com", "app.ci.example.com"]
    settings.PUBLIC_URL = API
    return settings


def test_signing_in_on_the_app_host_behind_a_tls_proxy_works_with_its_origin_trusted(app_host: Any,
                                                                                      owner: User) -> None:
    app_host.CSRF_TRUSTED_ORIGINS = [API, APP]  # HARMONT_APP_URL=https://app.ci.example.com
    response, browser = sign_in_through_the_proxy(owner)
    assert response.status_code == 302 and response["Location"] == "/"
    assert browser.session["_auth_user_id"] == str(owner.pk)


def test_signing_in_on_the_app_host_behind_a_tls_proxy_works_when_the_proxy_header_is_trusted(app_host: Any,
                                                                                            owner: User) -> None:
    app_host.CSRF_TRUSTED_ORIGINS = [API]
    app_host.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")  # HARMONT_SECURE_PROXY_SSL_HEADER=1
    response, _ = sign_in_through_the_proxy(owner)
    assert response.status_code == 302 and response["Location"] == "/"


def test_signing_in_on_an_untrusted_app_host_is_refused_as_an_expired_form(app_host: Any, owner: User) -> None:
    app_host.CSRF_TRUSTED_ORIGINS = [API]  # only HARMONT_PUBLIC_URL, as before HARMONT_APP_URL
    response, browser = sign_in_through_the_proxy(owner)
    assert response.status_code == 403 and "_auth_user_id" not in browser.session
