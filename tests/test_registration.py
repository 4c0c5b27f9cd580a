"""Registering a repository's pipelines from the envelope the `harmont` package prints."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from builds.models import Build, Job
from harmont.crypto import decrypt_text
from pipelines.models import Pipeline, Repository
from tests.helpers import assert_error, make_build
from tests.repos import CI_PY, make_repo

URL = "/api/v0/organizations/{org}/pipelines/register"
REPO_URL = "https://github.com/Acme/Web.git"

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def envelope(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two pipelines (`ci`, `deploy`) rendered by the real harmont package from a .hm/ci.py."""
    repo, _ = make_repo(tmp_path_factory.mktemp("repo") / "web", {".hm/ci.py": CI_PY, "VERSION": "1.0\n"})
    return repo.envelope()


def register(client: Any, org: Any, envelope: Any, **body: Any) -> Any:
    payload = {"repository": REPO_URL, "default_branch": "main", "envelope": envelope, **body}
    return client.post(URL.format(org=org.slug), payload, format="json")


def without(envelope: dict[str, Any], slug: str) -> dict[str, Any]:
    trimmed = copy.deepcopy(envelope)
    trimmed["pipelines"] = [p for p in trimmed["pipelines"] if p["slug"] != slug]
    return trimmed


def test_register_creates_one_pipeline_per_entry(api, org, envelope, settings):
    response = register(api, org, envelope, webhook_secret="s3cret")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["repository"] == {"repo_name": "Acme/Web", "url": REPO_URL, "webhook_secret_set": True,
                                  "github_token_set": False,
                                  "webhook_url": f"{settings.PUBLIC_URL}/webhooks/github/Acme/Web"}
    assert body["archived"] == []
    ci, deploy = body["pipelines"]
    assert ci == {
        "slug": "acme-web-ci", "name": "CI", "description": None, "repository": REPO_URL, "repo_name": "Acme/Web",
        "default_branch": "main", "visibility": "private", "allow_manual": True, "source_slug": "ci",
        "definition": envelope["pipelines"][0]["definition"], "triggers": envelope["pipelines"][0]["triggers"],
        "fork_pull_requests": "build_without_secrets", "protected_branches": [], "default_retry": None,
        "cancel_intermediate_builds": False, "cancel_intermediate_builds_branch_filter": None,
        "max_concurrent_builds": None, "default_agents": None, "test_results_glob": "test-results/**/*.xml",
        "created_at": ci["created_at"],
    }
    assert (deploy["slug"], deploy["source_slug"], deploy["allow_manual"], deploy["triggers"]) == (
        "acme-web-deploy", "deploy", False, [{"event": "push", "tags": ["v*"]}])
    repo = Repository.objects.get(organization=org)
    # Encrypted at rest, readable by the server.
    assert "s3cret" not in repo.webhook_secret_encrypted and decrypt_text(repo.webhook_secret_encrypted) == "s3cret"
    assert "s3cret" not in response.content.decode()
    assert set(Pipeline.objects.filter(registered_from=repo).values_list("slug", flat=True)) == {
        "acme-web-ci", "acme-web-deploy"}


def test_envelope_as_a_json_string_and_explicit_repo_name(admin_api, org, envelope):
    response = register(admin_api, org, json.dumps(envelope), repo_name="acme/site")

    assert response.status_code == 200, response.content
    assert [p["slug"] for p in response.json()["pipelines"]] == ["acme-site-ci", "acme-site-deploy"]
    assert response.json()["repository"]["webhook_secret_set"] is False


def test_registering_again_is_idempotent(api, org, envelope):
    first = register(api, org, envelope, webhook_secret="one").json()
    ids = dict(Pipeline.objects.values_list("slug", "id"))

    again = register(api, org, envelope)

    assert again.status_code == 200
    assert [p["slug"] for p in again.json()["pipelines"]] == [p["slug"] for p in first["pipelines"]]
    assert dict(Pipeline.objects.values_list("slug", "id")) == ids
    assert Repository.objects.count() == 1
    # No webhook_secret given: the stored one stays.
    assert decrypt_text(Repository.objects.get().webhook_secret_encrypted) == "one"
    assert register(api, org, envelope, webhook_secret="").json()["repository"]["webhook_secret_set"] is False


def test_changed_entries_are_updated_in_place(api, org, envelope):
    register(api, org, envelope)
    changed = copy.deepcopy(envelope)
    changed["pipelines"][0]["name"] = "Continuous"
    changed["pipelines"][0]["triggers"] = [{"event": "push", "branches": ["trunk"]}]

    response = register(api, org, changed, default_branch="trunk")

    ci = Pipeline.objects.get(slug="acme-web-ci")
    assert (ci.name, ci.default_branch, ci.triggers) == ("Continuous", "trunk", [{"event": "push", "branches": ["trunk"]}])
    assert response.json()["pipelines"][0]["name"] == "Continuous"


def test_an_entry_that_disappeared_is_archived_with_its_builds_kept(api, org, envelope):
    register(api, org, envelope)
    deploy = Pipeline.objects.get(slug="acme-web-deploy")
    build = make_build(deploy, source="webhook")

    response = register(api, org, without(envelope, "deploy"))

    assert response.json()["archived"] == ["acme-web-deploy"]
    deploy.refresh_from_db()
    assert deploy.archived_at is not None
    assert Build.objects.filter(pk=build.pk).exists()
    listed = api.get(f"/api/v0/organizations/{org.slug}/pipelines").json()["data"]
    assert [p["slug"] for p in listed] == ["acme-web-ci"]
    assert_error(api.get(f"/api/v0/organizations/{org.slug}/pipelines/acme-web-deploy"), 404, "pipeline_not_found")
    # Coming back brings the same pipeline back, history and all.
    register(api, org, envelope)
    deploy.refresh_from_db()
    assert deploy.archived_at is None and deploy.builds.count() == 1


def test_registration_adopts_a_hand_made_pipeline_of_the_same_repository(api, org, pipeline, envelope):
    # The `pipeline` fixture is acme/web with source slug web-ci; make it the `ci` entry's slug.
    Pipeline.objects.filter(pk=pipeline.pk).update(slug="acme-web-ci", source_slug="ci")

    assert register(api, org, envelope).status_code == 200
    pipeline.refresh_from_db()
    assert pipeline.registered_from is not None and pipeline.name == "CI"


def test_a_slug_taken_by_another_repository_is_422_and_changes_nothing(api, org, pipeline, envelope):
    Pipeline.objects.filter(pk=pipeline.pk).update(slug="acme-web-ci", repo_name="someone/else")

    error = assert_error(register(api, org, envelope), 422, "pipeline_slug_taken")

    assert "envelope.pipelines[0].slug" in error["fields"]
    assert not Repository.objects.exists()
    assert list(Pipeline.objects.values_list("slug", flat=True)) == ["acme-web-ci"]


@pytest.mark.parametrize(("mutate", "field", "message"), [
    (lambda e: e.update(schema_version="2"), "envelope.schema_version", 'Must be "1".'),
    (lambda e: e.update(pipelines={}), "envelope.pipelines", "Must be a list."),
    (lambda e: e["pipelines"][0].update(slug="Bad Slug"), "envelope.pipelines[0].slug", "Must match"),
    (lambda e: e["pipelines"][1].update(slug="ci"), "envelope.pipelines[1].slug", "Duplicate pipeline slug 'ci'."),
    (lambda e: e["pipelines"][0].update(allow_manual="yes"), "envelope.pipelines[0].allow_manual", "Must be true"),
    (lambda e: e["pipelines"][0].update(triggers=[{"event": "push"}]), "envelope.pipelines[0].triggers[0]",
     "exactly one of branches or tags"),
    (lambda e: e["pipelines"][0]["triggers"][1].update(types=["merged"]), "envelope.pipelines[0].triggers[1]",
     "types must be"),
    (lambda e: e["pipelines"][0]["definition"].update(version="1"), "envelope.pipelines[0].definition",
     "bad_version: "),
    (lambda e: e["pipelines"][0]["definition"]["graph"]["edges"].append([1, 0, "depends_on"]),
     "envelope.pipelines[0].definition", "cycle: "),
    (lambda e: e["pipelines"][0]["definition"]["graph"]["edges"].append([0, 7, "depends_on"]),
     "envelope.pipelines[0].definition", "invalid_ir: "),
    (lambda e: e["pipelines"][0]["definition"]["graph"]["nodes"][1]["step"].update(key="build"),
     "envelope.pipelines[0].definition", "duplicate_key: "),
    (lambda e: e["pipelines"][0]["definition"]["graph"]["nodes"][0]["step"].pop("cmd"),
     "envelope.pipelines[0].definition", "missing_field: "),
    (lambda e: e["pipelines"][1].pop("definition"), "envelope.pipelines[1].definition", "definition_missing: "),
])
def test_invalid_envelopes_are_422_and_change_nothing(api, org, envelope, mutate, field, message):
    broken = copy.deepcopy(envelope)
    mutate(broken)

    error = assert_error(register(api, org, broken), 422, "pipeline_envelope_invalid")

    assert error["type"] == "validation_failed"
    assert any(m.startswith(message) or message in m for m in error["fields"][field]), error["fields"]
    assert not Pipeline.objects.exists() and not Repository.objects.exists()


def test_an_envelope_that_is_not_json_is_422(api, org):
    error = assert_error(register(api, org, "{not json"), 422, "pipeline_envelope_invalid")
    assert error["fields"] == {"envelope": ["Not valid JSON."]}


def test_missing_fields_are_422(api, org):
    response = api.post(URL.format(org=org.slug), {"envelope": {"schema_version": "1", "pipelines": []}},
                        format="json")
    error = assert_error(response, 422, "validation_failed")
    assert set(error["fields"]) == {"repository", "default_branch"}


def test_members_may_not_register(member_api, org, envelope):
    assert_error(register(member_api, org, envelope), 403, "insufficient_org_role")
    assert not Pipeline.objects.exists()


def test_another_organization_is_404(stranger_api, org, envelope):
    assert_error(register(stranger_api, org, envelope), 404, "organization_not_found")
    assert not Pipeline.objects.exists()


def test_a_pipeline_named_register_can_still_be_read(api, org):
    Pipeline.objects.create(organization=org, slug="register", name="register", repository="", default_branch="main",
                            source_slug="register")
    response = api.get(URL.format(org=org.slug))
    assert response.status_code == 200 and response.json()["slug"] == "register"


def test_by_repo_build_without_ir_builds_the_registered_definition(api, org, envelope):
    register(api, org, envelope)

    response = api.post(f"/api/v0/organizations/{org.slug}/builds", {
        "repo_name": "acme/web", "source_slug": "ci", "branch": "main", "commit": "abc123"}, format="json")

    assert response.status_code == 201, response.content
    build = Build.objects.get(pk=response.json()["id"])
    assert build.pipeline.slug == "acme-web-ci"
    assert dict(Job.objects.filter(build=build).values_list("step_key", "state")) == {
        "build": "scheduled", "test": "pending"}
