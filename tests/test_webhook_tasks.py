"""Webhook deliveries on the task queue: the route records and enqueues, a worker builds, nothing is lost or doubled.

The route answers 202 once a verified delivery is recorded; a `db_worker` task
acts on it. A task whose worker died, an enqueue lost with its process, and a
failed attempt are handed to the queue again by the reaper's sweep; a task run
twice (also at once) builds once. `GET .../webhook-deliveries/{id}` shows what
a delivery did.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import timedelta

import pytest
from django.test import TestCase
from django.utils import timezone
from django_tasks_db.models import DBTaskResult

from builds import services as build_services
from builds.models import Build, DeliveryStatus, WebhookDelivery
from builds.services import webhooks as webhook_services
from builds.tasks import process_webhook_delivery
from pipelines.models import Pipeline
from tests.e2e import PROJECT_ROOT, database_url, finished, wait_for
from tests.helpers import assert_error, deliver, is_postgres, make_api, push_payload, race, run_tasks
from tests.test_webhooks import build_url, make_pipeline, make_repository, push_on

DELIVERIES = "/api/v0/organizations/{org}/webhook-deliveries/{delivery}"


@pytest.fixture
def repo(org):
    return make_repository(org)


@pytest.fixture
def main_ci(org, repo):
    return make_pipeline(org, "Main CI", push_on("main"))


def delivery_row() -> WebhookDelivery:
    return WebhookDelivery.objects.get()


# ---------------------------------------------------------------- the route only records and enqueues


@pytest.mark.django_db
def test_the_route_answers_202_and_builds_nothing_until_a_worker_runs_the_task(repo, main_ci):
    delivery = str(uuid.uuid4())
    response = deliver("push", push_payload(), delivery=delivery, process=False)

    assert response.status_code == 202
    assert response.json() == {"ok": True, "event": "push", "delivery_id": delivery, "queued": True}
    assert not Build.objects.exists()
    row = delivery_row()
    assert (row.status, row.attempts, row.event, row.payload["after"]) == ("queued", 0, "push", push_payload()["after"])
    assert DBTaskResult.objects.filter(status="READY").count() == 1

    assert run_tasks() == 1

    [build] = Build.objects.all()
    assert (build.pipeline, build.source, build.branch) == (main_ci, "webhook", "main")
    row.refresh_from_db()
    assert (row.status, row.attempts, row.builds_created, row.last_error) == ("processed", 1, 1, "")
    assert row.processed_at is not None and row.retry_at is None


@pytest.mark.django_db
def test_the_task_is_enqueued_only_once_the_delivery_is_committed(repo, main_ci):
    with TestCase.captureOnCommitCallbacks(execute=False) as pending:
        webhook_services.record_webhook_delivery(repository=repo, delivery_id="d-1", event_name="push",
                                                 payload=push_payload())
    assert len(pending) == 1 and not DBTaskResult.objects.exists()  # a worker can't see an uncommitted row
    pending[0]()
    assert DBTaskResult.objects.count() == 1
    # A redelivery records nothing and enqueues nothing.
    with TestCase.captureOnCommitCallbacks(execute=True) as again:
        assert webhook_services.record_webhook_delivery(repository=repo, delivery_id="d-1", event_name="push",
                                                        payload=push_payload()) is None
    assert again == [] and DBTaskResult.objects.count() == 1


@pytest.mark.django_db
def test_a_task_run_again_builds_nothing_more(repo, main_ci):
    deliver("push", push_payload())
    row = delivery_row()
    assert Build.objects.count() == 1

    process_webhook_delivery.enqueue(row.pk)
    assert run_tasks() == 1
    assert build_services.process_webhook_delivery(delivery_pk=row.pk) is None

    assert Build.objects.count() == 1
    row.refresh_from_db()
    assert (row.status, row.attempts, row.builds_created) == ("processed", 1, 1)


# ---------------------------------------------------------------- failures and lost tasks


@pytest.mark.django_db
def test_a_failed_attempt_builds_nothing_and_is_retried_after_its_delay(repo, main_ci, monkeypatch):
    real = webhook_services.create_build
    calls = {"n": 0}

    def flaky(**kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            real(**kwargs)  # written, then the attempt fails: its build must be rolled back
            raise RuntimeError("storage went away")
        return real(**kwargs)

    monkeypatch.setattr(webhook_services, "create_build", flaky)
    before = timezone.now()
    deliver("push", push_payload())

    row = delivery_row()
    assert not Build.objects.exists()
    assert (row.status, row.attempts, row.last_error) == ("queued", 1, "RuntimeError: storage went away")
    assert before + timedelta(seconds=29) < row.retry_at < timezone.now() + timedelta(seconds=31)
    # Not yet due: the sweep hands nothing over.
    assert build_services.requeue_webhook_deliveries(now=row.retry_at - timedelta(seconds=1)) == 0
    assert run_tasks() == 0

    assert build_services.requeue_webhook_deliveries(now=row.retry_at) == 1
    assert run_tasks() == 1

    assert Build.objects.count() == 1
    row.refresh_from_db()
    assert (row.status, row.attempts, row.builds_created, row.last_error) == ("processed", 2, 1, "")


@pytest.mark.django_db
def test_a_delivery_failing_every_attempt_ends_failed(repo, main_ci, monkeypatch, settings):
    settings.WEBHOOK_MAX_ATTEMPTS = 3
    monkeypatch.setattr(webhook_services, "create_build", lambda **kwargs: 1 / 0)
    deliver("push", push_payload())
    delays = []
    for _ in range(2):
        row = delivery_row()
        delays.append(row.retry_at - timezone.now())
        assert build_services.requeue_webhook_deliveries(now=row.retry_at) == 1
        run_tasks()

    row = delivery_row()
    assert (row.status, row.attempts, row.retry_at) == ("failed", 3, None)
    assert row.last_error.startswith("ZeroDivisionError")
    assert delays[0] < timedelta(seconds=31) < delays[1] < timedelta(seconds=61)  # 30 s, then 60 s
    assert build_services.requeue_webhook_deliveries(now=timezone.now() + timedelta(days=1)) == 0


def test_retry_delays_double_up_to_an_hour():
    assert [webhook_services.retry_delay(n).total_seconds() for n in (1, 2, 3, 7, 8, 20)] == [
        30, 60, 120, 1920, 3600, 3600]


@pytest.mark.django_db
def test_a_lost_task_is_handed_over_again_when_its_lease_is_over(repo, main_ci, settings):
    deliver("push", push_payload(), process=False)
    DBTaskResult.objects.all().delete()  # the enqueue died with its process, or the worker with the task
    row = delivery_row()
    assert row.retry_at == row.enqueued_at + timedelta(seconds=settings.TASK_LEASE_SECONDS)

    assert build_services.requeue_webhook_deliveries(now=row.retry_at - timedelta(seconds=1)) == 0
    assert build_services.requeue_webhook_deliveries(now=row.retry_at) == 1
    # A second reaper in the same moment finds it taken.
    assert build_services.requeue_webhook_deliveries(now=row.retry_at) == 0
    assert run_tasks() == 1

    assert Build.objects.count() == 1 and delivery_row().status == DeliveryStatus.PROCESSED


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_same_delivery_run_by_eight_workers_at_once_builds_once(org, repo, main_ci):
    if not is_postgres():
        pytest.skip("racing workers need PostgreSQL (SQLite serialises all writers)")
    deliver("push", push_payload(), process=False)
    row = delivery_row()
    for _ in range(7):
        process_webhook_delivery.enqueue(row.pk)  # as if the sweep had handed it over again and again
    assert DBTaskResult.objects.count() == 8

    race(8, lambda i: run_tasks())

    assert Build.objects.count() == 1
    row.refresh_from_db()
    assert (row.status, row.attempts, row.builds_created) == ("processed", 1, 1)
    assert DBTaskResult.objects.filter(status="SUCCESSFUL").count() == 8


# ---------------------------------------------------------------- GET .../webhook-deliveries/{id}


@pytest.mark.django_db
def test_admins_see_what_a_delivery_did(api, org, repo, main_ci, django_assert_num_queries):
    delivery = str(uuid.uuid4())
    deliver("push", push_payload(), delivery=delivery)
    row = delivery_row()
    url = DELIVERIES.format(org=org.slug, delivery=delivery)

    with django_assert_num_queries(5):  # token, membership, delivery, its builds' states, last-used
        response = api.get(url)

    assert response.status_code == 200, response.content
    body = response.json()
    assert body == {
        "delivery_id": delivery, "event": "push", "repository": "acme/web", "status": "processed", "attempts": 1,
        "last_error": None, "received_at": body["received_at"], "processed_at": body["processed_at"],
        "builds_created": 1,
        "builds": [{"pipeline": main_ci.slug, "number": 1, "state": "scheduled", "error_code": None,
                    "url": build_url(org, main_ci, 1)}],
        "refused": [], "skipped": [],
    }
    assert body["received_at"] == row.received_at.isoformat().replace("+00:00", "Z")
    # The builds' states are read when asked, not kept from when the delivery was processed.
    build_services.cancel_build(build=Build.objects.get())
    assert api.get(url).json()["builds"][0]["state"] == "canceled"


@pytest.mark.django_db
def test_a_queued_delivery_shows_no_builds_yet(api, org, repo, main_ci):
    delivery = str(uuid.uuid4())
    deliver("push", push_payload(), delivery=delivery, process=False)
    body = api.get(DELIVERIES.format(org=org.slug, delivery=delivery)).json()
    assert (body["status"], body["attempts"], body["processed_at"], body["builds"]) == ("queued", 0, None, [])


@pytest.mark.django_db
def test_members_may_not_see_deliveries_and_other_organizations_get_404(member, stranger_api, api, org, repo,
                                                                        main_ci, other_org):
    delivery = str(uuid.uuid4())
    deliver("push", push_payload(), delivery=delivery)
    url = DELIVERIES.format(org=org.slug, delivery=delivery)
    assert_error(make_api(member).get(url), 403, "insufficient_org_role")
    assert_error(stranger_api.get(url), 404, "organization_not_found")
    assert_error(stranger_api.get(DELIVERIES.format(org=other_org.slug, delivery=delivery)), 404,
                 "webhook_delivery_not_found")
    assert_error(api.get(DELIVERIES.format(org=org.slug, delivery="no-such-delivery")), 404,
                 "webhook_delivery_not_found")


# ---------------------------------------------------------------- a real worker process


def worker_environment() -> dict[str, str]:
    """`manage.py db_worker`'s environment: this test's database, the settings it needs to start."""
    return {**os.environ, "DATABASE_URL": database_url(), "HARMONT_SECRET_KEY": "worker-test-secret-key-0123456789",
            "HARMONT_DEBUG": "0"}


@pytest.mark.django_db(transaction=True)
def test_a_db_worker_process_builds_a_delivery_and_an_agent_runs_it(org, e2e_server, agents, repo, api, pipeline):
    # `agents` cleared the `pipeline` fixture's repository; this one's commands need no checkout either.
    ci = make_pipeline(org, "Main CI", push_on("main"))
    Pipeline.objects.filter(pk=ci.pk).update(repository="")
    agents.start("runner-1")
    worker = subprocess.Popen([sys.executable, "manage.py", "db_worker", "--interval", "0.2"], cwd=PROJECT_ROOT,
                              env=worker_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        response = deliver("push", push_payload(), process=False)
        assert response.status_code == 202 and response.json()["queued"] is True

        build = wait_for(lambda: Build.objects.filter(pipeline=ci).first(), 30, what="the worker to build it")
        done = wait_for(lambda: finished(build), 60, what="the build to finish")
        assert done.state == "passed"
        assert delivery_row().status == "processed"
    finally:
        worker.terminate()
        output = worker.communicate(timeout=20)[0].decode(errors="replace")
    assert worker.returncode == 0, output  # SIGTERM: a graceful stop between tasks
