"""The webhooks page (`/orgs/<org>/webhooks`), an endpoint's deliveries page, and the admin of endpoints and notifications.

The page is for admins and owners like the agents page (a member gets 403, anyone
else 404); it creates an endpoint through the service and shows its secret once,
deletes one with a CSRF-protected POST, and lists an endpoint's newest deliveries
with every attempt. The admin adds endpoints through the same service (the
secret in a message once, never on the change page), shows every notification
with its attempts, and requeues failed ones.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django_tasks_db.models import DBTaskResult

from builds import services as build_services
from builds.models import (
    JobState,
    Notification,
    NotificationAttempt,
    NotificationChannel,
    NotificationStatus,
    WebhookEndpoint,
)
from harmont.crypto import decrypt_text
from organizations.models import Organization, User
from pipelines.models import Pipeline
from tests.helpers import make_build, run_job

pytestmark = pytest.mark.django_db

HOOK = "https://hooks.example.com/harmont"
SECRET_ON_PAGE = re.compile(r'data-testid="webhook-secret">(whsec_[A-Za-z0-9+/=]+)<')


def signed_in(user: User, *, csrf: bool = False) -> Client:
    client = Client(enforce_csrf_checks=csrf)
    client.force_login(user)
    return client


@pytest.fixture
def web(owner: User) -> Client:
    return signed_in(owner)


def text(response: Any) -> str:
    return response.content.decode()


def page_url(org: Organization, suffix: str = "") -> str:
    return f"/orgs/{org.slug}/webhooks{suffix}"


def endpoint_of(org: Organization, *events: str, url: str = HOOK) -> WebhookEndpoint:
    return build_services.create_webhook_endpoint(organization=org, url=url,
                                                  events=list(events) or ["build.created"]).endpoint


# ---------------------------------------------------------------- the webhooks page


def test_creating_an_endpoint_shows_its_secret_once(web: Client, org: Organization, owner: User) -> None:
    response = web.post(page_url(org), {"url": HOOK, "description": "Chat bot",
                                        "events": ["job.finished", "build.created"]})
    assert response.status_code == 200
    secret = SECRET_ON_PAGE.search(text(response))[1]
    endpoint = WebhookEndpoint.objects.get(organization=org)
    assert (endpoint.url, endpoint.description, endpoint.events, endpoint.created_by) == (
        HOOK, "Chat bot", ["build.created", "job.finished"], owner)
    assert decrypt_text(endpoint.secret_encrypted) == secret
    page = text(web.get(page_url(org)))
    assert HOOK in page and "Chat bot" in page and "build.created, job.finished" in page
    assert secret not in page and endpoint.secret_encrypted not in page and "webhook-secret" not in page


def test_the_form_offers_every_event_checked(web: Client, org: Organization) -> None:
    page = text(web.get(page_url(org)))
    for event in ("build.created", "build.started", "build.finished", "job.finished"):
        assert re.search(rf'<input type="checkbox" name="events" value="{re.escape(event)}"[^>]* checked', page), event


@pytest.mark.parametrize(("data", "message"), [
    ({"url": "ftp://hooks.example.com/x", "events": ["build.created"]}, "Must be an http:// or https:// URL."),
    ({"url": "https://me:pw@hooks.example.com/", "events": ["build.created"]}, "Must not contain a user name"),
    ({"url": "", "events": ["build.created"]}, "This field is required."),
    ({"url": HOOK}, "Must be a non-empty list of events"),
])
def test_a_bad_endpoint_is_422_with_the_reason_and_creates_nothing(web: Client, org: Organization,
                                                                   data: dict[str, Any], message: str) -> None:
    response = web.post(page_url(org), data)
    assert response.status_code == 422 and message in text(response)
    assert "webhook-secret" not in text(response)
    assert not WebhookEndpoint.objects.exists()


def test_the_twenty_first_endpoint_is_refused(web: Client, org: Organization) -> None:
    for i in range(20):
        endpoint_of(org, url=f"{HOOK}/{i}")
    response = web.post(page_url(org), {"url": HOOK, "events": ["build.created"]})
    assert response.status_code == 422 and "delete one before adding another" in text(response)
    assert WebhookEndpoint.objects.count() == 20


def test_the_list_counts_queued_and_failed_deliveries(web: Client, org: Organization, pipeline: Pipeline) -> None:
    endpoint = endpoint_of(org, "build.created")
    quiet = endpoint_of(org, "build.started", url="https://quiet.example.com/")
    for _ in range(3):
        make_build(pipeline)
    Notification.objects.filter(pk=Notification.objects.filter(endpoint=endpoint).order_by("id")[0].pk).update(
        status=NotificationStatus.FAILED)
    page = text(web.get(page_url(org)))
    row = page[page.index(f'data-endpoint-id="{endpoint.pk}"'):]
    row = row[:row.index("</tr>")]
    assert '<td data-label="Queued" data-count="queued">2</td>' in row
    assert '<td data-label="Failed" data-count="failed"><strong>1</strong></td>' in row
    row = page[page.index(f'data-endpoint-id="{quiet.pk}"'):]
    assert '<td data-label="Queued" data-count="queued">0</td>' in row[:row.index("</tr>")]


def test_the_page_query_count_does_not_grow_with_endpoints(web: Client, org: Organization, pipeline: Pipeline,
                                                           django_assert_num_queries: Any) -> None:
    endpoint_of(org)
    make_build(pipeline)
    # session, user, memberships, the endpoints with their counts (and creators)
    with django_assert_num_queries(4):
        assert web.get(page_url(org)).status_code == 200
    for i in range(5):
        endpoint_of(org, url=f"{HOOK}/{i}")
    make_build(pipeline)
    with django_assert_num_queries(4):
        assert text(web.get(page_url(org))).count("data-endpoint-id=") == 6


def test_delete_needs_its_csrf_token_and_deletes(owner: User, org: Organization) -> None:
    endpoint = endpoint_of(org)
    browser = signed_in(owner, csrf=True)
    refused = browser.post(page_url(org, f"/{endpoint.pk}/delete"))
    assert refused.status_code == 403 and "CSRF" in text(refused)
    assert browser.post(page_url(org), {"url": HOOK, "events": ["build.created"]}).status_code == 403
    assert WebhookEndpoint.objects.count() == 1
    page = text(browser.get(page_url(org)))
    # Every form carries its token: delete, new endpoint, and the menu's sign-out.
    assert page.count('method="post"') == page.count("csrfmiddlewaretoken") == 3
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)[1]
    response = browser.post(page_url(org, f"/{endpoint.pk}/delete"), {"csrfmiddlewaretoken": token}, follow=True)
    assert response.status_code == 200 and f"Deleted the webhook endpoint {HOOK}" in text(response)
    assert not WebhookEndpoint.objects.exists()
    assert browser.post(page_url(org, f"/{endpoint.pk}/delete"), {"csrfmiddlewaretoken": token}).status_code == 404


def test_delete_is_a_post(web: Client, org: Organization) -> None:
    endpoint = endpoint_of(org)
    assert web.get(page_url(org, f"/{endpoint.pk}/delete")).status_code == 405
    assert WebhookEndpoint.objects.count() == 1


def test_members_are_refused_and_strangers_find_nothing(org: Organization, member: User, stranger: User,
                                                        other_org: Organization, owner: User) -> None:
    endpoint = endpoint_of(org)
    member_web, stranger_web = signed_in(member), signed_in(stranger)
    for response in (member_web.get(page_url(org)),
                     member_web.post(page_url(org), {"url": HOOK, "events": ["build.created"]}),
                     member_web.post(page_url(org, f"/{endpoint.pk}/delete")),
                     member_web.get(page_url(org, f"/{endpoint.pk}"))):
        assert response.status_code == 403 and "Only admins and owners" in text(response)
    for response in (stranger_web.get(page_url(org)), stranger_web.post(page_url(org, f"/{endpoint.pk}/delete")),
                     stranger_web.get(page_url(org, f"/{endpoint.pk}"))):
        assert response.status_code == 404
    # Another organization's endpoint through one's own organization: not found either.
    theirs = endpoint_of(other_org)
    web = signed_in(owner)
    assert web.get(page_url(org, f"/{theirs.pk}")).status_code == 404
    assert web.post(page_url(org, f"/{theirs.pk}/delete")).status_code == 404
    assert WebhookEndpoint.objects.count() == 2
    # Signed out: to the sign-in page.
    assert Client().get(page_url(org))["Location"].startswith("/login?next=")


def test_the_nav_links_the_page_for_admins_only(web: Client, org: Organization, member: User,
                                                admin_user: User) -> None:
    link = f'href="/orgs/{org.slug}/webhooks"'
    assert link in text(web.get(f"/orgs/{org.slug}/"))
    assert link in text(signed_in(admin_user).get(f"/orgs/{org.slug}/"))
    assert link not in text(signed_in(member).get(f"/orgs/{org.slug}/"))


# ---------------------------------------------------------------- an endpoint's deliveries


def test_the_deliveries_page_shows_the_newest_with_their_builds_and_attempts(web: Client, org: Organization,
                                                                            pipeline: Pipeline) -> None:
    endpoint = endpoint_of(org, "build.created", "job.finished")
    build = make_build(pipeline)
    run_job(build.jobs.get(step_key="a"), JobState.PASSED)
    created = Notification.objects.get(endpoint=endpoint, event="build.created")
    NotificationAttempt.objects.create(notification=created, status_code=502, response_excerpt="Bad gateway here",
                                       duration_ms=31)
    NotificationAttempt.objects.create(notification=created, error="no answer within 10 s", duration_ms=10000)
    Notification.objects.filter(pk=created.pk).update(status=NotificationStatus.FAILED, attempts=2,
                                                      last_error="Gave up after 2 attempts")
    page = text(web.get(page_url(org, f"/{endpoint.pk}")))
    ids = re.findall(r'<tr data-message-id="(msg_[0-9a-f]+)"', page)
    assert ids == list(Notification.objects.filter(endpoint=endpoint).order_by("-id")
                       .values_list("message_id", flat=True))
    row = page[page.index(f'data-message-id="{created.message_id}"'):]
    row = row[:row.index("</tr>")]
    assert 'data-state="failed"' in row and "Gave up after 2 attempts" in row and "build.created" in row
    assert f'href="/orgs/{org.slug}/pipelines/{pipeline.slug}/builds/{build.number}"' in row
    assert "HTTP 502" in row and "Bad gateway here" in row and "31 ms" in row
    assert "no answer" in row and "no answer within 10 s" in row
    assert row.index("HTTP 502") < row.index("no answer within 10 s")  # oldest attempt first
    job_row = page[page.index(f'data-message-id="{ids[0]}"'):]
    assert "job.finished" in job_row[:job_row.index("</tr>")] and 'data-state="queued"' in job_row


def test_the_deliveries_page_shows_fifty_in_constant_queries(web: Client, org: Organization, pipeline: Pipeline,
                                                             django_assert_num_queries: Any) -> None:
    endpoint = endpoint_of(org, "build.created")
    build = make_build(pipeline)
    url = page_url(org, f"/{endpoint.pk}")
    # session, user, memberships, the endpoint, its messages with their builds, their attempts
    with django_assert_num_queries(6):
        assert web.get(url).status_code == 200
    first = Notification.objects.get(endpoint=endpoint)
    Notification.objects.bulk_create([
        Notification(message_id=f"msg_{i:032x}", organization=org, build=build, channel=NotificationChannel.WEBHOOK,
                     endpoint=endpoint, lane=first.lane, event="build.created", payload={}) for i in range(55)])
    for message in Notification.objects.filter(endpoint=endpoint):
        NotificationAttempt.objects.create(notification=message, status_code=500)
    with django_assert_num_queries(6):
        page = text(web.get(url))
    assert page.count("<tr data-message-id=") == 50 and first.message_id not in page


# ---------------------------------------------------------------- the admin


@pytest.fixture
def ops(db: Any) -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("ops@example.com", "a-long-passphrase"))
    return client


def admin_url(model: type, action: str, *args: Any) -> str:
    return reverse(f"admin:builds_{model._meta.model_name}_{action}", args=args)


def test_the_admin_adds_an_endpoint_through_the_service_and_shows_its_secret_once(ops: Client,
                                                                                  org: Organization) -> None:
    form = ops.get(admin_url(WebhookEndpoint, "add"))
    assert form.status_code == 200 and "secret" not in form.context["adminform"].form.fields
    response = ops.post(admin_url(WebhookEndpoint, "add"), {
        "organization": org.pk, "url": HOOK, "events": ["build.finished", "build.created"],
        "description": "From the admin", "_save": "Save"}, follow=True)
    assert response.status_code == 200
    endpoint = WebhookEndpoint.objects.get()
    shown = [str(m) for m in response.context["messages"]]
    secret = re.search(r"(whsec_[A-Za-z0-9+/=]+)", " ".join(shown))[1]
    assert decrypt_text(endpoint.secret_encrypted) == secret
    assert (endpoint.organization, endpoint.events, endpoint.description) == (
        org, ["build.created", "build.finished"], "From the admin")
    change = text(ops.get(admin_url(WebhookEndpoint, "change", endpoint.pk)))
    listing = text(ops.get(admin_url(WebhookEndpoint, "changelist")))
    for page in (change, listing):
        assert secret not in page and endpoint.secret_encrypted not in page
    assert HOOK in listing


def test_the_admin_refuses_a_bad_endpoint(ops: Client, org: Organization) -> None:
    response = ops.post(admin_url(WebhookEndpoint, "add"), {"organization": org.pk, "url": "https://a:b@x.example/",
                                                            "description": "", "_save": "Save"})
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert errors["url"] == ["Must not contain a user name or password."]
    assert errors["events"][0].startswith("Must be a non-empty list of events")
    assert not WebhookEndpoint.objects.exists()


def test_the_admin_edits_url_events_and_description_but_never_the_secret(ops: Client, org: Organization) -> None:
    endpoint = endpoint_of(org)
    before = endpoint.secret_encrypted
    form = ops.get(admin_url(WebhookEndpoint, "change", endpoint.pk)).context["adminform"].form
    assert set(form.fields) == {"url", "events", "description"}
    response = ops.post(admin_url(WebhookEndpoint, "change", endpoint.pk), {
        "url": "https://moved.example.com/hook", "events": ["job.finished"], "description": "moved",
        "secret_encrypted": "tampered", "_save": "Save"})
    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else ""
    endpoint.refresh_from_db()
    assert (endpoint.url, endpoint.events, endpoint.description, endpoint.secret_encrypted, endpoint.organization) == (
        "https://moved.example.com/hook", ["job.finished"], "moved", before, org)
    bad = ops.post(admin_url(WebhookEndpoint, "change", endpoint.pk), {"url": "mailto:x@y", "events": ["job.finished"],
                                                                      "description": "", "_save": "Save"})
    assert bad.status_code == 200 and "url" in bad.context["adminform"].form.errors
    endpoint.refresh_from_db()
    assert endpoint.url == "https://moved.example.com/hook"


def test_every_attempt_of_a_notification_is_on_its_admin_page(ops: Client, org: Organization,
                                                              pipeline: Pipeline) -> None:
    endpoint = endpoint_of(org)
    make_build(pipeline)
    message = Notification.objects.get(endpoint=endpoint)
    NotificationAttempt.objects.create(notification=message, status_code=418, response_excerpt="short and stout",
                                       duration_ms=7)
    NotificationAttempt.objects.create(notification=message, error="ConnectionRefusedError: refused", duration_ms=1)
    page = text(ops.get(admin_url(Notification, "change", message.pk)))
    for shown in ("418", "short and stout", "ConnectionRefusedError: refused", message.lane, message.message_id):
        assert shown in page, shown
    assert page.index("short and stout") < page.index("ConnectionRefusedError")
    listing = ops.get(admin_url(Notification, "changelist"), {"q": message.message_id})
    assert listing.context["cl"].result_count == 1
    assert ops.get(admin_url(Notification, "changelist"), {"status": "queued", "channel": "webhook",
                                                           "event": "build.created"}).context["cl"].result_count == 1


def test_try_again_now_requeues_failed_messages_and_hands_their_lanes_over(
        ops: Client, org: Organization, pipeline: Pipeline, django_capture_on_commit_callbacks: Any) -> None:
    endpoint = endpoint_of(org)
    failed, delivered, posting = (Notification.objects.get(endpoint=endpoint, build=make_build(pipeline))
                                  for _ in range(3))
    long_ago, soon = timezone.now() - timedelta(days=2), timezone.now() + timedelta(minutes=4)
    Notification.objects.filter(pk=failed.pk).update(status=NotificationStatus.FAILED, due_at=None, sweep_at=None,
                                                     claimed_until=long_ago, last_error="Gave up", attempts=9)
    Notification.objects.filter(pk=delivered.pk).update(status=NotificationStatus.DELIVERED, due_at=None,
                                                        delivered_at=long_ago)
    # A task is posting this one right now: a second post of its lane must not start beside it.
    Notification.objects.filter(pk=posting.pk).update(claimed_until=soon, due_at=long_ago)
    DBTaskResult.objects.all().delete()
    before = timezone.now()
    with django_capture_on_commit_callbacks(execute=True):
        response = ops.post(admin_url(Notification, "changelist"), {
            "action": "try_again_now", "_selected_action": [failed.pk, delivered.pk, posting.pk]}, follow=True)
    assert response.status_code == 200
    assert "1 message(s) queued" in " ".join(str(m) for m in response.context["messages"])
    for message in (failed, delivered, posting):
        message.refresh_from_db()
    assert failed.status == NotificationStatus.QUEUED and failed.claimed_until is None
    assert before <= failed.due_at <= timezone.now() and failed.sweep_at > failed.due_at
    assert failed.attempts == 9  # its history stays
    assert (delivered.status, delivered.due_at) == (NotificationStatus.DELIVERED, None)
    assert (posting.claimed_until, posting.due_at) == (soon, long_ago)
    tasks = list(DBTaskResult.objects.filter(task_path__endswith="deliver_notifications"))
    assert [task.args_kwargs["args"] for task in tasks] == [[failed.lane]]
