"""Builds API (the seed): create (by pipeline and by repo), list with filters, get, cancel."""

from __future__ import annotations

import base64
import gzip
import io
import json
import tarfile
import uuid
from datetime import datetime, timedelta, timezone as dt_timezone
from typing import Any

import pytest

from builds import services as build_services
from builds.models import Build, Job, JobState
from harmont.pagination import encode_cursor
from pipelines import services as pipeline_services
from pipelines.models import Pipeline
from tests.dsl import hm
from tests.helpers import (
    ISO_Z,
    assert_error,
    build_at,
    builds_url,
    cyclic_ir,
    iso,
    job_states,
    make_build,
    run_job,
    tarball,
    two_step_ir,
)

BUILD_KEYS = {"id", "number", "state", "pipeline_slug", "branch", "commit", "message", "source", "fork", "secret_access", "error_code",
              "error_message", "rebuild_of", "waiting_reason", "created_at", "scheduled_at", "started_at", "finished_at"}
T0 = datetime(2026, 6, 4, 12, 0, tzinfo=dt_timezone.utc)


def repo_url(org_slug: str) -> str:
    return f"/api/v0/organizations/{org_slug}/builds"


def post_build(client, pipeline: Pipeline, **body: Any):
    return client.post(builds_url(pipeline), {"branch": "main", "commit": "abc123", **body}, format="json")


def job(build: Build, key: str) -> Job:
    return Job.objects.get(build=build, step_key=key)


# ===================================================================== create


@pytest.mark.django_db
def test_create_returns_201_with_full_body(api, owner, pipeline):
    response = post_build(api, pipeline, message="Fix the thing", pipeline_ir=json.dumps(two_step_ir()))

    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == BUILD_KEYS
    stored = Build.objects.get(pipeline=pipeline)
    assert body == {
        "id": str(stored.id), "number": 1, "state": "scheduled", "pipeline_slug": "web-ci",
        "branch": "main", "commit": "abc123", "message": "Fix the thing", "source": "api", "fork": False,
        "secret_access": "all",  # an owner triggered it
        "error_code": None, "error_message": None, "rebuild_of": None, "waiting_reason": None,
        "created_at": iso(stored.created_at), "scheduled_at": iso(stored.created_at),
        "started_at": None, "finished_at": None,
    }
    assert ISO_Z.match(body["created_at"])
    assert stored.created_by == owner
    assert job_states(stored) == {"a": "scheduled", "b": "pending"}
    pipeline.refresh_from_db()
    assert pipeline.build_counter == 1


@pytest.mark.django_db
def test_create_numbers_builds_sequentially(api, pipeline):
    numbers = [post_build(api, pipeline).json()["number"] for _ in range(3)]
    assert numbers == [1, 2, 3]


@pytest.mark.django_db
@pytest.mark.parametrize("as_string", [True, False], ids=["json-string", "object"])
def test_create_uses_the_requests_ir(api, pipeline, as_string):
    test = hm.sh("make test", key="test", label="Unit tests")
    document = hm.pipeline([test, test.sh("make deploy", key="deploy")])

    response = post_build(api, pipeline, pipeline_ir=json.dumps(document) if as_string else document)

    assert response.status_code == 201, response.content
    stored = Build.objects.get(pk=response.json()["id"])
    jobs = list(Job.objects.filter(build=stored).order_by("position"))
    assert [(j.step_key, j.name, j.command, j.state) for j in jobs] == [
        ("test", "Unit tests", "make test", "scheduled"),
        ("deploy", "deploy", "make deploy", "pending"),  # no label: the name is the key
    ]
    assert stored.pipeline_ir == document


@pytest.mark.django_db
def test_create_without_ir_uses_stored_definition(api, pipeline):
    response = post_build(api, pipeline)

    assert response.status_code == 201
    stored = Build.objects.get(pk=response.json()["id"])
    assert job_states(stored) == {"a": "scheduled", "b": "pending"}
    assert stored.pipeline_ir == pipeline.definition


@pytest.mark.django_db
def test_create_with_blank_ir_uses_stored_definition(api, pipeline):
    response = post_build(api, pipeline, pipeline_ir="")

    assert response.status_code == 201
    assert job_states(Build.objects.get(pk=response.json()["id"])) == {"a": "scheduled", "b": "pending"}


@pytest.mark.django_db
def test_create_without_ir_definition_or_any_source_records_failed_build(api, org):
    # No repository and no source either: there is nothing to render a pipeline from.
    bare = pipeline_services.create_pipeline(org=org, name="Bare", repository="", default_branch="main")

    error = assert_error(post_build(api, bare), 422, "build_plan_rejected")

    assert error["type"] == "validation_failed"
    stored = Build.objects.get(pipeline=bare)
    assert (stored.number, stored.state, stored.error_code) == (1, "failed", "definition_missing")
    assert stored.error_message and stored.finished_at is not None
    assert not Job.objects.filter(build=stored).exists()


@pytest.mark.django_db
@pytest.mark.parametrize(("document", "error_code"), [
    (cyclic_ir(), "cycle"),
    ({**two_step_ir(), "version": "1"}, "bad_version"),
    ({"graph": two_step_ir()["graph"]}, "bad_version"),
    ("{not json", "invalid_json"),
    ("[1, 2]", "invalid_json"),
    ({"version": "0", "steps": [{"type": "command", "key": "a"}]}, "missing_field"),
    ({"version": "0", "steps": [{"type": "trigger", "key": "a"}]}, "unknown_step_type"),
    ({"version": "0", "steps": [{"type": "command", "key": "a", "cmd": "x"},
                                {"type": "command", "key": "a", "cmd": "y"}]}, "duplicate_key"),
    ({"version": "0", "steps": [{"type": "command", "key": "a", "cmd": "x", "depends_on": ["zz"]}]},
     "unknown_dependency"),
    ({"version": "0", "steps": [{"key": "a", "cmd": "x"}]}, "invalid_ir"),
    ({"version": "0", "graph": {"nodes": [], "edges": [[0, 1, "depends_on"]]}}, "invalid_ir"),
], ids=["cycle", "version-1", "no-version", "not-json", "json-array", "missing-cmd", "unknown-type",
        "duplicate-key", "unknown-dependency", "untyped-flat-step", "edge-out-of-range"])
def test_create_with_rejected_ir_records_failed_build(api, pipeline, document, error_code):
    response = post_build(api, pipeline, pipeline_ir=document)

    error = assert_error(response, 422, "build_plan_rejected")
    assert "#1" in error["message"] and error_code in error["message"]
    stored = Build.objects.get(pipeline=pipeline)
    assert (stored.number, stored.state, stored.error_code) == (1, "failed", error_code)
    assert stored.error_message
    assert stored.finished_at is not None and stored.scheduled_at is not None
    assert not Job.objects.filter(build=stored).exists()
    # The failed attempt is in the history like any other build...
    shown = api.get(builds_url(pipeline, "/1")).json()
    assert (shown["state"], shown["error_code"], shown["error_message"]) == ("failed", error_code,
                                                                           stored.error_message)
    assert shown["finished_at"] == iso(stored.finished_at)
    # ...and took its number.
    assert post_build(api, pipeline).json()["number"] == 2


@pytest.mark.django_db
def test_create_with_a_flat_step_without_type_is_422_build_plan_rejected_invalid_ir(api, pipeline):
    # Once planned as a command step; the flat form names every step's type.
    document = {"version": "0", "steps": [{"type": "command", "key": "a", "cmd": "make"}, {"key": "b", "cmd": "rm"}]}

    error = assert_error(post_build(api, pipeline, pipeline_ir=json.dumps(document)), 422, "build_plan_rejected")

    assert error["type"] == "validation_failed" and "fields" not in error
    assert error["message"] == ("Build #1 failed: the pipeline definition was rejected (invalid_ir): steps[1] has no "
                                "'type'; a flat step is {\"type\": \"command\", ...} or {\"type\": \"wait\"}.")
    stored = Build.objects.get(pipeline=pipeline)
    assert (stored.state, stored.error_code, stored.pipeline_ir) == ("failed", "invalid_ir", document)
    assert not Job.objects.filter(build=stored).exists()  # not one step of it runs


@pytest.mark.django_db
def test_create_with_empty_ir_is_skipped_with_no_jobs(api, pipeline):
    response = post_build(api, pipeline, pipeline_ir={"version": "0"})

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["state"] == "skipped"
    assert body["finished_at"] is not None and body["error_code"] is None
    stored = Build.objects.get(pk=body["id"])
    assert stored.state == "skipped"
    assert not Job.objects.filter(build=stored).exists()


@pytest.mark.django_db
@pytest.mark.parametrize(("body", "bad_fields"), [
    ({"commit": "abc123"}, {"branch"}),
    ({"branch": "main"}, {"commit"}),
    ({}, {"branch", "commit"}),
    ({"branch": "", "commit": None}, {"branch", "commit"}),
    ({"branch": 7, "commit": "abc123"}, {"branch"}),
    ({"branch": "x" * 256, "commit": "abc123"}, {"branch"}),
    ({"branch": "main", "commit": "abc123", "message": ["m"]}, {"message"}),
    ({"branch": "main", "commit": "abc123", "pipeline_ir": 5}, {"pipeline_ir"}),
    ({"branch": "main", "commit": "abc123", "source_sha256": "abc"}, {"source_sha256"}),
])
def test_create_with_invalid_fields_is_422_and_writes_nothing(api, pipeline, body, bad_fields):
    response = api.post(builds_url(pipeline), body, format="json")

    error = assert_error(response, 422, "build_invalid")
    assert set(error["fields"]) == bad_fields
    assert not Build.objects.exists()
    pipeline.refresh_from_db()
    assert pipeline.build_counter == 0
    # No number was used up: the next good build is #1.
    assert post_build(api, pipeline).json()["number"] == 1


@pytest.mark.django_db
@pytest.mark.parametrize("source_b64", ["not base64!!", "YWJ", "QUJD\nRA==", "ÄÖÜ", 12, ["YWJj"]])
def test_create_with_invalid_source_b64_is_422_and_writes_nothing(api, pipeline, settings, tmp_path, source_b64):
    settings.MEDIA_ROOT = tmp_path

    error = assert_error(post_build(api, pipeline, source_b64=source_b64), 422, "build_invalid")

    assert list(error["fields"]) == ["source_b64"]
    assert not Build.objects.exists()
    assert list(tmp_path.rglob("*")) == []


@pytest.mark.django_db
def test_create_with_source_b64_stores_the_archive(api, pipeline, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path
    archive = tarball({"Makefile": b"test:\n\ttrue\n"})

    response = post_build(api, pipeline, source_b64=base64.b64encode(archive).decode())

    assert response.status_code == 201, response.content
    stored = Build.objects.get(pk=response.json()["id"])
    assert stored.source_url == f"{settings.PUBLIC_URL}/api/v0/internal/builds/{stored.id}/source.tar.gz"
    assert stored.source_url.startswith("http://testserver/")
    with stored.source_archive.open("rb") as f:
        assert f.read() == archive
    assert (tmp_path / stored.source_archive.name).read_bytes() == archive
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(archive))) as tar:
        assert tar.getnames() == ["Makefile"]


@pytest.mark.django_db
def test_create_keeps_given_source_url_without_archive(api, pipeline):
    sha = "AB" * 32
    response = post_build(api, pipeline, source_url="https://example.com/src.tgz", source_sha256=sha)

    stored = Build.objects.get(pk=response.json()["id"])
    assert (stored.source_url, stored.source_sha256) == ("https://example.com/src.tgz", sha.lower())
    assert not stored.source_archive


@pytest.mark.django_db
@pytest.mark.parametrize("env", [["A=1"], {"A": 1}, {"A": None}, "A=1", {"A": {"B": "c"}}])
def test_create_with_non_string_map_env_is_422(api, pipeline, env):
    error = assert_error(post_build(api, pipeline, env=env), 422, "build_invalid")
    assert list(error["fields"]) == ["env"]
    assert not Build.objects.exists()


@pytest.mark.django_db
def test_build_env_reaches_every_job_with_precedence(api, pipeline):
    # base < node < step < build
    first = hm.sh("echo a", key="a", env={"TERM": "xterm", "LAYER": "node", "STEP": "node", "BUILD": "node"})
    document = hm.pipeline([first.sh("echo b", key="b")])
    document["graph"]["nodes"][0]["step"]["env"] = {"STEP": "step", "BUILD": "step"}

    response = post_build(api, pipeline, pipeline_ir=document, env={"BUILD": "build", "EXTRA": "1"})

    assert response.status_code == 201, response.content
    stored = Build.objects.get(pk=response.json()["id"])
    assert stored.env == {"BUILD": "build", "EXTRA": "1"}
    envs = dict(Job.objects.filter(build=stored).values_list("step_key", "env"))
    assert envs == {
        "a": {"DEBIAN_FRONTEND": "noninteractive", "TERM": "xterm", "LAYER": "node", "STEP": "step",
              "BUILD": "build", "EXTRA": "1"},
        "b": {"DEBIAN_FRONTEND": "noninteractive", "TERM": "dumb", "BUILD": "build", "EXTRA": "1"},
    }


@pytest.mark.django_db
def test_build_env_applies_to_stored_definition_too(api, pipeline):
    response = post_build(api, pipeline, env={"TERM": "vt100"})

    envs = Job.objects.filter(build_id=response.json()["id"]).values_list("env", flat=True)
    assert [env["TERM"] for env in envs] == ["vt100", "vt100"]


@pytest.mark.django_db
def test_source_defaults_to_api(api, pipeline):
    response = post_build(api, pipeline)
    assert response.json()["source"] == "api"
    assert Build.objects.get().source == "api"


@pytest.mark.django_db
@pytest.mark.parametrize("source", ["ui", "api"])
def test_both_client_sources_are_accepted(api, pipeline, source):
    response = post_build(api, pipeline, source=source)
    assert response.status_code == 201
    assert Build.objects.get(pk=response.json()["id"]).source == source


@pytest.mark.django_db
@pytest.mark.parametrize("source", ["cron", "API", 3])
def test_unknown_source_is_422(api, pipeline, source):
    error = assert_error(post_build(api, pipeline, source=source), 422, "build_invalid")
    assert list(error["fields"]) == ["source"]
    assert not Build.objects.exists()


@pytest.fixture
def webhook_only(org) -> Pipeline:
    return pipeline_services.create_pipeline(org=org, name="Webhook only", repository="https://github.com/acme/hooks",
                                             default_branch="main", allow_manual=False, definition=two_step_ir())


@pytest.mark.django_db
@pytest.mark.parametrize("source", ["api", "ui", None])
def test_manual_build_on_webhook_only_pipeline_is_403(api, webhook_only, source):
    body = {"source": source} if source else {}
    error = assert_error(post_build(api, webhook_only, **body), 403, "pipeline_manual_disabled")

    assert error["type"] == "forbidden"
    assert not Build.objects.exists()
    webhook_only.refresh_from_db()
    assert webhook_only.build_counter == 0


@pytest.mark.django_db
@pytest.mark.parametrize("by_repo", [False, True])
@pytest.mark.parametrize("source", ["webhook", "schedule", "trigger_job"])
def test_a_client_claiming_a_server_source_is_422_and_passes_no_gate(api, org, webhook_only, source, by_repo):
    # These sources are the server's own (they pass allow_manual: false); a client may not claim them.
    body = {"branch": "main", "commit": "abc123", "source": source}
    if by_repo:
        response = api.post(repo_url(org.slug), {**body, "repo_name": "acme/hooks", "source_slug": webhook_only.slug},
                            format="json")
    else:
        response = post_build(api, webhook_only, **body)

    error = assert_error(response, 422, "build_invalid")
    assert error["fields"] == {"source": ["Must be one of: api, ui."]}
    assert not Build.objects.exists()
    webhook_only.refresh_from_db()
    assert webhook_only.build_counter == 0


INJECTED = "--upload-pack=touch /tmp/x;git-upload-pack"


@pytest.mark.django_db
@pytest.mark.parametrize("by_repo", [False, True])
@pytest.mark.parametrize(("branch", "commit", "bad"), [
    (INJECTED, "HEAD", "branch"),
    ("main", INJECTED, "commit"),
    ("-main", "abc123", "branch"),
    ("feature x", "abc123", "branch"),
    ("main\n", "abc123", "branch"),
    ("main\x7f", "abc123", "branch"),
    ("a..b", "abc123", "branch"),
    ("main@{1}", "abc123", "branch"),
    ("main.lock", "abc123", "branch"),
    ("main/", "abc123", "branch"),
    ("/main", "abc123", "branch"),
    ("a//b", "abc123", "branch"),
    ("a/.hidden", "abc123", "branch"),
    ("main.", "abc123", "branch"),
    ("@", "abc123", "branch"),
    *((f"a{char}b", "abc123", "branch") for char in "~^:?*[\\"),
    ("m" * 256, "abc123", "branch"),
    ("main", "abc", "commit"),
    ("main", "a" * 65, "commit"),
    ("main", "HEAD~1", "commit"),
    ("main", "head", "commit"),
    ("main", "main", "commit"),
    ("main", "abcdefg", "commit"),
])
def test_a_branch_or_commit_git_would_misread_is_422_and_writes_nothing(api, org, pipeline, branch, commit, bad,
                                                                        by_repo):
    if by_repo:
        response = api.post(repo_url(org.slug), {"repo_name": pipeline.repo_name, "source_slug": pipeline.source_slug,
                                                 "branch": branch, "commit": commit}, format="json")
    else:
        response = post_build(api, pipeline, branch=branch, commit=commit)

    error = assert_error(response, 422, "build_invalid")
    assert list(error["fields"]) == [bad]
    assert not Build.objects.exists()
    pipeline.refresh_from_db()
    assert pipeline.build_counter == 0


@pytest.mark.django_db
@pytest.mark.parametrize(("branch", "commit"), [
    ("main", "HEAD"), ("release/1.x", "abcd"), ("feature/ünï-cödé", "A" * 64), ("v1.0.0-rc.1", "0123456789abcdef"),
    ("m" * 255, "f" * 40), ("dependabot/npm_and_yarn/lodash-4.17.21", "abc123"),
])
def test_git_ref_names_and_commit_ids_are_accepted(api, pipeline, branch, commit):
    response = post_build(api, pipeline, branch=branch, commit=commit)
    assert response.status_code == 201, response.content
    assert (response.json()["branch"], response.json()["commit"]) == (branch, commit)


@pytest.mark.django_db
@pytest.mark.parametrize("body", [[{"branch": "main", "commit": "abc123"}], "main", 5, None])
def test_create_with_non_object_body_is_400(api, pipeline, body):
    response = api.post(builds_url(pipeline), data=json.dumps(body), content_type="application/json")
    assert_error(response, 400, "invalid_request")
    assert not Build.objects.exists()


@pytest.mark.django_db
def test_create_with_malformed_json_is_400(api, pipeline):
    response = api.post(builds_url(pipeline), data='{"branch": "main",', content_type="application/json")
    assert_error(response, 400, "invalid_json")
    assert not Build.objects.exists()


@pytest.mark.django_db
def test_create_on_unknown_pipeline_is_404(api, org, pipeline):
    assert_error(api.post(builds_url("nope", org_slug=org.slug), {"branch": "m", "commit": "c0ffee"}, format="json"),
                 404, "pipeline_not_found")


@pytest.mark.django_db
def test_create_on_other_orgs_pipeline_is_404(api, other_pipeline):
    assert_error(post_build(api, other_pipeline), 404, "organization_not_found")
    assert not Build.objects.exists()


@pytest.mark.django_db
def test_member_may_create_a_build(member_api, member, pipeline):
    response = post_build(member_api, pipeline)
    assert response.status_code == 201
    assert Build.objects.get().created_by == member


@pytest.mark.django_db
def test_create_without_token_is_401(anon, pipeline):
    assert_error(post_build(anon, pipeline), 401, "unauthorized")
    assert not Build.objects.exists()


# ===================================================================== create by repo


def repo_body(**fields: Any) -> dict[str, Any]:
    return {"branch": "main", "commit": "abc123", "repo_name": "acme/web", "source_slug": "ci", **fields}


@pytest.mark.django_db
def test_create_by_repo_matches_repo_name_case_insensitively(api, org, pipeline):
    response = api.post(repo_url(org.slug), repo_body(repo_name="ACME/Web"), format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == BUILD_KEYS
    assert (body["pipeline_slug"], body["number"], body["state"]) == ("web-ci", 1, "scheduled")
    assert Build.objects.get().pipeline == pipeline


@pytest.mark.django_db
def test_create_by_repo_matches_source_slug_exactly(api, org, pipeline):
    assert_error(api.post(repo_url(org.slug), repo_body(source_slug="CI"), format="json"), 404, "pipeline_not_found")
    assert not Build.objects.exists()


@pytest.mark.django_db
def test_create_by_repo_picks_the_oldest_matching_pipeline(api, org, pipeline):
    pipeline_services.create_pipeline(org=org, name="Web CI again", repository="git@github.com:Acme/Web.git",
                                      default_branch="main", source_slug="ci", definition=two_step_ir())

    response = api.post(repo_url(org.slug), repo_body(), format="json")

    assert response.json()["pipeline_slug"] == "web-ci"


@pytest.mark.django_db
def test_create_by_repo_skips_archived_pipelines(api, org, pipeline):
    younger = pipeline_services.create_pipeline(org=org, name="Web CI again", repository="https://github.com/acme/web",
                                                default_branch="main", source_slug="ci", definition=two_step_ir())
    Pipeline.objects.filter(pk=pipeline.pk).update(archived_at=T0)

    response = api.post(repo_url(org.slug), repo_body(), format="json")

    assert response.json()["pipeline_slug"] == younger.slug


@pytest.mark.django_db
def test_create_by_repo_finds_api_created_pipeline_by_its_slug(admin_api, org):
    created = admin_api.post(f"/api/v0/organizations/{org.slug}/pipelines",
                             {"name": "Deploy", "repository": "https://github.com/acme/deploy.git",
                              "default_branch": "main", "definition": two_step_ir()}, format="json")
    assert created.status_code == 201

    response = admin_api.post(repo_url(org.slug), repo_body(repo_name="acme/deploy", source_slug="deploy"),
                              format="json")

    assert response.status_code == 201
    assert response.json()["pipeline_slug"] == "deploy"


@pytest.mark.django_db
@pytest.mark.parametrize(("repo_name", "source_slug"), [("acme/nope", "ci"), ("acme/web", "deploy")])
def test_create_by_repo_without_match_is_404(api, org, pipeline, repo_name, source_slug):
    response = api.post(repo_url(org.slug), repo_body(repo_name=repo_name, source_slug=source_slug), format="json")
    assert_error(response, 404, "pipeline_not_found")
    assert not Build.objects.exists()


@pytest.mark.django_db
def test_create_by_repo_does_not_find_other_orgs_pipeline(api, org, other_org, other_pipeline):
    body = repo_body(repo_name="other/web", source_slug=other_pipeline.source_slug)
    assert_error(api.post(repo_url(org.slug), body, format="json"), 404, "pipeline_not_found")
    assert_error(api.post(repo_url(other_org.slug), body, format="json"), 404, "organization_not_found")
    assert not Build.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("missing", ["repo_name", "source_slug"])
def test_create_by_repo_without_repo_fields_is_422(api, org, pipeline, missing):
    body = repo_body()
    del body[missing]

    error = assert_error(api.post(repo_url(org.slug), body, format="json"), 422, "build_invalid")

    assert list(error["fields"]) == [missing]
    assert not Build.objects.exists()


@pytest.mark.django_db
def test_create_by_repo_checks_branch_and_commit(api, org, pipeline):
    error = assert_error(api.post(repo_url(org.slug), repo_body(branch=None), format="json"), 422, "build_invalid")
    assert "branch" in error["fields"]


@pytest.mark.django_db
def test_create_by_repo_with_rejected_ir_records_failed_build(api, org, pipeline):
    response = api.post(repo_url(org.slug), repo_body(pipeline_ir=cyclic_ir()), format="json")

    assert_error(response, 422, "build_plan_rejected")
    assert Build.objects.get(pipeline=pipeline).error_code == "cycle"


@pytest.mark.django_db
def test_create_by_repo_respects_allow_manual(api, org, webhook_only):
    body = repo_body(repo_name="acme/hooks", source_slug="webhook-only")
    assert_error(api.post(repo_url(org.slug), body, format="json"), 403, "pipeline_manual_disabled")
    assert_error(api.post(repo_url(org.slug), {**body, "source": "webhook"}, format="json"), 422, "build_invalid")
    assert not Build.objects.exists()


@pytest.mark.django_db
def test_create_by_repo_with_array_body_is_400(api, org, pipeline):
    assert_error(api.post(repo_url(org.slug), [repo_body()], format="json"), 400, "invalid_request")


# ===================================================================== list


@pytest.mark.django_db
def test_list_is_newest_first_with_full_body(api, pipeline, other_pipeline):
    first = make_build(pipeline, message="one")
    second = make_build(pipeline, branch="dev", message="two")
    make_build(other_pipeline)

    response = api.get(builds_url(pipeline))

    assert response.status_code == 200
    body = response.json()
    assert body["next_cursor"] is None
    assert [b["number"] for b in body["data"]] == [2, 1]
    assert body["data"][0] == {
        "id": str(second.id), "number": 2, "state": "scheduled", "pipeline_slug": "web-ci", "branch": "dev",
        "commit": "abc123", "message": "two", "source": "api", "fork": False,
        "secret_access": "unprotected", "error_code": None, "error_message": None, "rebuild_of": None, "waiting_reason": None,
        "created_at": iso(second.created_at), "scheduled_at": iso(second.scheduled_at), "started_at": None,
        "finished_at": None,
    }
    assert body["data"][1]["id"] == str(first.id)


@pytest.mark.django_db
def test_list_of_pipeline_without_builds_is_empty(api, pipeline):
    assert api.get(builds_url(pipeline)).json() == {"data": [], "next_cursor": None}


def walk(client, url: str, params: dict[str, Any]) -> tuple[list[int], int]:
    """Every build number across all pages, and how many pages it took."""
    numbers: list[int] = []
    cursor, pages = None, 0
    while True:
        response = client.get(url, {**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.content
        body = response.json()
        pages += 1
        assert len(body["data"]) <= int(params.get("limit", 50))
        numbers += [b["number"] for b in body["data"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return numbers, pages
        assert pages < 100


@pytest.mark.django_db
def test_list_walks_pages_without_duplicates_or_gaps(api, pipeline):
    for _ in range(7):
        make_build(pipeline)

    numbers, pages = walk(api, builds_url(pipeline), {"limit": 3})

    assert numbers == [7, 6, 5, 4, 3, 2, 1]
    assert pages == 3


@pytest.mark.django_db
def test_list_walks_filtered_pages_without_duplicates_or_gaps(api, pipeline):
    for n in range(1, 14):
        make_build(pipeline, branch="main" if n % 3 else "dev")
    expected = [n for n in range(13, 0, -1) if n % 3]

    numbers, pages = walk(api, builds_url(pipeline), {"limit": 2, "branch": "main"})

    assert numbers == expected
    assert pages == (len(expected) + 1) // 2


@pytest.mark.django_db
def test_list_filters_by_branch_state_commit_and_source(api, pipeline):
    make_build(pipeline, branch="main", commit="c1c1", source="api")                  # 1 scheduled
    make_build(pipeline, branch="dev", commit="c2c2", source="webhook")               # 2 scheduled
    make_build(pipeline, branch="dev", commit="c1c1", pipeline_ir={"version": "0"})   # 3 skipped
    make_build(pipeline, branch="main", commit="c3c3", source="schedule")             # 4 scheduled

    def numbers(**params: str) -> list[int]:
        response = api.get(builds_url(pipeline), params)
        assert response.status_code == 200, response.content
        return [b["number"] for b in response.json()["data"]]

    assert numbers(branch="dev") == [3, 2]
    assert numbers(branch="Dev") == []  # exact match
    assert numbers(commit="c1c1") == [3, 1]
    assert numbers(state="skipped") == [3]
    assert numbers(state="scheduled") == [4, 2, 1]
    assert numbers(source="webhook") == [2]
    assert numbers(source="api") == [3, 1]
    assert numbers(branch="dev", state="scheduled") == [2]
    assert numbers(branch="main", commit="c3c3", source="schedule") == [4]
    assert numbers(state="failed") == []


@pytest.mark.django_db
def test_list_filters_by_created_range(api, pipeline):
    for hours in range(5):
        build_at(pipeline, T0 + timedelta(hours=hours))  # numbers 1..5

    def numbers(**params: str) -> list[int]:
        response = api.get(builds_url(pipeline), params)
        assert response.status_code == 200, response.content
        return [b["number"] for b in response.json()["data"]]

    assert numbers(created_after=iso(T0 + timedelta(hours=2))) == [5, 4, 3]  # inclusive
    assert numbers(created_before=iso(T0 + timedelta(hours=2))) == [2, 1]  # exclusive
    assert numbers(created_after="2026-06-04T13:00:00+00:00", created_before="2026-06-04T15:00:00Z") == [3, 2]
    assert numbers(created_after="2026-06-04T14:00:00+02:00") == [5, 4, 3, 2, 1]


@pytest.mark.django_db
def test_list_filter_combined_with_created_and_cursor(api, pipeline):
    for hours in range(10):
        build_at(pipeline, T0 + timedelta(hours=hours), branch="main" if hours % 2 else "dev")

    numbers, _ = walk(api, builds_url(pipeline), {"limit": 2, "branch": "main",
                                                  "created_after": iso(T0 + timedelta(hours=3))})

    assert numbers == [10, 8, 6, 4]  # main is every even number; created_after is inclusive


@pytest.mark.django_db
@pytest.mark.parametrize(("params", "field"), [
    ({"created_after": "yesterday"}, "created_after"),
    ({"created_before": "2026-13-01T00:00:00Z"}, "created_before"),
    ({"state": "exploded"}, "state"),
    ({"source": "cron"}, "source"),
])
def test_list_with_bad_filter_is_400(api, pipeline, params, field):
    make_build(pipeline)
    error = assert_error(api.get(builds_url(pipeline), params), 400, "invalid_filter")
    assert error["type"] == "invalid_request"
    assert list(error["fields"]) == [field]


@pytest.mark.django_db
@pytest.mark.parametrize(("params", "code"), [
    ({"limit": "0"}, "invalid_limit"), ({"limit": "101"}, "invalid_limit"), ({"limit": "x"}, "invalid_limit"),
    ({"cursor": "%%%"}, "invalid_cursor"), ({"cursor": "eyJrIjogbnVsbH0"}, "invalid_cursor"),
])
def test_list_with_bad_page_params_is_400(api, pipeline, params, code):
    assert_error(api.get(builds_url(pipeline), params), 400, code)


@pytest.mark.django_db
@pytest.mark.parametrize("key", [0, -5, 10**30, -(10**30)])
def test_list_with_out_of_range_cursor_key_is_harmless(api, pipeline, key):
    make_build(pipeline)

    response = api.get(builds_url(pipeline), {"cursor": encode_cursor(key)})

    assert response.status_code == 200
    assert [b["number"] for b in response.json()["data"]] == ([1] if key > 1 else [])


@pytest.mark.django_db
def test_list_of_unknown_pipeline_is_404(api, org):
    assert_error(api.get(builds_url("nope", org_slug=org.slug)), 404, "pipeline_not_found")


@pytest.mark.django_db
def test_list_of_other_orgs_pipeline_is_404(api, other_pipeline):
    make_build(other_pipeline)
    assert_error(api.get(builds_url(other_pipeline)), 404, "organization_not_found")


# ===================================================================== get


@pytest.mark.django_db
def test_get_returns_full_body(api, pipeline, build):
    response = api.get(builds_url(pipeline, "/1"))

    assert response.status_code == 200
    assert response.json() == {
        "id": str(build.id), "number": 1, "state": "scheduled", "pipeline_slug": "web-ci", "branch": "main",
        "commit": "abc123", "message": "first build", "source": "api", "fork": False, "secret_access": "unprotected", "error_code": None,
        "error_message": None, "rebuild_of": None, "waiting_reason": None, "created_at": iso(build.created_at), "scheduled_at": iso(build.scheduled_at),
        "started_at": None, "finished_at": None,
    }


@pytest.mark.django_db
@pytest.mark.parametrize("number", ["01", "+1", "001", "+" + "0" * 30 + "1"])
def test_get_by_decimal_variants_of_one(api, pipeline, build, number):
    response = api.get(builds_url(pipeline, f"/{number}"))
    assert response.status_code == 200
    assert response.json()["id"] == str(build.id)


@pytest.mark.django_db
@pytest.mark.parametrize("number", ["abc", "-1", "0", "2", "99999999999999", "2147483648", "1.0", "1e0", "0x1",
                                    "++1", "+-1", "%C2%B2", "%D9%A1", "%201", "1%20", "1_0", "1" * 5000])
def test_get_by_bad_or_unknown_number_is_404(api, pipeline, build, number):
    # %C2%B2 is "²" and %D9%A1 an Arabic-Indic one: str.isdigit() says yes, int() disagrees or reads "1".
    error = assert_error(api.get(builds_url(pipeline, f"/{number}")), 404, "build_not_found")
    assert error["type"] == "not_found"


@pytest.mark.django_db
def test_get_in_unknown_pipeline_is_404(api, org, pipeline, build):
    assert_error(api.get(builds_url("nope", "/1", org_slug=org.slug)), 404, "pipeline_not_found")


@pytest.mark.django_db
def test_get_other_orgs_build_is_404(api, other_pipeline):
    make_build(other_pipeline)
    assert_error(api.get(builds_url(other_pipeline, "/1")), 404, "organization_not_found")


@pytest.mark.django_db
def test_get_build_of_archived_pipeline_is_404(api, pipeline, build):
    Pipeline.objects.filter(pk=pipeline.pk).update(archived_at=T0)
    assert_error(api.get(builds_url(pipeline, "/1")), 404, "pipeline_not_found")


@pytest.mark.django_db
def test_member_may_read_builds(member_api, pipeline, build):
    assert member_api.get(builds_url(pipeline, "/1")).json()["id"] == str(build.id)


# ===================================================================== cancel


@pytest.mark.django_db
def test_cancel_scheduled_build(api, pipeline, build):
    response = api.put(builds_url(pipeline, "/1/cancel"))

    assert response.status_code == 200, response.content
    build.refresh_from_db()
    assert build.state == "canceled"
    assert build.cancel_requested_at is not None and build.finished_at is not None
    assert response.json() == {
        "id": str(build.id), "number": 1, "state": "canceled", "pipeline_slug": "web-ci", "branch": "main",
        "commit": "abc123", "message": "first build", "source": "api", "fork": False, "secret_access": "unprotected", "error_code": None,
        "error_message": None, "rebuild_of": None, "waiting_reason": None, "created_at": iso(build.created_at), "scheduled_at": iso(build.scheduled_at),
        "started_at": None, "finished_at": iso(build.finished_at),
    }
    assert job_states(build) == {"a": "canceled", "b": "canceled"}
    assert all(j.finished_at is not None for j in Job.objects.filter(build=build))


@pytest.mark.django_db
def test_cancel_with_running_job_waits_for_the_agent(api, pipeline, build):
    first = job(build, "a")
    assert build_services.move_job(job=first, state=JobState.ASSIGNED)
    assert build_services.move_job(job=first, state=JobState.RUNNING)
    build.refresh_from_db()
    assert (build.state, build.started_at is not None) == ("running", True)

    response = api.put(builds_url(pipeline, "/1/cancel"))

    assert response.status_code == 200
    assert (response.json()["state"], response.json()["finished_at"]) == ("canceled", None)
    build.refresh_from_db()
    assert (build.state, build.finished_at) == ("canceled", None)
    assert job_states(build) == {"a": "canceling", "b": "canceled"}

    # The agent stops the job and reports.
    first.refresh_from_db()
    assert build_services.finish_job(job=first, state=JobState.CANCELED, exit_code=143)
    build.refresh_from_db()
    first.refresh_from_db()
    assert build.state == "canceled"
    assert build.finished_at is not None and first.finished_at is not None
    assert (first.state, first.exit_code) == ("canceled", 143)
    assert api.get(builds_url(pipeline, "/1")).json()["finished_at"] == iso(build.finished_at)


@pytest.mark.django_db
def test_cancel_moves_assigned_job_to_canceling(api, pipeline, build):
    first = job(build, "a")
    assert build_services.move_job(job=first, state=JobState.ASSIGNED)

    api.put(builds_url(pipeline, "/1/cancel"))

    assert job_states(build) == {"a": "canceling", "b": "canceled"}
    build.refresh_from_db()
    assert (build.state, build.finished_at) == ("canceled", None)


@pytest.mark.django_db
def test_cancel_twice_is_a_no_op(api, pipeline, build):
    first = api.put(builds_url(pipeline, "/1/cancel"))
    build.refresh_from_db()
    requested, finished = build.cancel_requested_at, build.finished_at

    second = api.put(builds_url(pipeline, "/1/cancel"))

    assert second.status_code == 200
    assert second.json() == first.json()
    build.refresh_from_db()
    assert (build.cancel_requested_at, build.finished_at) == (requested, finished)


@pytest.mark.django_db
def test_cancel_twice_while_job_is_canceling_is_a_no_op(api, pipeline, build):
    first = job(build, "a")
    build_services.move_job(job=first, state=JobState.ASSIGNED)
    build_services.move_job(job=first, state=JobState.RUNNING)
    once = api.put(builds_url(pipeline, "/1/cancel")).json()

    again = api.put(builds_url(pipeline, "/1/cancel"))

    assert again.status_code == 200
    assert again.json() == once
    assert job_states(build) == {"a": "canceling", "b": "canceled"}


def _passed(build: Build) -> None:
    run_job(job(build, "a"))
    run_job(job(build, "b"))


def _failed(build: Build) -> None:
    run_job(job(build, "a"), JobState.FAILED, exit_code=1)


@pytest.mark.django_db
@pytest.mark.parametrize(("finish", "state"), [(_passed, "passed"), (_failed, "failed")])
def test_cancel_of_finished_build_is_409(api, pipeline, build, finish, state):
    finish(build)
    build.refresh_from_db()
    assert build.state == state
    before = (build.state, build.finished_at, job_states(build))

    error = assert_error(api.put(builds_url(pipeline, "/1/cancel")), 409, "build_already_finished")

    assert error["type"] == "conflict"
    build.refresh_from_db()
    assert (build.state, build.finished_at, job_states(build)) == before
    assert build.cancel_requested_at is None


@pytest.mark.django_db
def test_cancel_of_skipped_build_is_409(api, pipeline):
    skipped = make_build(pipeline, pipeline_ir={"version": "0"})

    assert_error(api.put(builds_url(pipeline, "/1/cancel")), 409, "build_already_finished")

    skipped.refresh_from_db()
    assert (skipped.state, skipped.cancel_requested_at) == ("skipped", None)


@pytest.mark.django_db
def test_cancel_of_rejected_build_is_409(api, pipeline):
    assert_error(post_build(api, pipeline, pipeline_ir="{"), 422, "build_plan_rejected")

    assert_error(api.put(builds_url(pipeline, "/1/cancel")), 409, "build_already_finished")

    assert Build.objects.get().state == "failed"


@pytest.mark.django_db
def test_member_may_cancel(member_api, pipeline, build):
    assert member_api.put(builds_url(pipeline, "/1/cancel")).status_code == 200
    build.refresh_from_db()
    assert build.state == "canceled"


@pytest.mark.django_db
def test_cancel_of_other_orgs_build_is_404(api, other_pipeline):
    foreign = make_build(other_pipeline)

    assert_error(api.put(builds_url(other_pipeline, "/1/cancel")), 404, "organization_not_found")

    foreign.refresh_from_db()
    assert foreign.state == "scheduled" and foreign.cancel_requested_at is None


@pytest.mark.django_db
def test_cancel_of_unknown_build_is_404(api, pipeline, build):
    assert_error(api.put(builds_url(pipeline, "/2/cancel")), 404, "build_not_found")
    assert_error(api.put(builds_url(pipeline, "/x/cancel")), 404, "build_not_found")


@pytest.mark.django_db
def test_cancel_with_wrong_method_is_405(api, pipeline, build):
    assert_error(api.post(builds_url(pipeline, "/1/cancel")), 405, "method_not_allowed")
    build.refresh_from_db()
    assert build.state == "scheduled"


@pytest.mark.django_db
def test_build_ids_are_uuids(api, pipeline):
    body = post_build(api, pipeline).json()
    assert uuid.UUID(body["id"]).version == 4


@pytest.mark.django_db
def test_create_by_repo_reports_every_missing_field_at_once(api, org, pipeline):
    response = api.post(repo_url(org.slug), {"commit": "abc123", "source_slug": ""}, format="json")
    error = assert_error(response, 422, "build_invalid")
    assert set(error["fields"]) == {"branch", "repo_name", "source_slug"}
    assert not Build.objects.exists()


@pytest.mark.django_db
def test_rejected_ir_string_that_parsed_is_stored_as_the_document(api, pipeline):
    document = {"version": "0", "steps": [{"type": "command", "key": "a", "cmd": "x", "depends_on": ["zz"]}]}
    assert_error(post_build(api, pipeline, pipeline_ir=json.dumps(document)), 422, "build_plan_rejected")
    assert Build.objects.get().pipeline_ir == document


@pytest.mark.django_db
def test_rejected_ir_that_is_not_json_is_kept_verbatim(api, pipeline):
    assert_error(post_build(api, pipeline, pipeline_ir="{nope"), 422, "build_plan_rejected")
    assert Build.objects.get().pipeline_ir == {"raw": "{nope"}
