"""Faults: what clients see while the database is away, and what the agent and the reaper do about it.

The slow tests (marked) run real server processes: one killed mid-run, one whose database is a
throwaway PostgreSQL cluster stopped for a while.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from django.contrib.sessions.middleware import SessionMiddleware
from django.db import InterfaceError, OperationalError, connection
from django.test import Client, RequestFactory

from builds import stream
from builds.models import Job
from harmont.errors import CATALOG
from harmont.logtokens import mint_log_token
from tests.helpers import AGENT, assert_error, builds_url, job_url


@pytest.fixture
def database_down(db) -> Any:
    """From here on every query fails as it does while the server is stopped (until `.undo()`).

    Its own patch, undone before the test database's teardown needs the connection again.
    """
    patch = pytest.MonkeyPatch()

    def arm(error: type[Exception] = OperationalError) -> None:
        def refused(*args: Any, **kwargs: Any) -> Any:
            raise error("connection to server at \"127.0.0.1\", port 5432 failed: Connection refused")

        patch.setattr(connection, "cursor", refused)

    arm.undo = patch.undo  # type: ignore[attr-defined]
    yield arm
    patch.undo()


def assert_unavailable(response: Any) -> None:
    error = assert_error(response, 503, "database_unavailable")
    assert error["type"] == "server_error"
    assert response["Retry-After"] == "2"


@pytest.mark.parametrize("error", [OperationalError, InterfaceError])
def test_rest_route_while_database_is_away_is_503_envelope(api, org, pipeline, database_down, error):
    database_down(error)
    assert_unavailable(api.get(builds_url(pipeline)))
    assert_unavailable(api.post(builds_url(pipeline), {"branch": "main", "commit": "HEAD"}, format="json"))


def test_agent_routes_while_database_is_away_are_503_envelopes(session, running, database_down):
    spec, job_client = running
    database_down()
    assert_unavailable(session.post(f"{AGENT}/claim"))
    assert_unavailable(job_client.post(job_url(spec["id"], "heartbeat"), {}, format="json"))
    assert_unavailable(job_client.post(job_url(spec["id"], "logs"),
                                       {"chunks": [{"seq": 1, "stream_kind": 0, "content": "x\n"}]}, format="json"))


def test_nothing_is_written_by_a_request_the_outage_refused(session, running, database_down):
    spec, job_client = running
    before = Job.objects.get(pk=spec["id"]).last_heartbeat_at
    database_down()
    assert_unavailable(job_client.post(job_url(spec["id"], "heartbeat"), {}, format="json"))
    database_down.undo()
    assert Job.objects.get(pk=spec["id"]).last_heartbeat_at == before


def test_page_while_database_is_away_is_503_envelope_not_html(owner, org, database_down):
    browser = Client(raise_request_exception=False)
    browser.force_login(owner)
    database_down()
    assert_unavailable(browser.get(f"/orgs/{org.slug}/"))


def test_failure_in_a_middleware_while_database_is_away_is_503_envelope(owner, org, monkeypatch):
    """The session is loaded in a middleware, before any view: Django's own 500 page would answer it."""
    browser = Client(raise_request_exception=False)
    browser.force_login(owner)

    def refused(self: SessionMiddleware, request: Any) -> None:
        raise OperationalError("the database system is shutting down")

    monkeypatch.setattr(SessionMiddleware, "process_request", refused)
    assert_unavailable(browser.get(f"/orgs/{org.slug}/"))
    assert_unavailable(browser.get("/api/v0/ping"))


def test_other_middleware_failures_stay_500(owner, org, monkeypatch):
    browser = Client(raise_request_exception=False)

    def broken(self: SessionMiddleware, request: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(SessionMiddleware, "process_request", broken)
    assert_error(browser.get("/api/v0/ping"), 500, "server_error")
    page = browser.get(f"/orgs/{org.slug}/")
    assert page.status_code == 500 and not page["Content-Type"].startswith("application/json")


def test_live_log_stream_while_database_is_away_is_503_flat_json(build, running, monkeypatch):
    spec, _ = running
    token = mint_log_token(build_id=build.pk).token

    def refused(*args: Any) -> bool:
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(stream, "may_open", refused)
    request = RequestFactory().get(f"/v0/jobs/{spec['id']}/logs", {"token": token})
    response = asyncio.run(stream.job_log_stream(request, spec["id"]))
    assert response.status_code == 503
    assert response["Content-Type"].startswith("application/json")
    assert response["Retry-After"] == "2"
    body = json.loads(response.content)
    assert body == {"code": "database_unavailable", "message": "The database is unavailable; retry shortly."}


def test_database_unavailable_is_in_the_catalog_with_a_page(client, db):
    assert CATALOG["database_unavailable"].type == "server_error"
    assert client.get("/docs/errors/database_unavailable").status_code == 200
