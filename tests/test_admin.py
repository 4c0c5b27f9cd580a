"""The operators' admin: every model registered, no N+1 on any changelist, states read-only,
actions through the services, staff only."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from django.apps import apps
from django.contrib import admin
from django.contrib.auth.models import Group
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from builds import services as build_services
from builds.models import (
    Agent,
    Build,
    CacheEntry,
    ConcurrencySlot,
    Job,
    JobDependency,
    JobState,
    LogChunk,
    Notification,
    NotificationAttempt,
    NotificationChannel,
    WebhookDelivery,
)
from builds.services import store_artifact
from builds.services import ChunkIn
from builds.services import test_results
from harmont.tokens import hash_secret
from harmont.crypto import encrypt_text
from organizations import idempotency
from organizations import services as org_services
from organizations.models import Role, User
from pipelines import secrets as secret_services
from pipelines import services as pipeline_services
from pipelines import schedules as schedule_services
from pipelines.models import Repository, ScheduledRun
from tests.helpers import make_build, two_step_ir

pytestmark = pytest.mark.django_db

PROJECT_APPS = {"organizations", "pipelines", "builds"}
# One failed test case: a TestReport and a TestFailure row.
JUNIT_REPORT = (b'<testsuite name="s"><testcase classname="c" name="ok"/>'
                b'<testcase classname="c" name="bad"><failure message="no"/></testcase></testsuite>')


@pytest.fixture(autouse=True)
def _media(settings: Any, tmp_path: Any) -> None:
    settings.MEDIA_ROOT = tmp_path / "media"  # stored artifacts


@pytest.fixture
def superuser(db: Any) -> User:
    return User.objects.create_superuser("ops@example.com", "a-long-passphrase")


@pytest.fixture
def ops(superuser: User) -> Client:
    client = Client()
    client.force_login(superuser)
    return client


def populate(n: int) -> None:
    """`n` of everything the admin lists: users, organizations, memberships, tokens, invites, CLI grants,
    agent tokens, agents, pipelines, builds with jobs and edges, log chunks, idempotency keys."""
    tag = uuid.uuid4().hex[:6]
    for i in range(n):
        user = org_services.create_user(email=f"u{i}-{tag}@example.com", name=f"User {i}", password="pw-123456-long")
        org = org_services.create_organization(name=f"Org {i} {tag}", owner=user)
        org_services.create_personal_token(user=user, description="t")
        org_services.issue_session_token(user=user)
        org_services.create_invite(organization=org, invited_by=user, email=f"guest{i}-{tag}@example.com",
                                   role=Role.MEMBER)
        org_services.park_cli_transfer(user=user, nonce=f"nonce-{i}-{tag}")
        org_services.create_cli_code(user=user)
        agent_token = org_services.create_agent_token(organization=org, created_by=user, description=f"box {i}")
        agent = Agent.objects.create(organization=org, token=agent_token.token, name=f"agent-{i}",
                                     session_hash=hash_secret(f"hms_{uuid.uuid4()}"))
        pipeline = pipeline_services.create_pipeline(org=org, name=f"Pipe {i}", repository=f"https://x/{i}.git",
                                                     default_branch="main", definition=two_step_ir())
        build = build_services.create_build(pipeline=pipeline, created_by=user,
                                            request=build_services.validate_build_request(branch="main", commit="c0ffee"))
        claim = build_services.claim_job(agent=agent)
        assert claim is not None
        build_services.start_job(job=claim.job)
        build_services.append_log(job=claim.job, chunks=[
            ChunkIn(seq=s, stream_kind=0, content=f"line {s}\n", ts=time.time_ns()) for s in (1, 2)])
        store_artifact(job=claim.job, path=f"reports/{i}.txt", content=b"report")
        junit = store_artifact(job=claim.job, path=f"test-results/{i}.xml", content=JUNIT_REPORT).artifact
        test_results.parse_test_report(artifact_id=junit.pk)
        ConcurrencySlot.objects.create(organization=org, group=f"deploy-{i}", index=0, holder=claim.job)
        repository = Repository.objects.create(organization=org, url=f"https://x/{i}.git", repo_name=f"x/{i}",
                                               webhook_secret_encrypted=encrypt_text("s"))
        WebhookDelivery.objects.create(repository=repository, delivery_id=str(uuid.uuid4()), event="push")
        endpoint = build_services.create_webhook_endpoint(organization=org, url=f"https://hooks.example.com/{i}",
                                                          events=["build.finished"], created_by=user).endpoint
        message = Notification.objects.create(
            message_id=f"msg_{uuid.uuid4().hex}", organization=org, build=build, channel=NotificationChannel.WEBHOOK,
            endpoint=endpoint, lane=f"webhook:{endpoint.pk}:{build.pk}", event="build.finished", payload={})
        NotificationAttempt.objects.create(notification=message, status_code=500, response_excerpt="no")
        CacheEntry.objects.create(organization=org, pipeline=pipeline, step_key="a", key=uuid.uuid4().hex * 2,
                                  branch="main", secret_access=build.secret_access, job=claim.job, size_bytes=10)
        secret_services.set_secret(organization=org, pipeline=pipeline if i % 2 else None, name=f"TOKEN_{i}",
                                   value="s3cret")
        Group.objects.create(name=f"group {i} {tag}")
        schedule = schedule_services.create_schedule(pipeline=pipeline, cron=f"{i} * * * *", created_by=user)
        ScheduledRun.objects.create(schedule=schedule, due_at=schedule.next_run_at, build=build)
        idempotency.claim_idempotency_key(user=user, route="0" * 64, key=f"key-{i}", request_hash="0" * 64,
                                          path=f"/api/v0/organizations/{org.slug}/builds")
        assert build.jobs.count() == 2


def registered_models() -> list[type]:
    return [model for model in admin.site._registry if model._meta.app_label in PROJECT_APPS | {"auth"}]


def changelist(model: type) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")


def test_every_model_of_ours_is_registered() -> None:
    ours = [model for app in PROJECT_APPS for model in apps.get_app_config(app).get_models()]
    missing = [model.__name__ for model in ours if model not in admin.site._registry]
    assert not missing, f"not in the admin: {missing}"


def count_queries(client: Client, url: str) -> tuple[int, int]:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 200, (url, response.status_code)
    return len(queries), response.context["cl"].result_count


def test_no_changelist_queries_more_with_more_rows(ops: Client) -> None:
    populate(1)
    few = {model: count_queries(ops, changelist(model)) for model in registered_models()}
    populate(6)
    many = {model: count_queries(ops, changelist(model)) for model in registered_models()}
    for model in registered_models():
        (queries_few, rows_few), (queries_many, rows_many) = few[model], many[model]
        assert rows_few >= 1 and rows_many > rows_few, (model.__name__, rows_few, rows_many)
        assert queries_many == queries_few, f"{model.__name__}: {queries_few} queries with {rows_few} rows, " \
                                            f"{queries_many} with {rows_many}"


def test_every_change_and_add_page_opens(ops: Client) -> None:
    populate(1)
    for model in registered_models():
        obj = model.objects.first()
        url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_change", args=[obj.pk])
        assert ops.get(url).status_code == 200, url
        add = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_add")
        assert ops.get(add).status_code in (200, 403), add


def test_admin_is_for_staff_only(client: Client, owner: User) -> None:
    client.force_login(owner)  # an organization owner, but not staff
    response = client.get(changelist(Build))
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


def test_states_are_read_only(ops: Client, build: Build) -> None:
    job = build.jobs.order_by("position").first()
    for model, obj in ((Build, build), (Job, job)):
        url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_change", args=[obj.pk])
        form = ops.get(url).context["adminform"].form
        assert "state" not in form.fields, model.__name__


def test_cancel_action_cancels_through_the_service(ops: Client, pipeline: Any) -> None:
    running, finished = make_build(pipeline), make_build(pipeline)
    build_services.cancel_build(build=finished)
    response = ops.post(changelist(Build), {"action": "cancel_selected", "_selected_action": [running.pk, finished.pk]},
                        follow=True)
    assert response.status_code == 200
    running.refresh_from_db()
    assert running.state == "canceled" and running.cancel_requested_at is not None
    assert set(running.jobs.values_list("state", flat=True)) == {JobState.CANCELED}


def test_search_works_on_every_changelist(ops: Client, build: Build) -> None:
    job = build.jobs.first()
    for model in registered_models():
        if admin.site._registry[model].search_fields:
            for term in ("no-such-thing", str(job.pk), str(build.pk)):
                assert ops.get(changelist(model), {"q": term}).status_code == 200, (model.__name__, term)
    assert ops.get(changelist(Build), {"q": str(build.pk)}).context["cl"].result_count == 1
    assert ops.get(changelist(Job), {"q": str(job.pk)}).context["cl"].result_count == 1


def test_rows_written_by_services_are_view_only(ops: Client, build: Build) -> None:
    job = build.jobs.first()
    for model, obj in ((Build, build), (Job, job), (LogChunk, None), (Agent, None), (JobDependency, None)):
        name = f"admin:{model._meta.app_label}_{model._meta.model_name}"
        assert ops.get(reverse(f"{name}_add")).status_code == 403, model.__name__
        if obj is not None:
            assert ops.post(reverse(f"{name}_change", args=[obj.pk]), {"branch": "hacked"}).status_code == 403
    build.refresh_from_db()
    assert build.branch == "main"
