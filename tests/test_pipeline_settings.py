"""PATCH /organizations/{org}/pipelines/{pipeline}: admins change a pipeline's settings; bad input changes nothing."""

from __future__ import annotations

import pytest

from pipelines.models import Pipeline
from tests.helpers import assert_error, two_step_ir


def url(org_slug: str, pipeline_slug: str) -> str:
    return f"/api/v0/organizations/{org_slug}/pipelines/{pipeline_slug}"


@pytest.mark.django_db
def test_patch_changes_only_the_given_fields(api, org, pipeline):
    response = api.patch(url(org.slug, pipeline.slug), {
        "name": "Web CI (main)", "allow_manual": False, "protected_branches": ["release/*"],
        "fork_pull_requests": "require_approval", "visibility": "public",
    }, format="json")

    assert response.status_code == 200
    body = response.json()
    assert body["slug"] == "web-ci"  # the slug stays: URLs and webhooks name it
    assert body["name"] == "Web CI (main)"
    assert body["allow_manual"] is False
    assert body["protected_branches"] == ["release/*"]
    assert body["fork_pull_requests"] == "require_approval"
    assert body["visibility"] == "public"
    assert body["definition"] == two_step_ir()  # untouched
    assert body["default_branch"] == "main"
    pipeline.refresh_from_db()
    assert (pipeline.name, pipeline.allow_manual, pipeline.protected_branches) == ("Web CI (main)", False,
                                                                                  ["release/*"])
    assert api.get(url(org.slug, pipeline.slug)).json() == body


@pytest.mark.django_db
def test_patch_of_repository_derives_repo_name_again(api, org, pipeline):
    body = api.patch(url(org.slug, pipeline.slug), {"repository": "git@github.com:acme/api.git"},
                     format="json").json()
    assert (body["repository"], body["repo_name"]) == ("git@github.com:acme/api.git", "acme/api")


@pytest.mark.django_db
def test_patch_definition_null_clears_it_and_a_bad_one_is_refused(api, org, pipeline):
    bad = api.patch(url(org.slug, pipeline.slug), {"definition": {"version": "0", "steps": [{"type": "nope"}]},
                                                   "name": "Renamed"}, format="json")
    body = assert_error(bad, 422, "pipeline_invalid")
    assert "definition" in body["fields"]
    pipeline.refresh_from_db()
    assert pipeline.name == "Web CI" and pipeline.definition == two_step_ir()  # nothing written

    cleared = api.patch(url(org.slug, pipeline.slug), {"definition": None}, format="json")
    assert cleared.status_code == 200 and cleared.json()["definition"] is None
    pipeline.refresh_from_db()
    assert pipeline.definition is None


@pytest.mark.django_db
@pytest.mark.parametrize("body, field", [
    ({"allow_manual": "yes please"}, "allow_manual"),
    ({"visibility": "secret"}, "visibility"),
    ({"protected_branches": "main"}, "protected_branches"),
    ({"protected_branches": [" "]}, "protected_branches"),
    ({"fork_pull_requests": "always"}, "fork_pull_requests"),
    ({"name": "!!!"}, "name"),
    ({"name": ""}, "name"),
])
def test_bad_settings_are_422_and_change_nothing(api, org, pipeline, body, field):
    before = Pipeline.objects.filter(pk=pipeline.pk).values().get()
    response = api.patch(url(org.slug, pipeline.slug), body, format="json")
    error = assert_error(response, 422, "pipeline_invalid")
    assert field in error["fields"]
    assert Pipeline.objects.filter(pk=pipeline.pk).values().get() == before


@pytest.mark.django_db
def test_patch_sets_and_clears_the_default_retry(api, org, pipeline):
    body = api.patch(url(org.slug, pipeline.slug), {"default_retry": {"automatic": True}}, format="json").json()
    assert body["default_retry"] == {"automatic": [{"exit_status": "*", "limit": 2}],
                                     "manual": {"allowed": True, "reason": None}}
    bad = api.patch(url(org.slug, pipeline.slug), {"default_retry": {"automatic": [{"limit": 99}]}}, format="json")
    assert "default_retry" in assert_error(bad, 422, "pipeline_invalid")["fields"]
    cleared = api.patch(url(org.slug, pipeline.slug), {"default_retry": None}, format="json").json()
    assert cleared["default_retry"] is None


@pytest.mark.django_db
def test_source_slug_and_unknown_fields_are_ignored(api, org, pipeline):
    response = api.patch(url(org.slug, pipeline.slug), {"source_slug": "other", "build_counter": 99},
                         format="json")
    assert response.status_code == 200
    pipeline.refresh_from_db()
    assert (pipeline.source_slug, pipeline.build_counter) == ("ci", 0)


@pytest.mark.django_db
def test_members_may_not_change_settings(member_api, admin_api, org, pipeline):
    assert_error(member_api.patch(url(org.slug, pipeline.slug), {"allow_manual": False}, format="json"), 403,
                 "insufficient_org_role")
    pipeline.refresh_from_db()
    assert pipeline.allow_manual is True
    assert admin_api.patch(url(org.slug, pipeline.slug), {"allow_manual": False}, format="json").status_code == 200


@pytest.mark.django_db
def test_other_organizations_pipeline_is_404(api, stranger_api, org, pipeline, other_pipeline, other_org):
    assert_error(stranger_api.patch(url(org.slug, pipeline.slug), {"allow_manual": False}, format="json"), 404,
                 "organization_not_found")
    assert_error(api.patch(url(other_org.slug, other_pipeline.slug), {"allow_manual": False}, format="json"), 404,
                 "organization_not_found")
    assert_error(api.patch(url(org.slug, "no-such-pipeline"), {"allow_manual": False}, format="json"), 404,
                 "pipeline_not_found")
    pipeline.refresh_from_db(), other_pipeline.refresh_from_db()
    assert pipeline.allow_manual and other_pipeline.allow_manual
