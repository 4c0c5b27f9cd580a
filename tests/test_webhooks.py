"""GitHub webhooks: signatures, trigger matching, one build per matching pipeline, redeliveries."""

from __future__ import annotations

import io
import json
import uuid
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlencode

import pytest
from django.conf import settings as django_settings
from django.test import Client, RequestFactory
from django.urls import reverse
from django.utils import timezone

from builds import services as build_services
from builds import webhook_views, webhooks
from builds.models import Build, Job, WebhookDelivery
from harmont.crypto import decrypt_text, encrypt_text
from harmont.errors import ApiError
from organizations.models import Organization, User
from pipelines import services as pipeline_services
from pipelines.models import Pipeline, Repository
from tests.dsl import hm
from tests.helpers import (
    HEAD_SHA,
    WEBHOOK_SECRET,
    WEBHOOK_URL,
    assert_error,
    deliver,
    is_postgres,
    outcomes,
    ping_payload,
    pull_request_payload,
    push_payload,
    race,
    repository_json,
    two_step_ir,
)

ZERO_SHA = "0" * 40


# ---------------------------------------------------------------- helpers

def make_repository(org: Organization, repo_name: str = "acme/web", secret: str | None = WEBHOOK_SECRET) -> Repository:
    return Repository.objects.create(organization=org, url=f"https://github.com/{repo_name}.git", repo_name=repo_name,
                                     webhook_secret_encrypted=encrypt_text(secret) if secret else "")


def make_pipeline(org: Organization, name: str, triggers: list[dict[str, Any]] | None, *,
                  repo_name: str = "acme/web", **fields: Any) -> Pipeline:
    return pipeline_services.create_pipeline(
        org=org, name=name, repository=f"https://github.com/{repo_name}.git", repo_name=repo_name,
        default_branch="main", source_slug=name.lower().replace(" ", "-"), definition=two_step_ir(),
        triggers=triggers, **fields,
    )


def push_on(*branches: str) -> list[dict[str, Any]]:
    return [hm.push(branch=list(branches)).to_dict()]


def nothing_written() -> None:
    assert not Build.objects.exists()
    assert not WebhookDelivery.objects.exists()


def build_url(org: Organization, pipeline: Pipeline, number: int) -> str:
    return f"{django_settings.APP_URL}/orgs/{org.slug}/pipelines/{pipeline.slug}/builds/{number}"


# ---------------------------------------------------------------- pure: signatures

def test_sign_matches_githubs_documented_example():
    # docs.github.com, "Validating webhook deliveries": this secret and body give this signature.
    assert webhooks.sign(WEBHOOK_SECRET, b"Hello, World!") == (
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17")


@pytest.mark.parametrize(("secret", "header", "valid"), [
    (WEBHOOK_SECRET, "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17", True),
    (WEBHOOK_SECRET, "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e18", False),
    (WEBHOOK_SECRET, "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17", False),
    (WEBHOOK_SECRET, "sha1=0123456789abcdef0123456789abcdef01234567", False),
    (WEBHOOK_SECRET, "", False),
    (WEBHOOK_SECRET, None, False),
    (WEBHOOK_SECRET, "sha256=ünïcödé", False),
    ("another secret", "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17", False),
    ("", webhooks.sign("", b"Hello, World!"), False),
], ids=["ok", "one-digit-off", "no-prefix", "sha1", "empty", "missing", "non-ascii", "other-secret",
        "empty-secret"])
def test_signature_valid(secret, header, valid):
    assert webhooks.signature_valid(secret=secret, body=b"Hello, World!", header=header) is valid


# ---------------------------------------------------------------- pure: globs and triggers

@pytest.mark.parametrize(("pattern", "name", "matches"), [
    ("main", "main", True),
    ("main", "main2", False),
    ("main", "Main", False),
    ("release/*", "release/1", True),
    ("release/*", "release/1/x", True),
    ("release/*", "release", False),
    ("*", "feature/deep/branch", True),
    ("feature/*/wip", "feature/a/b/wip", True),
    ("v?", "v1", True),
    ("v?", "v10", False),
    ("v?", "v", False),
    ("v1.*", "v1.2.3", True),
    ("v1.*", "v1x2", False),  # `.` is literal
    ("[ab]", "a", False),  # no character classes: `[` is literal
    ("[ab]", "[ab]", True),
    ("a+b", "a+b", True),
])
def test_glob_match(pattern, name, matches):
    assert webhooks.glob_match(pattern, name) is matches


def push_event(ref: str = "refs/heads/main", **kwargs: Any) -> webhooks.Event:
    return webhooks.parse_event("push", push_payload(ref, **kwargs))


def pr_event(action: str = "opened", **kwargs: Any) -> webhooks.Event:
    return webhooks.parse_event("pull_request", pull_request_payload(action, **kwargs))


@pytest.mark.parametrize(("trigger", "ref", "matches"), [
    (hm.push(branch="main"), "refs/heads/main", True),
    (hm.push(branch="main"), "refs/heads/develop", False),
    (hm.push(branch=["develop", "release/*"]), "refs/heads/release/1/x", True),
    (hm.push(branch="*"), "refs/heads/any/thing", True),
    (hm.push(branch="*"), "refs/tags/v1.0.0", False),  # a branch trigger ignores tags ...
    (hm.push(tag="v*"), "refs/tags/v1.0.0", True),
    (hm.push(tag="v*"), "refs/heads/v1", False),  # ... and a tag trigger ignores branches
    (hm.push(tag="v?.?"), "refs/tags/v1.2", True),
    (hm.push(tag="v?.?"), "refs/tags/v1.23", False),
    (hm.push(branch="*"), "refs/notes/commits", False),
], ids=lambda value: str(value.to_dict()) if hasattr(value, "to_dict") else str(value))
def test_push_trigger_matching(trigger, ref, matches):
    assert webhooks.trigger_matches(trigger.to_dict(), push_event(ref)) is matches


def test_deleted_ref_matches_nothing():
    for ref in ("refs/heads/main", "refs/tags/v1"):
        deleted = push_event(ref, after=ZERO_SHA, deleted=True)
        assert webhooks.trigger_matches(hm.push(branch="*").to_dict(), deleted) is False
        assert webhooks.trigger_matches(hm.push(tag="*").to_dict(), deleted) is False
    # The all-zero `after` alone says deleted, too.
    assert push_event(after=ZERO_SHA).deleted is True


@pytest.mark.parametrize(("action", "matches"), [
    ("opened", True), ("synchronize", True), ("reopened", True), ("closed", False), ("ready_for_review", False),
    ("edited", False), ("labeled", False),
])
def test_pull_request_default_types(action, matches):
    written = hm.pull_request().to_dict()
    assert written == {"event": "pull_request", "types": ["opened", "synchronize", "reopened"]}
    assert webhooks.trigger_matches(written, pr_event(action)) is matches
    # A hand-written trigger without `types` means the same defaults.
    assert webhooks.trigger_matches({"event": "pull_request"}, pr_event(action)) is matches


@pytest.mark.parametrize(("action", "matches"), [("closed", True), ("ready_for_review", True), ("opened", False)])
def test_pull_request_explicit_types(action, matches):
    trigger = hm.pull_request(types=["closed", "ready_for_review"]).to_dict()
    assert webhooks.trigger_matches(trigger, pr_event(action)) is matches


@pytest.mark.parametrize(("base", "head", "matches"), [
    ("main", "feature/x", True),
    ("release/2.0", "fix", True),
    ("develop", "main", False),  # the head branch is not what `branches` filters
])
def test_pull_request_base_branch_filter(base, head, matches):
    trigger = hm.pull_request(branches=["main", "release/*"]).to_dict()
    assert webhooks.trigger_matches(trigger, pr_event(base=base, head=head)) is matches


def test_push_and_pull_request_triggers_do_not_cross():
    assert webhooks.trigger_matches(hm.push(branch="*").to_dict(), pr_event()) is False
    assert webhooks.trigger_matches(hm.pull_request().to_dict(), push_event()) is False


@pytest.mark.parametrize("triggers", [
    None, [], "push", {"event": "push", "branches": ["main"]}, [None], ["push"], [{"branches": ["main"]}],
    [{"event": "push"}], [{"event": "push", "branches": "nope-not-main"}], [{"event": "push", "branches": [1]}],
    [{"event": "pull_request", "types": "synchronize"}],
])
def test_missing_or_malformed_triggers_never_match(triggers):
    assert webhooks.triggers_match(triggers, push_event()) is False
    assert webhooks.triggers_match(triggers, pr_event()) is False


def test_any_trigger_of_a_pipeline_may_match():
    triggers = [hm.push(tag="v*").to_dict(), hm.push(branch="main").to_dict(), hm.pull_request().to_dict()]
    assert webhooks.triggers_match(triggers, push_event("refs/heads/main"))
    assert webhooks.triggers_match(triggers, push_event("refs/tags/v2"))
    assert webhooks.triggers_match(triggers, pr_event("synchronize"))
    assert not webhooks.triggers_match(triggers, push_event("refs/heads/develop"))


# ---------------------------------------------------------------- pure: payload → build facts

def test_branch_push_facts():
    assert webhooks.build_facts(push_event("refs/heads/release/1.x", message="Bump\n\nlong text")) == \
        webhooks.BuildFacts(branch="release/1.x", commit=HEAD_SHA, message="Bump\n\nlong text", env={})


def test_tag_push_builds_the_tag_as_its_branch():
    assert webhooks.build_facts(push_event("refs/tags/v1.2.0")) == webhooks.BuildFacts(
        branch="v1.2.0", commit=HEAD_SHA, message="Fix the flaky test", env={"HARMONT_TAG": "v1.2.0"})


def test_deletions_and_other_refs_build_nothing():
    assert webhooks.build_facts(push_event(after=ZERO_SHA, deleted=True)) is None
    assert webhooks.build_facts(push_event("refs/notes/commits")) is None


def test_pull_request_facts_build_the_head():
    assert webhooks.build_facts(pr_event("synchronize", base="main", head="feature/cache")) == webhooks.BuildFacts(
        branch="feature/cache", commit=HEAD_SHA, message="Cache the wheels",
        env={"HARMONT_PULL_REQUEST": "42", "HARMONT_PULL_REQUEST_BASE_BRANCH": "main"})


def test_overlong_commit_message_is_cut():
    facts = webhooks.build_facts(push_event(message="x" * 200_000))
    assert facts is not None and len(facts.message or "") == webhooks.MESSAGE_MAX_LENGTH


@pytest.mark.parametrize(("event", "payload"), [
    ("push", {"after": HEAD_SHA}),
    ("push", {"ref": "refs/heads/main"}),
    ("push", {"ref": "refs/heads/main", "after": 5}),
    ("pull_request", {"action": "opened"}),
    ("pull_request", {"action": "opened", "pull_request": {"head": {"ref": "x"}, "base": {"ref": "main"}}}),
    ("push", ["not", "an", "object"]),
])
def test_payload_missing_needed_fields_is_refused(event, payload):
    with pytest.raises(webhooks.PayloadError):
        webhooks.parse_event(event, payload)


# ---------------------------------------------------------------- endpoint

@pytest.fixture
def repo(org) -> Repository:
    return make_repository(org)


@pytest.fixture
def pipelines(org) -> dict[str, Pipeline]:
    """The acme/web pipelines with every kind of trigger, plus look-alikes that must never build."""
    made = {
        "main": make_pipeline(org, "Main CI", push_on("main")),
        "everything": make_pipeline(org, "Every Branch", push_on("*"), allow_manual=False),
        "release": make_pipeline(org, "Release", push_on("release/*")),
        "tags": make_pipeline(org, "Publish", [hm.push(tag="v*").to_dict()]),
        "pr": make_pipeline(org, "PR Checks", [hm.pull_request(branches="main").to_dict()]),
        "pr-closed": make_pipeline(org, "PR Cleanup", [hm.pull_request(types=["closed"]).to_dict()]),
        "no-triggers": make_pipeline(org, "Manual Only", None),
        "archived": make_pipeline(org, "Old CI", push_on("*")),
        "other-repo": make_pipeline(org, "API CI", push_on("*"), repo_name="acme/api"),
    }
    Pipeline.objects.filter(pk=made["archived"].pk).update(archived_at=timezone.now())
    return made


def builds_of(pipeline: Pipeline) -> list[Build]:
    return list(Build.objects.filter(pipeline=pipeline).order_by("number"))


def built(pipelines: dict[str, Pipeline]) -> set[str]:
    return {key for key, pipeline in pipelines.items() if Build.objects.filter(pipeline=pipeline).exists()}


@pytest.mark.django_db
def test_signed_push_creates_one_build_per_matching_pipeline(org, repo, pipelines):
    delivery = str(uuid.uuid4())
    response = deliver("push", push_payload("refs/heads/main", message="Fix the flaky test"), delivery=delivery)

    assert response.status_code == 202, response.content
    main, everything = builds_of(pipelines["main"]), builds_of(pipelines["everything"])
    assert len(main) == 1 and len(everything) == 1
    assert response.json() == {"ok": True, "event": "push", "delivery_id": delivery, "queued": True}
    assert outcomes(response) == [{
        "organization": org.slug, "repository": "acme/web", "builds_created": 2,
        "builds": [
            {"pipeline": pipelines["main"].slug, "number": 1, "state": "scheduled", "error_code": None,
             "url": build_url(org, pipelines["main"], 1)},
            {"pipeline": pipelines["everything"].slug, "number": 1, "state": "scheduled", "error_code": None,
             "url": build_url(org, pipelines["everything"], 1)},
        ],
        "refused": [], "skipped": [],
    }]
    for build in (main[0], everything[0]):
        build.refresh_from_db()
        assert (build.source, build.branch, build.commit, build.message, build.env, build.state) == \
            ("webhook", "main", HEAD_SHA, "Fix the flaky test", {}, "scheduled")
        assert build.created_by is None
        assert Job.objects.filter(build=build).count() == 2
    assert built(pipelines) == {"main", "everything"}
    stored = WebhookDelivery.objects.get()
    assert (stored.repository, stored.delivery_id, stored.event, stored.builds_created) == \
        (repo, delivery, "push", 2)


@pytest.mark.django_db
def test_push_to_a_release_branch_builds_the_glob_pipelines(repo, pipelines):
    assert deliver("push", push_payload("refs/heads/release/1/x")).status_code == 202
    assert built(pipelines) == {"everything", "release"}
    assert builds_of(pipelines["release"])[0].branch == "release/1/x"


@pytest.mark.django_db
def test_push_matching_no_pipeline_records_the_delivery_and_builds_nothing(org, repo, pipelines):
    response = deliver("push", push_payload("refs/heads/develop/no-release"))

    assert response.status_code == 202
    assert outcomes(response) == [{
        "organization": org.slug, "repository": "acme/web", "builds_created": 1,
        "builds": [{"pipeline": pipelines["everything"].slug, "number": 1, "state": "scheduled", "error_code": None,
                    "url": build_url(org, pipelines["everything"], 1)}],
        "refused": [], "skipped": []}]
    Pipeline.objects.filter(pk=pipelines["everything"].pk).update(triggers=None)

    response = deliver("push", push_payload("refs/heads/develop/no-release"))

    assert response.status_code == 202
    assert outcomes(response)[0]["builds"] == []
    assert outcomes(response)[0]["builds_created"] == 0
    assert Build.objects.count() == 1
    assert sorted(WebhookDelivery.objects.values_list("builds_created", flat=True)) == [0, 1]


@pytest.mark.django_db
@pytest.mark.parametrize("signature", [
    None,  # no header at all
    "",
    "sha256=" + "0" * 64,
    "signed-with-the-wrong-secret",
], ids=["missing", "empty", "wrong", "other-secret"])
def test_bad_or_missing_signature_is_401_and_creates_nothing(repo, pipelines, signature):
    body = json.dumps(push_payload()).encode()
    if signature == "signed-with-the-wrong-secret":
        signature = webhooks.sign("not the secret", body)
    response = deliver("push", None, body=body, secret=None, signature=signature)

    assert_error(response, 401, "webhook_signature_invalid")
    nothing_written()
    for pipeline in pipelines.values():
        pipeline.refresh_from_db()
        assert pipeline.build_counter == 0


@pytest.mark.django_db
def test_tampered_body_is_401(repo, pipelines):
    body = json.dumps(push_payload()).encode()
    signature = webhooks.sign(WEBHOOK_SECRET, body)
    tampered = body.replace(b"refs/heads/main", b"refs/heads/evil")
    assert_error(deliver("push", None, body=tampered, signature=signature), 401, "webhook_signature_invalid")
    nothing_written()


@pytest.fixture
def no_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any parse of a delivery's body fails the test: the view's decoder and the JSON parser it uses."""
    def parsed(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an unverified webhook body was parsed")

    monkeypatch.setattr(webhook_views, "_decode", parsed)
    monkeypatch.setattr(webhook_views, "json", SimpleNamespace(loads=parsed, JSONDecodeError=json.JSONDecodeError))
    monkeypatch.setattr(webhook_views, "parse_qs", parsed)


@pytest.mark.django_db
@pytest.mark.parametrize("body", [b'{"repository": {"full_name": "acme/web"', b"[" * 200_000, b"\xff\xfe{}",
                                  b"payload=%7B%22repository%22"], ids=["malformed", "deep", "not-utf8", "form"])
@pytest.mark.parametrize("signature", [None, "sha256=" + "0" * 64, "other-secret"])
def test_an_unverified_delivery_is_401_without_its_body_ever_being_parsed(repo, pipelines, no_parsing, body,
                                                                           signature):
    if signature == "other-secret":
        signature = webhooks.sign("not the secret", body)
    content_type = "application/x-www-form-urlencoded" if body.startswith(b"payload=") else "application/json"

    response = deliver("push", None, body=body, secret=None, signature=signature, repository="acme/web",
                       content_type=content_type)

    assert_error(response, 401, "webhook_signature_invalid")
    nothing_written()


@pytest.mark.django_db
def test_an_oversized_content_length_is_413_and_nothing_is_read_or_checked(repo, pipelines, settings, monkeypatch):
    settings.WEBHOOK_MAX_BYTES = 2048

    class Unreadable(io.RawIOBase):
        def read(self, *args: Any) -> bytes:
            raise AssertionError("the oversized body was read")

    def verified(**kwargs: Any) -> Any:
        raise AssertionError("an oversized delivery reached the signature check")

    monkeypatch.setattr(build_services, "verified_repositories", verified)
    request = RequestFactory().post(f"{WEBHOOK_URL}/acme/web", data=b"", content_type="application/json",
                                    CONTENT_LENGTH="2049", HTTP_X_HUB_SIGNATURE_256="sha256=" + "0" * 64,
                                    HTTP_X_GITHUB_EVENT="push", HTTP_X_GITHUB_DELIVERY="d-1")
    request._stream = Unreadable()  # type: ignore[attr-defined]

    response = webhook_views.github_webhook(request, repo_name="acme/web")

    assert (response.status_code, json.loads(response.content)["error"]["code"]) == (413, "payload_too_large")
    nothing_written()


@pytest.mark.django_db
def test_the_payload_url_without_a_repository_is_400_and_reads_nothing(repo, pipelines, no_parsing):
    body = json.dumps(push_payload()).encode()
    response = Client().post(WEBHOOK_URL, data=body, content_type="application/json",
                             HTTP_X_HUB_SIGNATURE_256=webhooks.sign(WEBHOOK_SECRET, body),
                             HTTP_X_GITHUB_EVENT="push", HTTP_X_GITHUB_DELIVERY="d-1")

    error = assert_error(response, 400, "webhook_invalid")
    assert "/webhooks/github/<owner>/<name>" in error["message"]
    nothing_written()


@pytest.mark.django_db
def test_a_delivery_for_another_repository_sharing_the_secret_is_400_and_builds_nothing(org, repo, pipelines):
    make_repository(org, repo_name="acme/other")
    make_pipeline(org, "Other", push_on("main"), repo_name="acme/other")

    response = deliver("push", push_payload(full_name="acme/web"), repository="acme/other")

    error = assert_error(response, 400, "webhook_invalid")
    assert "acme/web" in error["message"] and "acme/other" in error["message"]
    nothing_written()


@pytest.mark.django_db
def test_unknown_repository_and_repository_without_secret_look_like_a_bad_signature(org, pipelines):
    unknown = deliver("push", push_payload(full_name="acme/nope"))
    make_repository(org, secret=None)
    no_secret = deliver("push", push_payload())
    no_secret_signed_empty = deliver("push", push_payload(), secret="")
    no_name = deliver("push", {**push_payload(), "repository": {"id": 1}})

    bodies = []
    for response in (unknown, no_secret, no_secret_signed_empty, no_name):
        error = assert_error(response, 401, "webhook_signature_invalid")
        bodies.append(error["message"])
    assert len(set(bodies)) == 1  # one answer: which repositories exist is not revealed
    nothing_written()


@pytest.mark.django_db
def test_repository_name_matches_in_any_case(org, pipelines):
    make_repository(org, repo_name="Acme/Web")
    shouting = make_pipeline(org, "Shouting", push_on("main"), repo_name="ACME/WEB")

    response = deliver("push", push_payload(full_name="acme/WEB"))

    assert response.status_code == 202
    assert built(pipelines) == {"main", "everything"}
    assert len(builds_of(shouting)) == 1


@pytest.mark.django_db
def test_tag_push_builds_the_tag_pipelines_with_the_tag_as_branch(repo, pipelines):
    response = deliver("push", push_payload("refs/tags/v1.4.0", message="Release 1.4.0"))

    assert response.status_code == 202
    assert built(pipelines) == {"tags"}
    build = builds_of(pipelines["tags"])[0]
    assert (build.source, build.branch, build.commit, build.message, build.env) == \
        ("webhook", "v1.4.0", HEAD_SHA, "Release 1.4.0", {"HARMONT_TAG": "v1.4.0"})
    # The build's env reaches every job, over the pipeline's own.
    assert all(job.env["HARMONT_TAG"] == "v1.4.0" for job in Job.objects.filter(build=build))


@pytest.mark.django_db
@pytest.mark.parametrize("ref", ["refs/heads/main", "refs/tags/v1.4.0"])
def test_deleting_a_branch_or_tag_builds_nothing(repo, pipelines, ref):
    response = deliver("push", push_payload(ref, after=ZERO_SHA, deleted=True))

    assert response.status_code == 202
    assert outcomes(response)[0]["builds_created"] == 0
    assert not Build.objects.exists()
    assert WebhookDelivery.objects.get().builds_created == 0


@pytest.mark.django_db
def test_pull_request_opened_builds_the_head_for_pr_pipelines(repo, pipelines):
    response = deliver("pull_request", pull_request_payload("opened", base="main", head="feature/cache"))

    assert response.status_code == 202
    assert built(pipelines) == {"pr"}
    build = builds_of(pipelines["pr"])[0]
    assert (build.source, build.branch, build.commit, build.message, build.env) == (
        "webhook", "feature/cache", HEAD_SHA, "Cache the wheels",
        {"HARMONT_PULL_REQUEST": "42", "HARMONT_PULL_REQUEST_BASE_BRANCH": "main"})
    assert WebhookDelivery.objects.get().event == "pull_request"


@pytest.mark.django_db
def test_pull_request_closed_builds_only_pipelines_that_ask_for_closed(repo, pipelines):
    assert deliver("pull_request", pull_request_payload("closed")).status_code == 202
    assert built(pipelines) == {"pr-closed"}


@pytest.mark.django_db
def test_pull_request_into_another_base_branch_skips_the_base_filtered_pipeline(repo, pipelines):
    assert deliver("pull_request", pull_request_payload("opened", base="develop", head="main")).status_code == 202
    assert not Build.objects.exists()


@pytest.mark.django_db
def test_redelivery_creates_nothing_new(repo, pipelines):
    delivery = str(uuid.uuid4())
    first = deliver("push", push_payload(), delivery=delivery)
    again = deliver("push", push_payload(), delivery=delivery)

    assert first.status_code == again.status_code == 202
    assert first.json() == {"ok": True, "event": "push", "delivery_id": delivery, "queued": True}
    assert again.json() == {"ok": True, "event": "push", "delivery_id": delivery, "queued": False}
    assert [o["builds_created"] for o in outcomes(again)] == [2]  # the first delivery's, still
    assert Build.objects.count() == 2
    assert WebhookDelivery.objects.get().builds_created == 2
    # A new delivery of the same commit is a new event: it builds again.
    assert deliver("push", push_payload()).status_code == 202
    assert Build.objects.count() == 4
    assert [b.number for b in builds_of(pipelines["main"])] == [1, 2]


@pytest.mark.django_db
def test_same_delivery_id_for_another_repository_is_not_a_redelivery(org, repo, pipelines):
    make_repository(org, repo_name="acme/api")
    delivery = str(uuid.uuid4())
    deliver("push", push_payload(), delivery=delivery)
    response = deliver("push", push_payload(full_name="acme/api"), delivery=delivery)

    assert response.json()["queued"] is True
    assert [o["repository"] for o in outcomes(response)] == ["acme/web", "acme/api"]
    assert built(pipelines) == {"main", "everything", "other-repo"}


@pytest.mark.django_db
def test_two_organizations_with_the_same_repository_only_the_verified_one_builds(org, other_org, pipelines):
    make_repository(org, secret=WEBHOOK_SECRET)
    make_repository(other_org, repo_name="ACME/web", secret="the other org's secret")
    theirs = make_pipeline(other_org, "Their CI", push_on("*"))

    response = deliver("push", push_payload(), secret=WEBHOOK_SECRET)

    assert response.status_code == 202
    assert [r["organization"] for r in outcomes(response)] == [org.slug]
    assert built(pipelines) == {"main", "everything"}
    assert builds_of(theirs) == []
    assert list(WebhookDelivery.objects.values_list("repository__organization", flat=True)) == [org.pk]

    response = deliver("push", push_payload(), secret="the other org's secret")

    assert [r["organization"] for r in outcomes(response)] == [other_org.slug]
    assert len(builds_of(theirs)) == 1
    assert len(builds_of(pipelines["main"])) == 1


@pytest.mark.django_db
def test_two_organizations_sharing_a_secret_both_build(org, other_org, pipelines):
    make_repository(org)
    make_repository(other_org)
    theirs = make_pipeline(other_org, "Their CI", push_on("main"))

    response = deliver("push", push_payload())

    assert sorted(r["organization"] for r in outcomes(response)) == sorted([org.slug, other_org.slug])
    assert len(builds_of(theirs)) == 1 and len(builds_of(pipelines["main"])) == 1
    assert WebhookDelivery.objects.count() == 2


@pytest.mark.django_db
def test_rejected_plan_is_a_failed_build_and_does_not_stop_the_others(org, repo):
    # Stored before the planner grew stricter, say: it no longer plans.
    broken = make_pipeline(org, "Broken", push_on("main"))
    Pipeline.objects.filter(pk=broken.pk).update(definition={"version": "0", "steps": [{"type": "trigger",
                                                                                          "key": "a"}]})
    fine = make_pipeline(org, "Fine", push_on("main"))

    response = deliver("push", push_payload())

    assert response.status_code == 202
    assert outcomes(response)[0]["builds"] == [
        {"pipeline": broken.slug, "number": 1, "state": "failed", "error_code": "unknown_step_type",
         "url": build_url(org, broken, 1)},
        {"pipeline": fine.slug, "number": 1, "state": "scheduled", "error_code": None,
         "url": build_url(org, fine, 1)},
    ]
    failed, = builds_of(broken)
    assert (failed.state, failed.error_code, failed.source) == ("failed", "unknown_step_type", "webhook")
    passed_on, = builds_of(fine)
    assert passed_on.state == "scheduled" and Job.objects.filter(build=passed_on).count() == 2
    assert WebhookDelivery.objects.get().builds_created == 2


@pytest.mark.django_db
def test_refused_build_is_reported_and_the_others_still_build(org, repo, monkeypatch):
    first = make_pipeline(org, "First", push_on("main"))
    second = make_pipeline(org, "Second", push_on("main"))
    real_create = build_services.create_build

    def refuse_first(*, pipeline: Pipeline, **kwargs: Any) -> Build:
        if pipeline.pk == first.pk:
            raise ApiError("pipeline_manual_disabled", "refused for the test")
        return real_create(pipeline=pipeline, **kwargs)

    monkeypatch.setattr("builds.services.webhooks.create_build", refuse_first)
    response = deliver("push", push_payload())

    result = outcomes(response)[0]
    assert result["refused"] == [{"pipeline": first.slug, "code": "pipeline_manual_disabled",
                                  "message": "refused for the test"}]
    assert [b["pipeline"] for b in result["builds"]] == [second.slug] and result["builds_created"] == 1
    assert builds_of(first) == [] and len(builds_of(second)) == 1


@pytest.mark.django_db
def test_ping_is_ok_once_signed_and_records_nothing(repo, pipelines):
    response = deliver("ping", ping_payload())
    assert response.status_code == 200 and response.json() == {"ok": True}
    assert_error(deliver("ping", ping_payload(), secret="wrong"), 401, "webhook_signature_invalid")
    nothing_written()


@pytest.mark.django_db
def test_other_events_are_accepted_and_ignored(repo, pipelines):
    response = deliver("issues", {"action": "opened", "issue": {"number": 1}, "repository": repository_json()})
    assert response.status_code == 202
    assert response.json() == {"ok": True, "event": "issues", "ignored": True}
    nothing_written()


@pytest.mark.django_db
def test_form_encoded_payload_is_accepted(repo, pipelines):
    body = urlencode({"payload": json.dumps(push_payload())}).encode()
    response = deliver("push", None, body=body, content_type="application/x-www-form-urlencoded")
    assert response.status_code == 202, response.content
    assert built(pipelines) == {"main", "everything"}


@pytest.mark.django_db
@pytest.mark.parametrize(("headers", "body", "status", "code"), [
    ({"HTTP_X_GITHUB_EVENT": ""}, None, 400, "webhook_invalid"),
    ({"HTTP_X_GITHUB_DELIVERY": ""}, None, 400, "webhook_invalid"),
    ({"HTTP_X_GITHUB_DELIVERY": "d" * 101}, None, 400, "webhook_invalid"),
    ({}, b"{not json", 400, "invalid_json"),
    ({}, b"\xff\xfe", 400, "invalid_json"),
], ids=["no-event", "no-delivery", "long-delivery", "not-json", "not-utf8"])
def test_malformed_requests_are_400_and_create_nothing(repo, pipelines, headers, body, status, code):
    assert_error(deliver("push", push_payload(), body=body, headers=headers), status, code)
    nothing_written()


@pytest.mark.django_db
def test_signed_push_without_needed_fields_is_400(repo, pipelines):
    payload = push_payload()
    del payload["after"]
    error = assert_error(deliver("push", payload), 400, "webhook_invalid")
    assert "after" in error["message"]
    nothing_written()


@pytest.mark.django_db
def test_branch_too_long_for_a_build_is_422_and_creates_nothing(repo, pipelines):
    error = assert_error(deliver("push", push_payload("refs/heads/" + "b" * 300)), 422, "build_invalid")
    assert error["fields"] == {"branch": ["At most 255 characters."]}
    nothing_written()


@pytest.mark.django_db
@pytest.mark.parametrize(("payload", "field"), [
    (push_payload("refs/heads/--upload-pack=touch /tmp/x;git-upload-pack"), "branch"),
    (push_payload("refs/heads/main", after="--upload-pack=touch /tmp/x;git-upload-pack"), "commit"),
    (push_payload("refs/tags/v1..2"), "branch"),
])
def test_a_signed_delivery_naming_a_ref_git_would_misread_is_422_and_creates_nothing(repo, pipelines, payload,
                                                                                     field):
    error = assert_error(deliver("push", payload), 422, "build_invalid")
    assert list(error["fields"]) == [field]
    nothing_written()


@pytest.mark.django_db
def test_oversized_body_is_413_unread(repo, pipelines, settings):
    settings.WEBHOOK_MAX_BYTES = 2048
    payload = push_payload(message="x" * 4096)
    assert_error(deliver("push", payload), 413, "payload_too_large")
    nothing_written()


@pytest.mark.django_db
def test_only_post(repo):
    response = Client().get(WEBHOOK_URL)
    assert_error(response, 405, "method_not_allowed")
    assert response["Allow"] == "POST"


# ---------------------------------------------------------------- admin

@pytest.fixture
def ops(db: Any) -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("ops@example.com", "a-long-passphrase"))
    return client


@pytest.mark.django_db
def test_admin_sets_the_webhook_secret_encrypted_and_never_shows_it(ops, org, pipelines):
    add = reverse("admin:pipelines_repository_add")
    response = ops.post(add, {"organization": org.pk, "url": "https://github.com/acme/web.git",
                              "repo_name": "https://github.com/acme/web.git", "webhook_secret": WEBHOOK_SECRET})
    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else response
    repository = Repository.objects.get()
    assert repository.repo_name == "acme/web"
    assert WEBHOOK_SECRET not in repository.webhook_secret_encrypted
    assert decrypt_text(repository.webhook_secret_encrypted) == WEBHOOK_SECRET
    # The secret it stored verifies a delivery.
    assert deliver("push", push_payload()).status_code == 202

    change = reverse("admin:pipelines_repository_change", args=[repository.pk])
    page = ops.get(change).content.decode()
    assert WEBHOOK_SECRET not in page and repository.webhook_secret_encrypted not in page
    listing = ops.get(reverse("admin:pipelines_repository_changelist")).content.decode()
    assert WEBHOOK_SECRET not in listing and repository.webhook_secret_encrypted not in listing

    # Saving without typing a secret keeps the old one; typing one replaces it.
    before = repository.webhook_secret_encrypted
    ops.post(change, {"organization": org.pk, "url": "https://github.com/acme/web.git", "repo_name": "acme/web",
                      "webhook_secret": ""})
    repository.refresh_from_db()
    assert repository.webhook_secret_encrypted == before
    ops.post(change, {"organization": org.pk, "url": "https://github.com/acme/web.git", "repo_name": "acme/web",
                      "webhook_secret": "rotated"})
    repository.refresh_from_db()
    assert decrypt_text(repository.webhook_secret_encrypted) == "rotated"
    assert_error(deliver("push", push_payload()), 401, "webhook_signature_invalid")


@pytest.mark.django_db
def test_admin_refuses_a_second_repository_of_the_same_name_in_one_org(ops, org, repo):
    response = ops.post(reverse("admin:pipelines_repository_add"),
                        {"organization": org.pk, "url": "x", "repo_name": "ACME/web", "webhook_secret": "s"})
    assert response.status_code == 200  # the form again, with the error
    assert Repository.objects.count() == 1


@pytest.mark.django_db
def test_admin_shows_deliveries_read_only(ops, repo, pipelines):
    deliver("push", push_payload(), delivery="72d3162e-cc78-11e3-81ab-4c9367dc0958")
    delivery = WebhookDelivery.objects.get()
    listing = ops.get(reverse("admin:builds_webhookdelivery_changelist"))
    assert listing.status_code == 200 and b"72d3162e-cc78-11e3-81ab-4c9367dc0958" in listing.content
    assert ops.get(reverse("admin:builds_webhookdelivery_add")).status_code == 403
    change = reverse("admin:builds_webhookdelivery_change", args=[delivery.pk])
    ops.post(change, {"builds_created": 99})
    delivery.refresh_from_db()
    assert delivery.builds_created == 2


# ---------------------------------------------------------------- concurrency (PostgreSQL)

@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_redeliveries_build_once(org, repo, pipelines):
    if not is_postgres():
        pytest.skip("the redelivery race needs PostgreSQL (SQLite serialises all writers)")
    body = json.dumps(push_payload()).encode()
    delivery = str(uuid.uuid4())

    results = race(8, lambda i: deliver("push", None, body=body, delivery=delivery))

    # Each thread also works the queue off right after its delivery, so the workers race too.
    assert [r.status_code for r in results] == [202] * 8
    assert sorted(r.json()["queued"] for r in results) == [False] * 7 + [True]
    assert [o["builds_created"] for o in outcomes(results[0])] == [2]
    assert Build.objects.count() == 2
    assert built(pipelines) == {"main", "everything"}
    assert WebhookDelivery.objects.get().builds_created == 2
