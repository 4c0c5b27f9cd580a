"""Structured logs: the json format, a line per request with who and where, the request id on every line
while a request is answered; the agent's lines name the job it runs."""

from __future__ import annotations

import json
import logging

import pytest

from builds.agent.runner import CURRENT_JOB, CurrentJob
from harmont.log_format import REQUEST_ID, JsonFormatter
from tests.helpers import AGENT, chunk, claim, job_url, settings_from_env, start


def formatted(record: logging.LogRecord) -> dict:
    return json.loads(JsonFormatter().format(record))


def test_a_record_is_one_json_object_with_its_extra_fields_and_the_request_id():
    record = logging.LogRecord("harmont.test", logging.WARNING, __file__, 1, "job %s lost", ("j1",), None)
    record.job_id = "j1"
    token = REQUEST_ID.set("req-7")
    try:
        line = JsonFormatter().format(record)
    finally:
        REQUEST_ID.reset(token)

    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "warning" and entry["logger"] == "harmont.test" and entry["message"] == "job j1 lost"
    assert (entry["job_id"], entry["request_id"]) == ("j1", "req-7")
    assert entry["time"].endswith("+00:00")


def test_an_exception_goes_in_one_line_too():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = formatted(record)
    assert "ValueError: boom" in entry["exception"] and "request_id" not in entry


def request_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "harmont.requests"]


@pytest.mark.django_db
def test_every_request_is_logged_with_its_route_status_duration_and_user(api, org, owner, caplog):
    caplog.set_level(logging.INFO, logger="harmont.requests")

    response = api.get(f"/api/v0/organizations/{org.slug}/pipelines", HTTP_X_REQUEST_ID="trace-123")

    [line] = request_lines(caplog)
    assert (line.method, line.route, line.status, line.user_id, line.organization) == (
        "GET", "/api/v0/organizations/<str:org>/pipelines", 200, owner.pk, org.slug)
    assert line.path == f"/api/v0/organizations/{org.slug}/pipelines"
    assert line.duration_ms > 0 and response["X-Request-Id"] == "trace-123"
    entry = formatted(line)
    assert entry["message"] == "request" and entry["status"] == 200


@pytest.mark.django_db
def test_agent_requests_name_the_agent_and_job(session, build, caplog):
    caplog.set_level(logging.INFO, logger="harmont.requests")
    spec, job_client = claim(session)
    start(job_client, spec["id"])
    job_client.post(job_url(spec["id"], "logs"), {"chunks": [chunk(1, "x")]}, format="json")

    claimed, started, logged = request_lines(caplog)
    agent = str(session.agent.pk)
    assert (claimed.route, claimed.agent_id, claimed.organization_id) == (
        "/api/v0/agent/claim", agent, session.agent.organization_id)
    assert (logged.agent_id, logged.job_id, logged.status) == (agent, spec["id"], 200)
    assert started.route == "/api/v0/agent/jobs/<str:job_id>/start"


@pytest.mark.django_db
def test_lines_logged_while_answering_carry_the_request_id(session, caplog):
    from harmont.logs import RequestLogMiddleware

    seen = []

    def view(request):
        from django.http import HttpResponse

        seen.append(REQUEST_ID.get())
        return HttpResponse("ok")

    from django.test import RequestFactory

    RequestLogMiddleware(view)(RequestFactory().get("/healthz", HTTP_X_REQUEST_ID="abc-1"))
    assert seen == ["abc-1"] and REQUEST_ID.get() is None


@pytest.mark.django_db
def test_plain_logs_leave_the_request_lines_out(session, caplog):
    caplog.set_level(logging.WARNING, logger="harmont.requests")
    session.post(f"{AGENT}/claim")
    assert request_lines(caplog) == []


def test_the_log_format_is_checked():
    assert "HARMONT_LOG_FORMAT must be plain or json" in settings_from_env(("LOG_FORMAT",),
                                                                           HARMONT_LOG_FORMAT="xml")["error"]
    assert settings_from_env(("LOG_FORMAT", "LOGGING"), HARMONT_LOG_FORMAT="json")["LOG_FORMAT"] == "json"


def test_the_agents_lines_name_the_job_it_runs():
    record = logging.LogRecord("agent", logging.INFO, __file__, 1, "uploading", (), None)
    CurrentJob().filter(record)
    assert record.job == ""
    CURRENT_JOB.id = "0f7a"
    try:
        CURRENT_JOB.filter(record)
    finally:
        CURRENT_JOB.id = None
    formatter = logging.Formatter("%(levelname)s %(job)s%(message)s")
    assert formatter.format(record) == "INFO job 0f7a: uploading"
