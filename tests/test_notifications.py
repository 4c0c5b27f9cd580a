"""Commit statuses and outbound webhook events: what each build and job event records, and how lanes go out.

The receiver is `outbound.post` replaced by a recorder here (tests/test_outbound_post.py
posts for real, tests/test_pull_request_loop_e2e.py runs it all with real processes).
"""

from __future__ import annotations

import base64
import json
import os
from datetime import timedelta
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from builds import services
from builds.models import Build, Job, JobState, Notification, NotificationAttempt, WebhookEndpoint
from builds.serializers import build_data
from builds.services import notifications
from builds.outbound import Answer
from harmont.crypto import encrypt_text
from pipelines.models import Repository
from tests.helpers import assert_error, claim, job_url, make_build, run_job

pytestmark = pytest.mark.django_db

SHA = "a" * 40
ALL_EVENTS = ["build.created", "build.started", "build.finished", "job.finished"]


@pytest.fixture
def repository(org) -> Repository:
    """The pipeline fixture's repository (acme/web), registered with a GitHub token."""
    return Repository.objects.create(organization=org, url="https://github.com/acme/web.git", repo_name="acme/web",
                                     github_token_encrypted=encrypt_text("ghp_test_token"))


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def endpoint(org, events=ALL_EVENTS, url="http://hooks.example.test/in", secret=None) -> WebhookEndpoint:
    made = WebhookEndpoint.objects.create(organization=org, url=url, events=list(events),
                                          secret_encrypted=encrypt_text(secret or new_secret()))
    made.raw_secret = secret
    return made


class Receiver:
    """Stands in for `outbound.post`: records each request and answers what it is told."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answers: list[int] = []  # status codes to give, in turn; then 201

    def __call__(self, url: str, *, headers: dict[str, str], body: bytes, timeout: float,
                 public_only: bool = False) -> Answer:
        self.requests.append({"url": url, "headers": headers, "body": body, "public_only": public_only})
        code = self.answers.pop(0) if self.answers else 201
        return Answer(code, "nope" if code >= 300 else "{}", "", 5)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(request["body"]) for request in self.requests]


@pytest.fixture
def receiver(monkeypatch) -> Receiver:
    fake = Receiver()
    monkeypatch.setattr(notifications.outbound, "post", fake)
    monkeypatch.setattr(notifications, "enqueue_lanes", lambda lanes, run_after=None: None)
    return fake


def lane_messages(build: Build, channel: str) -> list[Notification]:
    return list(Notification.objects.filter(build=build, channel=channel).order_by("id"))


def run_build(build: Build, *, fail: str | None = None) -> None:
    for job in Job.objects.filter(build=build).order_by("position"):
        job.refresh_from_db()
        if job.state == JobState.SCHEDULED:
            failed = job.step_key == fail
            run_job(job, JobState.FAILED if failed else JobState.PASSED, 1 if failed else 0)


# ------------------------------------------------------------------ what events record


def test_a_build_of_a_repository_with_a_github_token_records_its_statuses(pipeline, repository, settings):
    build = make_build(pipeline, commit=SHA)
    run_build(build)

    statuses = lane_messages(build, "commit_status")
    assert [(s.event, s.payload["state"]) for s in statuses] == [
        ("build.created", "pending"), ("build.started", "pending"), ("build.finished", "success")]
    assert statuses[-1].payload == {
        "state": "success", "description": "Build #1 passed", "context": "harmont/web-ci",
        "target_url": f"{settings.PUBLIC_URL}/orgs/{pipeline.organization.slug}/pipelines/web-ci/builds/1"}
    assert {s.lane for s in statuses} == {f"commit_status:{repository.pk}:{build.pk}"}
    assert all(s.status == "queued" and s.repository_id == repository.pk for s in statuses)


def test_failed_and_canceled_builds_end_in_failure_and_error(pipeline, repository):
    failed = make_build(pipeline, commit=SHA)
    run_build(failed, fail="a")
    canceled = make_build(pipeline, commit=SHA)
    services.cancel_build(build=canceled)

    assert lane_messages(failed, "commit_status")[-1].payload["state"] == "failure"
    assert lane_messages(canceled, "commit_status")[-1].payload["state"] == "error"
    assert lane_messages(canceled, "commit_status")[-1].payload["description"] == "Build #2 was canceled"


def test_no_token_or_no_registered_repository_means_no_statuses(pipeline, org):
    build = make_build(pipeline, commit=SHA)
    Repository.objects.create(organization=org, url="https://github.com/acme/web.git", repo_name="acme/web")
    other = make_build(pipeline, commit=SHA)
    run_build(other)

    assert not Notification.objects.filter(build__in=[build, other]).exists()


def test_a_rejected_plan_is_created_and_finished_at_once(pipeline, repository, org):
    hook = endpoint(org, events=["build.created", "build.finished"])
    with pytest.raises(services.builds.BuildPlanRejected):
        make_build(pipeline, commit=SHA, pipeline_ir={"version": "9"})
    build = Build.objects.get()

    assert [(n.channel, n.event) for n in Notification.objects.order_by("id")] == [
        ("webhook", "build.created"), ("commit_status", "build.created"),
        ("webhook", "build.finished"), ("commit_status", "build.finished")]
    assert lane_messages(build, "commit_status")[-1].payload["state"] == "failure"
    assert Notification.objects.filter(endpoint=hook).last().payload["data"]["state"] == "failed"


def test_webhook_events_carry_the_build_and_job_json_in_order(pipeline, org, api):
    hook = endpoint(org)
    build = make_build(pipeline, commit=SHA)
    run_build(build)

    messages = lane_messages(build, "webhook")
    assert [m.event for m in messages] == [
        "build.created", "build.started", "job.finished", "job.finished", "build.finished"]
    assert {m.lane for m in messages} == {f"webhook:{hook.pk}:{build.pk}"}
    assert len({m.message_id for m in messages}) == 5
    build.refresh_from_db()
    finished = messages[-1].payload
    assert finished["type"] == "build.finished" and finished["organization"] == org.slug
    assert finished["data"] == build_data(Build.objects.select_related("pipeline").get(pk=build.pk))
    job = Job.objects.get(build=build, step_key="b")
    api_job = api.get(f"/api/v0/organizations/{org.slug}/pipelines/{pipeline.slug}/builds/1/jobs/{job.pk}").json()
    job_event = messages[3].payload
    assert job_event["data"] == api_job
    assert job_event["build"] == {"id": str(build.pk), "number": 1, "pipeline_slug": "web-ci", "state": "running"}


def test_an_endpoint_gets_only_the_events_it_subscribed_and_only_its_organization(pipeline, org, other_org):
    finished_only = endpoint(org, events=["build.finished"])
    elsewhere = endpoint(other_org)
    build = make_build(pipeline, commit=SHA)
    run_build(build)

    assert [m.event for m in Notification.objects.filter(endpoint=finished_only)] == ["build.finished"]
    assert not Notification.objects.filter(endpoint=elsewhere).exists()


def test_jobs_skipped_after_a_failure_and_canceled_jobs_are_finished_too(pipeline, org):
    endpoint(org, events=["job.finished"])
    build = make_build(pipeline, commit=SHA)
    run_build(build, fail="a")  # b builds in a: skipped
    canceled = make_build(pipeline, commit=SHA)
    services.cancel_build(build=canceled)

    assert [(m.payload["data"]["step_key"], m.payload["data"]["state"]) for m in lane_messages(build, "webhook")] == [
        ("a", "failed"), ("b", "skipped")]
    assert [(m.payload["data"]["step_key"], m.payload["data"]["state"])
            for m in lane_messages(canceled, "webhook")] == [("a", "canceled"), ("b", "canceled")]


def test_a_retried_finished_build_goes_back_to_pending(pipeline, repository, org):
    build = make_build(pipeline, commit=SHA)
    run_build(build, fail="a")
    services.retry_job(job=Job.objects.get(build=build, step_key="a"))

    last = lane_messages(build, "commit_status")[-1]
    assert (last.event, last.payload["state"]) == ("build.reopened", "pending")


# ------------------------------------------------------------------ delivering a lane


def test_a_lane_goes_out_in_order_with_standard_webhooks_signatures(pipeline, org, receiver):
    secret = new_secret()
    hook = endpoint(org, secret=secret)
    build = make_build(pipeline, commit=SHA)
    run_build(build)

    assert notifications.deliver_lane(lane=f"webhook:{hook.pk}:{build.pk}") == 5

    assert [body["type"] for body in receiver.bodies()] == [m.event for m in lane_messages(build, "webhook")]
    for request, message in zip(receiver.requests, lane_messages(build, "webhook")):
        assert request["url"] == hook.url and request["headers"]["webhook-id"] == message.message_id
        assert Webhook(secret).verify(request["body"], request["headers"]) == message.payload
    assert all(m.status == "delivered" and m.attempts == 1 for m in lane_messages(build, "webhook"))
    assert NotificationAttempt.objects.filter(status_code=201).count() == 5


def test_a_failure_holds_the_rest_of_its_lane_until_a_retry_gets_through(pipeline, org, receiver, settings):
    settings.DELIVERY_RETRY_SECONDS = 10
    hook = endpoint(org, events=["build.created", "build.finished"])
    build = make_build(pipeline, commit=SHA)
    run_build(build)
    lane = f"webhook:{hook.pk}:{build.pk}"
    first, second = lane_messages(build, "webhook")
    receiver.answers = [500, 503]
    now = first.created_at + timedelta(seconds=1)

    assert notifications.deliver_lane(lane=lane, now=now) == 0
    first.refresh_from_db()
    assert (first.status, first.attempts, first.due_at) == ("queued", 1, now + timedelta(milliseconds=5, seconds=10))
    assert first.last_error == "HTTP 500: nope" and first.claimed_until is None
    assert notifications.deliver_lane(lane=lane, now=now + timedelta(seconds=5)) == 0  # not due yet
    assert len(receiver.requests) == 1

    assert notifications.deliver_lane(lane=lane, now=now + timedelta(seconds=11)) == 0  # 503: next wait doubles
    first.refresh_from_db()
    assert first.due_at == now + timedelta(seconds=11, milliseconds=5) + timedelta(seconds=20)
    assert notifications.deliver_lane(lane=lane, now=now + timedelta(seconds=40)) == 2

    assert [json.loads(r["body"])["type"] for r in receiver.requests] == [
        "build.created", "build.created", "build.created", "build.finished"]
    assert len({r["headers"]["webhook-id"] for r in receiver.requests[:3]}) == 1  # the same id every time
    assert list(NotificationAttempt.objects.filter(notification=first).order_by("at")
                .values_list("status_code", flat=True)) == [500, 503, 201]
    second.refresh_from_db()
    assert second.status == "delivered"


def test_retries_double_up_to_each_channels_longest_wait(settings):
    settings.DELIVERY_RETRY_SECONDS = 10
    webhook = [notifications.retry_delay("webhook", n).total_seconds() for n in (1, 2, 3, 9, 10, 40)]
    status = [notifications.retry_delay("commit_status", n).total_seconds() for n in (1, 5, 6, 40)]

    assert webhook == [10, 20, 40, 2560, 3600, 3600]
    assert status == [10, 160, 300, 300]


def test_a_webhook_is_tried_for_a_day_and_a_status_for_an_hour(pipeline, org, repository, receiver):
    hook = endpoint(org, events=["build.created"])
    build = make_build(pipeline, commit=SHA)
    webhook, = lane_messages(build, "webhook")
    status, = lane_messages(build, "commit_status")
    receiver.answers = [500] * 10

    notifications.deliver_lane(lane=webhook.lane, now=webhook.created_at + timedelta(hours=24, seconds=-1))
    webhook.refresh_from_db()
    assert webhook.status == "queued" and webhook.due_at == webhook.created_at + timedelta(hours=24)
    notifications.deliver_lane(lane=webhook.lane, now=webhook.created_at + timedelta(hours=24))
    webhook.refresh_from_db()
    assert webhook.status == "failed" and webhook.last_error.startswith("Gave up after 2 attempts")

    notifications.deliver_lane(lane=status.lane, now=status.created_at + timedelta(hours=1, seconds=-1))
    status.refresh_from_db()
    assert status.due_at == status.created_at + timedelta(hours=1)
    notifications.deliver_lane(lane=status.lane, now=status.created_at + timedelta(hours=1))
    status.refresh_from_db()
    assert status.status == "failed"
    assert hook.notifications.count() == 1


def test_statuses_not_yet_posted_are_superseded_by_the_newest(pipeline, repository, receiver):
    build = make_build(pipeline, commit=SHA)
    run_build(build)

    assert notifications.deliver_lane(lane=f"commit_status:{repository.pk}:{build.pk}") == 1

    request, = receiver.requests
    assert request["url"] == f"https://api.github.com/repos/acme/web/statuses/{SHA}"
    assert request["headers"]["Authorization"] == "Bearer ghp_test_token"
    assert request["headers"]["Accept"] == "application/vnd.github+json"
    assert json.loads(request["body"])["state"] == "success"
    assert [m.status for m in lane_messages(build, "commit_status")] == ["superseded", "superseded", "delivered"]


def test_the_github_api_url_setting_is_where_statuses_go(pipeline, repository, receiver, settings):
    settings.GITHUB_API_URL = "https://ghe.example.test/api/v3"
    build = make_build(pipeline, commit=SHA)
    notifications.deliver_lane(lane=f"commit_status:{repository.pk}:{build.pk}")

    assert receiver.requests[0]["url"] == f"https://ghe.example.test/api/v3/repos/acme/web/statuses/{SHA}"


def test_a_head_build_waits_for_the_commit_its_agent_checks_out(pipeline, repository, receiver, session, api, org):
    build = make_build(pipeline, commit="HEAD")
    lane = f"commit_status:{repository.pk}:{build.pk}"
    assert notifications.deliver_lane(lane=lane) == 0
    waiting, = lane_messages(build, "commit_status")
    assert (waiting.status, waiting.due_at, waiting.sweep_at) == ("queued", None, None)
    assert receiver.requests == []

    spec, job_client = claim(session)
    response = job_client.post(job_url(spec["id"], "start"), {"commit": SHA}, format="json")
    assert response.status_code == 200, response.content
    waiting.refresh_from_db()
    assert waiting.due_at is not None
    assert api.get(f"/api/v0/organizations/{org.slug}/pipelines/{pipeline.slug}/builds/1").json()["commit"] == SHA

    assert notifications.deliver_lane(lane=lane) == 1  # the started status; it supersedes the created one
    assert receiver.requests[0]["url"].endswith(f"/statuses/{SHA}")
    assert [s.status for s in lane_messages(build, "commit_status")] == ["superseded", "delivered"]


def test_an_agents_commit_report_never_replaces_a_full_commit_id(pipeline, session):
    build = make_build(pipeline, commit=SHA)
    spec, job_client = claim(session)
    response = job_client.post(job_url(spec["id"], "start"), {"commit": "b" * 40}, format="json")

    assert response.status_code == 200
    build.refresh_from_db()
    assert build.commit == SHA
    assert not services.record_checked_out_commit(build_id=build.pk, commit="c" * 40)


def test_a_commit_report_that_is_no_full_id_is_refused(pipeline, session):
    build = make_build(pipeline, commit="HEAD")
    spec, job_client = claim(session)

    response = job_client.post(job_url(spec["id"], "start"), {"commit": "abc123"}, format="json")

    assert_error(response, 422, "validation_failed")
    build.refresh_from_db()
    assert build.commit == "HEAD"
    assert Job.objects.get(pk=spec["id"]).state == JobState.ASSIGNED


def test_a_head_build_that_ends_without_a_checkout_fails_its_statuses(pipeline, repository, receiver):
    build = make_build(pipeline, commit="HEAD")
    services.cancel_build(build=build)

    notifications.deliver_lane(lane=f"commit_status:{repository.pk}:{build.pk}")

    assert receiver.requests == []
    statuses = lane_messages(build, "commit_status")
    assert [s.status for s in statuses] == ["superseded", "failed"]
    assert "without checking out a commit" in statuses[-1].last_error


def test_a_message_another_task_holds_is_left_alone(pipeline, org, receiver):
    hook = endpoint(org, events=["build.created"])
    build = make_build(pipeline, commit=SHA)
    message, = lane_messages(build, "webhook")
    Notification.objects.filter(pk=message.pk).update(claimed_until=message.created_at + timedelta(minutes=5))

    assert notifications.deliver_lane(lane=message.lane, now=message.created_at + timedelta(seconds=1)) == 0
    assert receiver.requests == []
    # Its claim ran out (the task died after posting, before recording): posted again, same id.
    assert notifications.deliver_lane(lane=message.lane, now=message.created_at + timedelta(minutes=6)) == 1
    assert receiver.requests[0]["headers"]["webhook-id"] == message.message_id
    assert hook.notifications.get().status == "delivered"


def test_the_sweep_hands_over_lanes_whose_task_was_lost_once(pipeline, org, monkeypatch):
    handed: list[list[str]] = []
    monkeypatch.setattr(notifications, "enqueue_lanes", lambda lanes, run_after=None: handed.append(list(lanes)))
    endpoint(org)
    build = make_build(pipeline, commit=SHA)
    message, = lane_messages(build, "webhook")
    later = message.sweep_at + timedelta(seconds=1)

    assert services.sweep_notifications(now=message.sweep_at - timedelta(seconds=1)) == 0
    assert services.sweep_notifications(now=later) == 1
    assert services.sweep_notifications(now=later) == 0  # its sweep time moved on by a lease
    assert handed[1] == [message.lane]
    message.refresh_from_db()
    assert message.sweep_at == later + timedelta(seconds=300)


def test_an_endpoint_deleted_mid_lane_takes_its_messages_with_it(pipeline, org, receiver):
    hook = endpoint(org)
    build = make_build(pipeline, commit=SHA)
    lane = f"webhook:{hook.pk}:{build.pk}"
    hook.delete()

    assert notifications.deliver_lane(lane=lane) == 0
    assert not Notification.objects.exists() and receiver.requests == []


def test_events_are_recorded_with_their_transaction_and_enqueued_after_commit(pipeline, org, monkeypatch,
                                                                                django_capture_on_commit_callbacks):
    handed: list[list[str]] = []
    monkeypatch.setattr(notifications, "enqueue_lanes", lambda lanes, run_after=None: handed.append(list(lanes)))
    hook = endpoint(org, events=["build.created"])

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        build = make_build(pipeline, commit=SHA)
        assert handed == []

    assert callbacks and handed == [[f"webhook:{hook.pk}:{build.pk}"]]


def test_registration_takes_a_github_token_like_the_webhook_secret(api, org):
    from tests.test_registration import register
    from tests.repos import CI_PY, make_repo
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        repo, _ = make_repo(Path(tmp) / "web", {".hm/ci.py": CI_PY})
        envelope = repo.envelope()
    first = register(api, org, envelope, github_token="ghp_one")
    assert first.status_code == 200, first.content
    assert first.json()["repository"]["github_token_set"] is True
    assert "ghp_one" not in first.content.decode()
    stored = Repository.objects.get()
    assert "ghp_one" not in stored.github_token_encrypted

    assert register(api, org, envelope).json()["repository"]["github_token_set"] is True  # absent keeps it
    assert register(api, org, envelope, github_token=None).json()["repository"]["github_token_set"] is True
    assert register(api, org, envelope, github_token="").json()["repository"]["github_token_set"] is False
    assert Repository.objects.get().github_token_encrypted == ""
    assert_error(register(api, org, envelope, github_token="x" * 1001), 422, "validation_failed")


def test_no_endpoint_and_no_token_cost_one_query_per_job_end(pipeline, django_assert_num_queries):
    build = make_build(pipeline, commit=SHA)
    job = Job.objects.get(build=build, step_key="a")
    with django_assert_num_queries(1):
        assert notifications.record_jobs_finished(build_id=build.pk, job_ids=[job.pk]) == 0
    with django_assert_num_queries(1):
        assert notifications.record_build_event(build_id=build.pk, event="build.started") == 0


def test_an_endpoint_of_other_events_costs_a_build_event_one_query(pipeline, org, django_assert_num_queries):
    endpoint(org, events=["job.finished"])
    build = make_build(pipeline, commit=SHA)
    with django_assert_num_queries(1):
        assert notifications.record_build_event(build_id=build.pk, event="build.started") == 0
    assert notifications.record_build_event(build_id=build.pk, event="job.finished") == 1


def test_a_reopened_build_tells_its_endpoints_nothing(pipeline, org, django_assert_num_queries):
    endpoint(org)
    build = make_build(pipeline, commit=SHA)
    with django_assert_num_queries(1):
        assert notifications.record_build_event(build_id=build.pk, event=notifications.REOPENED) == 0



def test_a_status_waiting_for_its_commit_gives_way_to_the_builds_end(pipeline, repository, receiver):
    build = make_build(pipeline, commit="HEAD")
    lane = f"commit_status:{repository.pk}:{build.pk}"
    notifications.deliver_lane(lane=lane)  # the created status now waits for a commit
    services.cancel_build(build=build)

    notifications.deliver_lane(lane=lane)

    assert [s.status for s in lane_messages(build, "commit_status")] == ["superseded", "failed"]
    assert receiver.requests == []


def test_a_status_another_task_is_posting_is_neither_superseded_nor_overtaken(pipeline, repository, receiver):
    build = make_build(pipeline, commit=SHA)
    run_build(build)
    first = lane_messages(build, "commit_status")[0]
    Notification.objects.filter(pk=first.pk).update(claimed_until=first.created_at + timedelta(minutes=5))

    assert notifications.deliver_lane(lane=first.lane, now=first.created_at + timedelta(seconds=1)) == 0

    assert receiver.requests == []
    assert [s.status for s in lane_messages(build, "commit_status")] == ["queued", "queued", "queued"]


def test_a_message_given_up_on_lets_the_rest_of_its_lane_go(pipeline, org, receiver):
    hook = endpoint(org, events=["build.created", "build.finished"])
    build = make_build(pipeline, commit=SHA)
    run_build(build)
    first, second = lane_messages(build, "webhook")
    receiver.answers = [500]

    assert notifications.deliver_lane(lane=first.lane, now=first.created_at + timedelta(hours=24)) == 1

    assert [m.status for m in hook.notifications.order_by("id")] == ["failed", "delivered"]


def test_a_commit_reported_while_a_worker_parks_its_status_still_gets_it_posted(pipeline, repository, receiver,
                                                                                 monkeypatch):
    build = make_build(pipeline, commit="HEAD")
    message, = lane_messages(build, "commit_status")
    real, reported = notifications.is_full_commit, []

    def agent_reports_meanwhile(value):  # after the worker read HEAD, before it parks the status
        if value == "HEAD" and not reported:
            reported.append(notifications.record_checked_out_commit(build_id=build.pk, commit=SHA))
        return real(value)

    monkeypatch.setattr(notifications, "is_full_commit", agent_reports_meanwhile)
    assert notifications.deliver_lane(lane=message.lane) == 1

    assert reported == [True]
    assert [r["url"] for r in receiver.requests] == [f"https://api.github.com/repos/acme/web/statuses/{SHA}"]


def test_webhooks_but_not_statuses_go_only_to_public_addresses_unless_allowed(pipeline, org, repository, receiver,
                                                                            settings):
    settings.WEBHOOK_ALLOW_PRIVATE_ADDRESSES = False
    endpoint(org, events=["build.created"])
    build = make_build(pipeline, commit=SHA)
    for message in Notification.objects.filter(build=build):
        notifications.deliver_lane(lane=message.lane)

    assert sorted((r["url"].split("/")[2], r["public_only"]) for r in receiver.requests) == [
        ("api.github.com", False), ("hooks.example.test", True)]
