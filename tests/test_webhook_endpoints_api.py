"""`/api/v0/organizations/{org}/webhooks`: outbound webhook endpoints and their deliveries.

Admins and owners create, list and delete an organization's endpoints (members
get 403, anyone else 404); the signing secret is in the create answer only and
stored encrypted; the deliveries list shows every message recorded for an
endpoint with each attempt, in a constant number of queries. One test posts a
real message to a local HTTP server and verifies its Standard Webhooks signature.
"""

from __future__ import annotations

import base64
import http.server
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from builds.models import (
    Build,
    JobState,
    Notification,
    NotificationAttempt,
    NotificationChannel,
    NotificationStatus,
    WebhookEndpoint,
)
from builds.services import notifications
from builds.services.webhook_endpoints import MAX_ENDPOINTS_PER_ORGANIZATION
from harmont.crypto import decrypt_text
from organizations.models import IdempotencyKey, Organization
from pipelines.models import Pipeline
from tests.helpers import assert_error, iso, make_build, run_job

pytestmark = pytest.mark.django_db

HOOK = "https://hooks.example.com/harmont"


def hooks_url(org: Organization | str, suffix: str = "") -> str:
    return f"/api/v0/organizations/{getattr(org, 'slug', org)}/webhooks{suffix}"


def create(api: APIClient, org: Organization, **body: Any) -> Any:
    return api.post(hooks_url(org), {"url": HOOK, "events": ["build.created"], **body}, format="json")


def endpoint_json(endpoint: WebhookEndpoint) -> dict[str, Any]:
    return {"id": str(endpoint.pk), "url": endpoint.url, "events": endpoint.events,
            "description": endpoint.description, "created_at": iso(endpoint.created_at)}


# ---------------------------------------------------------------- create


def test_create_is_201_with_the_endpoint_and_its_secret(api: APIClient, org: Organization, owner: Any) -> None:
    response = create(api, org, events=["job.finished", "build.created", "job.finished"], description="Chat bot")
    assert response.status_code == 201, response.content
    endpoint = WebhookEndpoint.objects.get()
    body = response.json()
    secret = body["secret"]
    assert body == {**endpoint_json(endpoint), "secret": secret}
    # Duplicates dropped, in the order WebhookEvent lists them.
    assert body["events"] == ["build.created", "job.finished"] == endpoint.events
    assert (endpoint.organization, endpoint.url, endpoint.description, endpoint.created_by) == (
        org, HOOK, "Chat bot", owner)
    assert secret.startswith("whsec_") and len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    Webhook(secret)  # what a receiver verifies with


def test_admins_create_too_and_two_endpoints_get_different_secrets(admin_api: APIClient, org: Organization) -> None:
    first, second = create(admin_api, org), create(admin_api, org)
    assert first.status_code == second.status_code == 201
    assert first.json()["secret"] != second.json()["secret"]
    assert WebhookEndpoint.objects.filter(organization=org).count() == 2


def every_stored_text() -> str:
    """Every value of every row of every table, as text: where a leaked secret would be."""
    rows = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")
            rows += [repr(row) for row in cursor.fetchall()]
    return "\n".join(rows)


def test_the_secret_is_stored_encrypted_and_in_no_column_in_plain(api: APIClient, org: Organization) -> None:
    # With an Idempotency-Key, so that the kept answer is looked at too.
    response = api.post(hooks_url(org), {"url": HOOK, "events": ["build.finished"]}, format="json",
                        HTTP_IDEMPOTENCY_KEY="create-hook-1")
    assert response.status_code == 201
    secret = response.json()["secret"]
    endpoint = WebhookEndpoint.objects.get()
    assert decrypt_text(endpoint.secret_encrypted) == secret
    assert IdempotencyKey.objects.filter(key="create-hook-1").exists()
    stored = every_stored_text()
    assert secret not in stored and secret.removeprefix("whsec_") not in stored
    # Nor is it in what is read back afterwards.
    assert secret not in api.get(hooks_url(org)).content.decode()


def test_an_idempotent_create_retried_gets_the_first_answer_and_creates_nothing(api: APIClient,
                                                                                org: Organization) -> None:
    body = {"url": HOOK, "events": ["build.created"]}
    first = api.post(hooks_url(org), body, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    again = api.post(hooks_url(org), body, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first
    assert WebhookEndpoint.objects.count() == 1
    assert_error(api.post(hooks_url(org), {**body, "description": "other"}, format="json",
                          HTTP_IDEMPOTENCY_KEY="k-1"), 422, "idempotency_key_reused")
    # A refusal is kept as well: its retry is refused again, even once there is room.
    refused = api.post(hooks_url(org), {"url": "ftp://x", "events": ["build.created"]}, format="json",
                       HTTP_IDEMPOTENCY_KEY="k-2")
    assert_error(refused, 422, "webhook_endpoint_invalid")
    replay = api.post(hooks_url(org), {"url": "ftp://x", "events": ["build.created"]}, format="json",
                      HTTP_IDEMPOTENCY_KEY="k-2")
    assert replay.json() == refused.json() and replay["Idempotent-Replayed"] == "true"
    assert WebhookEndpoint.objects.count() == 1


@pytest.mark.parametrize(("body", "field"), [
    ({"url": "ftp://hooks.example.com/x"}, "url"),
    ({"url": "hooks.example.com/x"}, "url"),
    ({"url": "https:///x"}, "url"),
    ({"url": "https://user:pw@hooks.example.com/x"}, "url"),
    ({"url": "https://token@hooks.example.com/x"}, "url"),
    ({"url": "https://hooks.example.com:99999/x"}, "url"),
    ({"url": "https://hooks.example.com/a b"}, "url"),
    ({"url": "https://hooks.example.com/" + "x" * 2000}, "url"),
    ({"url": ""}, "url"),
    ({"url": None}, "url"),
    ({"url": 42}, "url"),
    ({"events": []}, "events"),
    ({"events": ["build.created", "push"]}, "events"),
    ({"events": "build.created"}, "events"),
    ({"events": None}, "events"),
    ({"description": "d" * 256}, "description"),
])
def test_bad_fields_are_422_with_fields_and_create_nothing(api: APIClient, org: Organization,
                                                           body: dict[str, Any], field: str) -> None:
    error = assert_error(api.post(hooks_url(org), {"url": HOOK, "events": ["build.created"], **body},
                                  format="json"), 422, "webhook_endpoint_invalid")
    assert error["type"] == "validation_failed" and list(error["fields"]) == [field], error
    assert not WebhookEndpoint.objects.exists()


def test_missing_fields_are_named(api: APIClient, org: Organization) -> None:
    error = assert_error(api.post(hooks_url(org), {}, format="json"), 422, "webhook_endpoint_invalid")
    assert set(error["fields"]) == {"url", "events"}
    assert not WebhookEndpoint.objects.exists()


def test_an_organization_has_at_most_twenty_endpoints(api: APIClient, org: Organization, other_org: Organization,
                                                      stranger_api: APIClient) -> None:
    for _ in range(MAX_ENDPOINTS_PER_ORGANIZATION):
        assert create(api, org).status_code == 201
    error = assert_error(create(api, org), 422, "webhook_limit")
    assert error["type"] == "validation_failed" and "20" in error["message"]
    assert WebhookEndpoint.objects.filter(organization=org).count() == MAX_ENDPOINTS_PER_ORGANIZATION
    assert create(stranger_api, other_org).status_code == 201  # per organization
    first = WebhookEndpoint.objects.filter(organization=org).order_by("created_at").first()
    assert api.delete(hooks_url(org, f"/{first.pk}")).status_code == 204
    assert create(api, org).status_code == 201


# ---------------------------------------------------------------- list and delete


def test_list_is_oldest_first_in_pages_without_secrets(api: APIClient, org: Organization, other_org: Organization,
                                                       stranger_api: APIClient) -> None:
    secrets = [create(api, org, description=f"hook {i}").json()["secret"] for i in range(3)]
    create(stranger_api, other_org)
    ours = list(WebhookEndpoint.objects.filter(organization=org).order_by("created_at", "pk"))
    first = api.get(hooks_url(org), {"limit": 2})
    assert first.status_code == 200
    assert first.json()["data"] == [endpoint_json(e) for e in ours[:2]]
    rest = api.get(hooks_url(org), {"limit": 2, "cursor": first.json()["next_cursor"]}).json()
    assert rest == {"data": [endpoint_json(ours[2])], "next_cursor": None}
    for page in (first.content.decode(), str(rest)):
        assert not any(secret in page for secret in secrets) and "secret" not in page
    assert_error(api.get(hooks_url(org), {"cursor": "nope"}), 400, "invalid_cursor")
    assert_error(api.get(hooks_url(org), {"limit": 0}), 400, "invalid_limit")


def test_list_query_count_does_not_grow_with_endpoints(api: APIClient, org: Organization,
                                                       django_assert_num_queries: Any) -> None:
    create(api, org)
    # token, membership, the page
    with django_assert_num_queries(3):
        assert len(api.get(hooks_url(org)).json()["data"]) == 1
    for _ in range(5):
        create(api, org)
    with django_assert_num_queries(3):
        assert len(api.get(hooks_url(org)).json()["data"]) == 6
    cursor = api.get(hooks_url(org), {"limit": 2}).json()["next_cursor"]
    with django_assert_num_queries(3):
        assert len(api.get(hooks_url(org), {"limit": 2, "cursor": cursor}).json()["data"]) == 2


def test_delete_is_204_and_a_second_delete_404(api: APIClient, org: Organization) -> None:
    endpoint_id = create(api, org).json()["id"]
    response = api.delete(hooks_url(org, f"/{endpoint_id}"))
    assert response.status_code == 204 and response.content == b""
    assert not WebhookEndpoint.objects.exists()
    assert_error(api.delete(hooks_url(org, f"/{endpoint_id}")), 404, "webhook_not_found")
    assert_error(api.delete(hooks_url(org, "/not-a-uuid")), 404, "webhook_not_found")


def test_delete_takes_the_endpoints_messages_with_it(api: APIClient, org: Organization, pipeline: Pipeline) -> None:
    keep = create(api, org, url="https://keep.example.com/").json()["id"]
    gone = create(api, org).json()["id"]
    make_build(pipeline)
    assert Notification.objects.filter(channel=NotificationChannel.WEBHOOK).count() == 2
    assert api.delete(hooks_url(org, f"/{gone}")).status_code == 204
    assert list(Notification.objects.values_list("endpoint_id", flat=True)) == [WebhookEndpoint.objects.get(pk=keep).pk]


def test_another_organizations_endpoint_is_404_and_stays(api: APIClient, org: Organization, other_org: Organization,
                                                         stranger_api: APIClient) -> None:
    theirs = create(stranger_api, other_org).json()["id"]
    assert_error(api.delete(hooks_url(org, f"/{theirs}")), 404, "webhook_not_found")
    assert_error(api.get(hooks_url(org, f"/{theirs}/deliveries")), 404, "webhook_not_found")
    for response in (api.get(hooks_url(other_org)), create(api, other_org),
                     api.delete(hooks_url(other_org, f"/{theirs}")),
                     api.get(hooks_url(other_org, f"/{theirs}/deliveries"))):
        assert_error(response, 404, "organization_not_found")
    assert WebhookEndpoint.objects.filter(pk=theirs).exists()
    assert WebhookEndpoint.objects.count() == 1


def test_members_are_refused_403(api: APIClient, member_api: APIClient, org: Organization) -> None:
    endpoint_id = create(api, org).json()["id"]
    for response in (member_api.get(hooks_url(org)), create(member_api, org),
                     member_api.delete(hooks_url(org, f"/{endpoint_id}")),
                     member_api.get(hooks_url(org, f"/{endpoint_id}/deliveries"))):
        error = assert_error(response, 403, "insufficient_org_role")
        assert "manage webhooks" in error["message"]
    assert WebhookEndpoint.objects.count() == 1


def test_no_credential_is_401(anon: APIClient, org: Organization) -> None:
    assert_error(anon.get(hooks_url(org)), 401, "unauthorized")
    assert_error(anon.post(hooks_url(org), {"url": HOOK, "events": ["build.created"]}, format="json"), 401,
                 "unauthorized")


# ---------------------------------------------------------------- deliveries


def subscribed(api: APIClient, org: Organization, *events: str, url: str = HOOK) -> tuple[WebhookEndpoint, str]:
    """A new endpoint of `org` for `events`, and its secret."""
    response = api.post(hooks_url(org), {"url": url, "events": list(events)}, format="json")
    assert response.status_code == 201, response.content
    return WebhookEndpoint.objects.get(pk=response.json()["id"]), response.json()["secret"]


def delivery_json(message: Notification) -> dict[str, Any]:
    build: Build = message.build
    return {
        "id": message.message_id, "event": message.event, "status": message.status, "attempts": message.attempts,
        "created_at": iso(message.created_at), "delivered_at": iso(message.delivered_at),
        "next_attempt_at": iso(message.due_at) if message.status == NotificationStatus.QUEUED else None,
        "last_error": message.last_error or None,
        "build": {"id": str(build.pk), "number": build.number, "pipeline_slug": build.pipeline.slug},
        "job_id": None if message.job_id is None else str(message.job_id), "payload": message.payload,
        "attempts_made": [{"at": iso(a.at), "status_code": a.status_code, "response_excerpt": a.response_excerpt,
                           "error": a.error, "duration_ms": a.duration_ms}
                          for a in message.attempts_made.order_by("at", "id")],
    }


def test_deliveries_are_newest_first_with_every_attempt(api: APIClient, org: Organization,
                                                        pipeline: Pipeline) -> None:
    endpoint, _ = subscribed(api, org, "build.created", "job.finished")
    other, _ = subscribed(api, org, "build.finished")
    build = make_build(pipeline)
    a, b = build.jobs.get(step_key="a"), build.jobs.get(step_key="b")
    run_job(a, JobState.FAILED, exit_code=1)  # b, which builds in a's files, is skipped with it
    created, a_finished, b_finished = Notification.objects.filter(endpoint=endpoint).order_by("id")
    assert [(m.event, m.job_id) for m in (created, a_finished, b_finished)] == [
        ("build.created", None), ("job.finished", a.pk), ("job.finished", b.pk)]
    now = timezone.now()
    NotificationAttempt.objects.create(notification=created, at=now - timedelta(seconds=20), status_code=500,
                                       response_excerpt="oops", duration_ms=12)
    NotificationAttempt.objects.create(notification=created, at=now - timedelta(seconds=10), error="timed out",
                                       duration_ms=10000)
    Notification.objects.filter(pk=created.pk).update(status=NotificationStatus.FAILED, attempts=2,
                                                      last_error="Gave up", due_at=None)
    created.refresh_from_db()

    page = api.get(hooks_url(org, f"/{endpoint.pk}/deliveries"))
    assert page.status_code == 200
    assert page.json() == {"data": [delivery_json(m) for m in (b_finished, a_finished, created)],
                           "next_cursor": None}
    data = page.json()["data"]
    assert data[1]["next_attempt_at"] == iso(a_finished.due_at) and data[1]["job_id"] == str(a.pk)
    assert data[1]["payload"]["type"] == "job.finished" and data[1]["payload"]["data"]["id"] == str(a.pk)
    assert data[1]["payload"]["data"]["state"] == "failed" and data[0]["payload"]["data"]["state"] == "skipped"
    assert [attempt["status_code"] for attempt in data[2]["attempts_made"]] == [500, None]
    assert data[2]["next_attempt_at"] is None and data[2]["last_error"] == "Gave up"
    # The other endpoint's messages are its own.
    theirs = api.get(hooks_url(org, f"/{other.pk}/deliveries")).json()["data"]
    assert [d["event"] for d in theirs] == ["build.finished"]

    seen, cursor = [], None
    while True:
        query = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        one = api.get(hooks_url(org, f"/{endpoint.pk}/deliveries"), query).json()
        seen.append([d["id"] for d in one["data"]])
        cursor = one["next_cursor"]
        if cursor is None:
            break
    assert seen == [[b_finished.message_id, a_finished.message_id], [created.message_id]]


def test_deliveries_of_an_unknown_endpoint_are_404(api: APIClient, org: Organization) -> None:
    assert_error(api.get(hooks_url(org, "/5f0c6a53-7c39-4c3e-9f53-1f1de2f7e0b1/deliveries")), 404,
                 "webhook_not_found")
    assert_error(api.get(hooks_url(org, "/nope/deliveries")), 404, "webhook_not_found")


@pytest.mark.parametrize("limit", [1, 50])
def test_deliveries_query_count_is_the_same_for_one_and_five(api: APIClient, org: Organization, pipeline: Pipeline,
                                                             django_assert_num_queries: Any, limit: int) -> None:
    endpoint, _ = subscribed(api, org, "build.created")
    url = hooks_url(org, f"/{endpoint.pk}/deliveries")

    def add_builds(n: int) -> None:
        for _ in range(n):
            message = Notification.objects.get(build=make_build(pipeline), endpoint=endpoint)
            for code in (500, 200):
                NotificationAttempt.objects.create(notification=message, status_code=code)

    add_builds(1)
    # token, membership, the endpoint, a page of messages with their builds, their attempts
    with django_assert_num_queries(5):
        assert len(api.get(url, {"limit": limit}).json()["data"]) == 1
    add_builds(4)
    with django_assert_num_queries(5):
        page = api.get(url, {"limit": limit}).json()
    data = page["data"]
    assert len(data) == min(5, limit) and all(len(d["attempts_made"]) == 2 for d in data)
    if page["next_cursor"]:  # a page further down costs the same
        with django_assert_num_queries(5):
            assert len(api.get(url, {"limit": limit, "cursor": page["next_cursor"]}).json()["data"]) == 1


# ---------------------------------------------------------------- a real delivery


class Receiver(http.server.BaseHTTPRequestHandler):
    """Keeps what it is sent; answers the status its server is told to."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((dict(self.headers.items()), body))  # type: ignore[attr-defined]
        answer = self.server.answer  # type: ignore[attr-defined]
        self.send_response(answer)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"thanks" if answer < 300 else b"not today")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def receiver() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    server.received, server.answer = [], 200  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_a_delivery_reaches_the_endpoint_signed_with_the_secret_the_create_returned(
        api: APIClient, org: Organization, pipeline: Pipeline, receiver: Any) -> None:
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hooks/harmont?via=test"
    endpoint, secret = subscribed(api, org, "build.created", url=url)
    build = make_build(pipeline)
    message = Notification.objects.get(endpoint=endpoint)

    receiver.answer = 503
    assert notifications.deliver_lane(lane=message.lane) == 0
    failed = api.get(hooks_url(org, f"/{endpoint.pk}/deliveries")).json()["data"][0]
    assert (failed["status"], failed["attempts"], failed["last_error"]) == ("queued", 1, "HTTP 503: not today")
    assert failed["next_attempt_at"] is not None
    assert [(a["status_code"], a["response_excerpt"]) for a in failed["attempts_made"]] == [(503, "not today")]

    receiver.answer = 200
    Notification.objects.filter(pk=message.pk).update(due_at=timezone.now())  # its backoff, over
    assert notifications.deliver_lane(lane=message.lane) == 1
    assert len(receiver.received) == 2
    headers, body = receiver.received[-1]
    assert Webhook(secret).verify(body, headers) == message.payload
    assert message.payload["type"] == "build.created" and message.payload["data"]["id"] == str(build.pk)
    assert headers["webhook-id"] == message.message_id == receiver.received[0][0]["webhook-id"]
    with pytest.raises(WebhookVerificationError):
        Webhook(base64.b64encode(b"\0" * 32).decode()).verify(body, headers)

    delivered = api.get(hooks_url(org, f"/{endpoint.pk}/deliveries")).json()["data"][0]
    message.refresh_from_db()
    assert delivered == delivery_json(message)
    assert (delivered["status"], delivered["attempts"], delivered["last_error"]) == ("delivered", 2, None)
    assert delivered["next_attempt_at"] is None and delivered["delivered_at"] is not None
    assert [a["status_code"] for a in delivered["attempts_made"]] == [503, 200]
