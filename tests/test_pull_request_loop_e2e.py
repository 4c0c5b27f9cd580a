"""End to end, what GitHub and an organization's receivers hear about a build: commit statuses on the
pushed commit and signed outbound webhook events, posted by a real `manage.py db_worker`.

A local git repository (`file://`) is registered with a GitHub token; its `.hm/ci.py` is rendered
by the real `harmont` package. A signed push delivery is recorded by the webhook route, the
worker builds it, a real agent renders and runs it against the live server, and the worker posts
each status to a fake GitHub (tests/fake_github.py) that can fail or be down on demand.
"""

from __future__ import annotations

import base64
import os
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from standardwebhooks.webhooks import Webhook

from builds.models import (Build, Job, JobState, Notification, NotificationAttempt, NotificationChannel,
                           NotificationStatus, WebhookEndpoint, WebhookEvent)
from harmont.crypto import encrypt_text
from tests.e2e import finished, job_log, jobs_by_key, wait_for
from tests.fake_github import FakeReceiver, Request
from tests.helpers import builds_url, deliver, push_payload
from tests.repos import GitRepo, make_repo

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("e2e_server")]

SECRET = "hook-secret-for-acme-shop"
GITHUB_TOKEN = "ghp_statusesOnlyTokenForAcmeShop0123456789"
SLUG = "acme-shop-ci"
STATUSES = "/repos/acme/shop/statuses/"

# `build` waits for the gate file, so a test decides when the build may end; `test` fails on a broken VERSION.
CI_PY = '''
import harmont as hm

@hm.pipeline("ci", name="Shop CI", triggers=[hm.push(branch="main")])
def ci():
    build = hm.sh('while [ ! -e {gate} ]; do sleep 0.05; done; echo built "$(cat VERSION)"', key="build")
    return [build.sh('test "$(cat VERSION)" != broken', key="test")]
'''


@dataclass
class Shop:
    repo: GitRepo
    gate: Path

    def open_gate(self) -> None:
        self.gate.touch()


@pytest.fixture
def shop(api: Any, org: Any, tmp_path: Path) -> Shop:
    """acme/shop in a local repository, registered with a GitHub token (its pipeline: acme-shop-ci)."""
    gate = tmp_path / "gate"
    repo, _ = make_repo(tmp_path / "acme" / "shop", {".hm/ci.py": CI_PY.format(gate=gate), "VERSION": "1.0\n"})
    response = api.post(f"/api/v0/organizations/{org.slug}/pipelines/register", {
        "repository": repo.url, "repo_name": "acme/shop", "default_branch": "main", "webhook_secret": SECRET,
        "github_token": GITHUB_TOKEN, "envelope": repo.envelope()}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["repository"]["github_token_set"] is True
    assert [p["slug"] for p in response.json()["pipelines"]] == [SLUG]
    return Shop(repo, gate)


def push(shop: Shop, files: dict[str, str], message: str) -> str:
    """Commit `files` and deliver GitHub's signed push of it; the worker builds it. Returns the commit."""
    pushed = shop.repo.commit(files, message)
    response = deliver("push", push_payload(after=pushed, message=message, full_name="acme/shop"), secret=SECRET,
                       delivery=str(uuid.uuid4()), process=False)
    assert response.status_code == 202 and response.json()["queued"] is True, response.content
    return pushed


def the_build() -> Build:
    return wait_for(lambda: Build.objects.filter(pipeline__slug=SLUG).first(), 30, what="the worker to build it")


def statuses(fake: FakeReceiver) -> list[Request]:
    return [request for request in fake.requests if request.path.startswith(STATUSES)]


def final_status(fake: FakeReceiver, timeout: float = 30) -> Request:
    """The first status that is not `pending` to be accepted by GitHub."""
    def find(requests: list[Request]) -> Request | None:
        return next((r for r in requests if r.ok and r.path.startswith(STATUSES) and r.json["state"] != "pending"),
                    None)
    return fake.wait_for(find, timeout, what="a final commit status")


def build_json(api: Any, build: Build) -> dict[str, Any]:
    response = api.get(builds_url(build.pipeline, f"/{build.number}"))
    assert response.status_code == 200, response.content
    return response.json()


def page_url(server: str, org: Any, build: Build) -> str:
    return f"{server}/orgs/{org.slug}/pipelines/{SLUG}/builds/{build.number}"


def statuses_settled(build: Build) -> bool:
    """The build started and each of its commit statuses so far was posted (or replaced by a newer one)."""
    build.refresh_from_db()
    return build.started_at is not None and not Notification.objects.filter(
        build=build, channel=NotificationChannel.COMMIT_STATUS, status=NotificationStatus.QUEUED).exists()


# ---------------------------------------------------------------- commit statuses


def test_a_push_gets_pending_then_success_on_the_pushed_commit(api, org, owner, shop, agents, db_worker, fake_github,
                                                               e2e_server):
    agents.start("a1")
    pushed = push(shop, {"VERSION": "1.1\n"}, "Bump to 1.1")
    build = the_build()

    # Until the gate opens the build runs: GitHub hears it is pending, and nothing else.
    fake_github.wait_for(lambda requests: [r for r in requests if r.ok], 30, what="a pending status")
    wait_for(lambda: statuses_settled(build), 30, what="the build to start")
    assert {r.json["state"] for r in statuses(fake_github)} == {"pending"}
    shop.open_gate()
    final = final_status(fake_github)

    wait_for(lambda: finished(build), 30, what="the build to finish")
    assert build.state == "passed", {k: (j.state, job_log(j)) for k, j in jobs_by_key(build).items()}
    posted = statuses(fake_github)
    assert posted[-1] is final and len(posted) >= 2
    assert [r.json["state"] for r in posted] == ["pending"] * (len(posted) - 1) + ["success"]
    target = page_url(e2e_server, org, build)
    for request in posted:
        assert (request.method, request.path, request.answered) == ("POST", STATUSES + pushed, 201)
        assert request.headers["authorization"] == f"Bearer {GITHUB_TOKEN}"
        assert request.headers["accept"] == "application/vnd.github+json"
        assert set(request.json) == {"state", "description", "target_url", "context"}
        assert (request.json["context"], request.json["target_url"]) == (f"harmont/{SLUG}", target)
    assert final.json["description"] == f"Build #{build.number} passed"
    assert build_json(api, build)["commit"] == pushed

    # The link is the build's page on this server.
    browser = Client()
    browser.force_login(owner)
    page = urllib.request.urlopen(urllib.request.Request(
        target, headers={"Cookie": f"sessionid={browser.cookies['sessionid'].value}"}), timeout=10)
    assert page.status == 200 and f"#{build.number}" in page.read().decode()


def test_a_failing_build_ends_with_a_failure_status(api, shop, agents, db_worker, fake_github):
    shop.open_gate()
    agents.start("a1")
    pushed = push(shop, {"VERSION": "broken\n"}, "Break it")
    build = the_build()

    final = final_status(fake_github)

    wait_for(lambda: finished(build), 30, what="the build to finish")
    assert build.state == "failed"
    assert jobs_by_key(build)["test"].state == JobState.FAILED
    assert (final.path, final.json["state"]) == (STATUSES + pushed, "failure")
    assert final.json["description"].startswith(f"Build #{build.number} failed")
    assert statuses(fake_github)[-1] is final


def test_a_status_github_refuses_twice_arrives_on_the_third_attempt(shop, agents, db_worker, fake_github):
    agents.start("a1")
    pushed = push(shop, {"VERSION": "1.2\n"}, "Bump to 1.2")
    build = the_build()
    wait_for(lambda: statuses_settled(build), 30, what="the pending statuses to be posted")
    before = len(fake_github.requests)

    fake_github.fail_next(2)
    shop.open_gate()
    final = final_status(fake_github)

    tries = fake_github.requests[before:]
    assert [r.answered for r in tries] == [500, 500, 201]
    assert [r.json["state"] for r in tries] == ["success"] * 3 and {r.path for r in tries} == {STATUSES + pushed}
    assert tries[-1] is final
    # HARMONT_DELIVERY_RETRY_SECONDS=0.3 (tests.e2e.db_worker), doubling: 0.3 s, then 0.6 s.
    assert tries[1].at - tries[0].at >= 0.29 and tries[2].at - tries[1].at >= 0.59
    # The worker records the attempt once GitHub's answer is in: after the fake saw the request.
    message = wait_for(lambda: Notification.objects.filter(
        build=build, channel=NotificationChannel.COMMIT_STATUS, event=WebhookEvent.BUILD_FINISHED,
        status=NotificationStatus.DELIVERED).first(), 10, what="the status to be recorded delivered")
    assert (message.attempts, message.last_error) == (3, "")
    attempts = list(NotificationAttempt.objects.filter(notification=message).order_by("at", "id"))
    assert [a.status_code for a in attempts] == [500, 500, 201]
    assert "Server Error" in attempts[0].response_excerpt


def test_a_manual_build_of_head_gets_its_statuses_on_the_commit_the_agent_checked_out(api, org, shop, agents,
                                                                                      db_worker, fake_github):
    shop.open_gate()
    head = shop.repo.commit({"VERSION": "1.3\n"}, "Bump to 1.3")  # pushed, but no webhook delivered
    response = api.post(builds_url(SLUG, org_slug=org.slug), {"branch": "main", "commit": "HEAD"},
                        format="json")
    assert response.status_code == 201, response.content
    assert response.json()["commit"] == "HEAD"
    build = Build.objects.get(pk=response.json()["id"])
    # Nothing to post yet: the status waits for the commit an agent checks out.
    wait_for(lambda: Notification.objects.filter(build=build, channel=NotificationChannel.COMMIT_STATUS,
                                                 attempts=0, due_at__isnull=True).exists(), 30,
             what="the worker to hold the first status")
    assert statuses(fake_github) == []

    agents.start("a1")
    final = final_status(fake_github)

    wait_for(lambda: finished(build), 30, what="the build to finish")
    assert build.state == "passed"
    assert build_json(api, build)["commit"] == head
    assert f"at {head}" in job_log(jobs_by_key(build)["build"])
    posted = statuses(fake_github)
    assert {r.path for r in posted} == {STATUSES + head}
    assert [r.json["state"] for r in posted] == ["pending"] * (len(posted) - 1) + ["success"]
    assert posted[-1] is final


# ---------------------------------------------------------------- outbound webhooks


def make_endpoint(org: Any, url: str) -> str:
    """An endpoint of `org` for every event; returns its secret."""
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    WebhookEndpoint.objects.create(organization=org, url=url, events=[e.value for e in WebhookEvent],
                                   secret_encrypted=encrypt_text(secret))
    return secret


@pytest.mark.parametrize("down", ["refuse", "close"])
def test_events_held_up_by_a_receiver_that_is_down_all_arrive_once_in_order_when_it_is_back(
        api, org, shop, agents, db_worker, fake_github, webhook_receiver, down):
    secret = make_endpoint(org, f"{webhook_receiver.url}/hooks/harmont")
    webhook_receiver.down(down)
    shop.open_gate()
    agents.start("a1")
    pushed = push(shop, {"VERSION": "2.0\n"}, "Release 2.0")
    build = the_build()

    wait_for(lambda: finished(build), 30, what="the build to finish")
    failed = NotificationAttempt.objects.filter(notification__channel=NotificationChannel.WEBHOOK,
                                                status_code__isnull=True)
    wait_for(lambda: failed.count() >= 2, 30, what="two failed attempts")
    assert not Notification.objects.filter(channel=NotificationChannel.WEBHOOK,
                                           status=NotificationStatus.DELIVERED).exists()
    webhook_receiver.up()

    messages = Notification.objects.filter(build=build, channel=NotificationChannel.WEBHOOK)
    wait_for(lambda: not messages.exclude(status=NotificationStatus.DELIVERED).exists(), 30,
             what="every event to be delivered")

    received = webhook_receiver.requests
    ids = Counter(r.headers["webhook-id"] for r in received if r.ok)
    assert set(ids) == set(messages.values_list("message_id", flat=True)) and set(ids.values()) == {1}
    # At least once: an id the receiver saw more than once got no answer the other times.
    for message_id, count in Counter(r.headers["webhook-id"] for r in received).items():
        if count > 1:
            assert sum(not r.ok for r in received if r.headers["webhook-id"] == message_id) == count - 1
    if down == "close":
        assert any(not r.ok for r in received)

    delivered = [r for r in received if r.ok]
    for request in delivered:
        assert (request.method, request.path) == ("POST", "/hooks/harmont")
        Webhook(secret).verify(request.body, request.headers)  # raises unless signed with the endpoint's secret
        assert request.json["organization"] == org.slug
    jobs = api.get(builds_url(build.pipeline, f"/{build.number}/jobs")).json()["data"]
    events = [r.json["type"] for r in delivered]
    assert events == ["build.created", "build.started", *["job.finished"] * len(jobs), "build.finished"]

    final = build_json(api, build)
    assert final["commit"] == pushed and final["state"] == "passed"
    for request in delivered:
        data = request.json["data"]
        if request.json["type"].startswith("build."):
            assert set(data) == set(final) and data["id"] == final["id"]
        else:
            job = api.get(builds_url(build.pipeline, f"/{build.number}/jobs/{data['id']}")).json()
            assert set(data) == set(job) and data["state"] == job["state"]
            assert request.json["build"]["id"] == final["id"]
    assert delivered[-1].json["data"] == final
    assert sorted(r.json["data"]["id"] for r in delivered if r.json["type"] == "job.finished") == sorted(
        job["id"] for job in jobs)
    assert all(j.state == JobState.PASSED for j in Job.objects.filter(build=build))
