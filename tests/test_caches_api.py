"""`/api/v0/organizations/{org}/caches`: admins list and delete the step cache entries.

The list is newest first, keyset paged and filtered by pipeline, step and
branch, in a constant number of queries; deleting one entry (or a pipeline's)
makes the next build run the step again and frees the job's stored files.
Members get 403, other organizations 404.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.core.files.storage import default_storage
from django.utils import timezone

from builds.models import Build, CacheEntry, Job, JobState, SecretAccess
from pipelines.models import Pipeline
from tests.helpers import assert_error, iso, make_build
from tests.test_step_caches import jobs_of, run_whole_build, setup_ir

J = JobState


@pytest.fixture(autouse=True)
def _storage(settings: Any, tmp_path: Any) -> None:
    settings.MEDIA_ROOT = tmp_path / "media"


def caches_url(org_slug: str, suffix: str = "") -> str:
    return f"/api/v0/organizations/{org_slug}/caches{suffix}"


def pipeline_caches_url(pipeline: Pipeline) -> str:
    return f"/api/v0/organizations/{pipeline.organization.slug}/pipelines/{pipeline.slug}/caches"


def cached_build(pipeline: Pipeline, **fields: Any) -> Build:
    """A passed build whose `setup` step is cached: it leaves one entry."""
    build = make_build(pipeline, pipeline_ir=setup_ir(), **fields)
    run_whole_build(build)
    return build


def entry_json(entry: CacheEntry) -> dict[str, Any]:
    entry = CacheEntry.objects.select_related("pipeline", "job__build").get(pk=entry.pk)
    return {
        "id": str(entry.pk), "pipeline_slug": entry.pipeline.slug, "step_key": entry.step_key, "key": entry.key,
        "branch": entry.branch, "secret_access": entry.secret_access, "job_id": str(entry.job_id),
        "build_number": entry.job.build.number, "size_bytes": entry.size_bytes, "hits": entry.hits,
        "created_at": iso(entry.created_at), "last_used_at": iso(entry.last_used_at),
    }


def many_entries(pipeline: Pipeline, count: int, *, step_key: str = "setup", branch: str = "main") -> list[CacheEntry]:
    """`count` entries, one a minute apart (the newest last), each naming a job of one build."""
    build = make_build(pipeline, pipeline_ir=setup_ir())
    job = Job.objects.filter(build=build).first()
    start = timezone.now() - timedelta(days=1)
    return CacheEntry.objects.bulk_create(
        CacheEntry(organization_id=pipeline.organization_id, pipeline=pipeline, step_key=step_key,
                   key=uuid.uuid4().hex * 2, branch=branch, secret_access=SecretAccess.UNPROTECTED, job=job,
                   size_bytes=i, created_at=start + timedelta(minutes=i), last_used_at=start)
        for i in range(count))


# ------------------------------------------------------------------ the list


@pytest.mark.django_db
def test_the_list_shows_the_entry_a_passed_cached_step_left_and_its_hits(api, org, pipeline):
    first = cached_build(pipeline, branch="main")
    second = make_build(pipeline, pipeline_ir=setup_ir(), branch="main")
    assert jobs_of(second)["setup"].reused_job_id == jobs_of(first)["setup"].pk

    response = api.get(caches_url(org.slug))

    assert response.status_code == 200, response.content
    entry = CacheEntry.objects.get()
    assert response.json() == {"data": [entry_json(entry)], "next_cursor": None}
    body = response.json()["data"][0]
    assert (body["step_key"], body["branch"], body["build_number"], body["hits"], body["size_bytes"]) == (
        "setup", "main", first.number, 1, 1000)
    assert body["job_id"] == str(jobs_of(first)["setup"].pk) and len(body["key"]) == 64


@pytest.mark.django_db
def test_the_list_is_newest_first_and_pages_with_a_cursor_without_gaps_or_repeats(api, org, pipeline):
    entries = many_entries(pipeline, 7)
    seen: list[str] = []
    url = caches_url(org.slug) + "?limit=3"
    while url:
        body = api.get(url).json()
        seen += [row["id"] for row in body["data"]]
        url = caches_url(org.slug) + f"?limit=3&cursor={body['next_cursor']}" if body["next_cursor"] else ""
    assert seen == [str(e.pk) for e in reversed(entries)]


@pytest.mark.django_db
def test_the_list_filters_by_pipeline_step_and_branch(api, org, pipeline):
    other = Pipeline.objects.create(organization=org, slug="other", name="other")
    mine = many_entries(pipeline, 2)
    many_entries(other, 3)
    on_dev = many_entries(pipeline, 1, step_key="deps", branch="dev")

    def ids(query: str) -> list[str]:
        response = api.get(caches_url(org.slug) + query)
        assert response.status_code == 200, response.content
        return sorted(row["id"] for row in response.json()["data"])

    assert ids(f"?pipeline={pipeline.slug}") == sorted(str(e.pk) for e in mine + on_dev)
    assert len(ids("?pipeline=other")) == 3
    assert ids(f"?pipeline={pipeline.slug}&step_key=deps") == [str(on_dev[0].pk)]
    assert ids("?branch=dev") == [str(on_dev[0].pk)]
    assert ids("?pipeline=nope") == []
    assert len(ids("?pipeline=")) == 6  # an empty value filters nothing


@pytest.mark.django_db
def test_the_list_query_count_is_independent_of_page_size_and_depth(api, org, pipeline, django_assert_num_queries):
    many_entries(pipeline, 2)
    api.get("/api/v0/user")  # a fresh token's first use also writes last_used_at
    with django_assert_num_queries(3):  # token, membership+org, entries with their pipeline and build
        assert len(api.get(caches_url(org.slug)).json()["data"]) == 2
    many_entries(pipeline, 40)
    with django_assert_num_queries(3):
        body = api.get(caches_url(org.slug) + "?limit=20").json()
    with django_assert_num_queries(3):
        assert len(api.get(caches_url(org.slug) + f"?limit=20&cursor={body['next_cursor']}").json()["data"]) == 20


@pytest.mark.django_db
def test_a_bad_cursor_or_limit_is_400(api, org):
    assert_error(api.get(caches_url(org.slug) + "?cursor=garbage"), 400, "invalid_cursor")
    assert_error(api.get(caches_url(org.slug) + "?limit=0"), 400, "invalid_limit")


@pytest.mark.django_db
def test_members_may_not_see_the_caches_and_other_organizations_are_404(member_api, stranger_api, admin_api, org,
                                                                        pipeline, other_pipeline):
    many_entries(pipeline, 1)
    many_entries(other_pipeline, 1)
    assert_error(member_api.get(caches_url(org.slug)), 403, "insufficient_org_role")
    assert_error(stranger_api.get(caches_url(org.slug)), 404, "organization_not_found")
    # An admin sees their organization's entries only.
    assert [row["pipeline_slug"] for row in admin_api.get(caches_url(org.slug)).json()["data"]] == [pipeline.slug]


# ------------------------------------------------------------------ deleting one


@pytest.mark.django_db
def test_deleting_an_entry_is_204_frees_its_files_and_the_next_build_runs_the_step(
        api, org, pipeline, django_capture_on_commit_callbacks):
    first = cached_build(pipeline)
    setup = jobs_of(first)["setup"]
    names = [setup.workspace_archive.name, setup.snapshot_image.name]
    assert all(default_storage.exists(name) for name in names)
    entry = CacheEntry.objects.get()

    with django_capture_on_commit_callbacks(execute=True):
        response = api.delete(caches_url(org.slug, f"/{entry.pk}"))

    assert response.status_code == 204, response.content
    assert not CacheEntry.objects.exists()
    setup.refresh_from_db()
    assert (setup.workspace_archive.name, setup.snapshot_image.name) == ("", "")
    assert not any(default_storage.exists(name) for name in names)
    again = make_build(pipeline, pipeline_ir=setup_ir())
    assert jobs_of(again)["setup"].reused_job_id is None and jobs_of(again)["setup"].state == J.SCHEDULED
    # Gone is gone: the same delete again is the 404 of an unknown entry.
    assert_error(api.delete(caches_url(org.slug, f"/{entry.pk}")), 404, "cache_entry_not_found")


@pytest.mark.django_db
def test_deleting_an_entry_a_waiting_build_reuses_keeps_the_files_for_it(api, org, pipeline,
                                                                          django_capture_on_commit_callbacks):
    first = cached_build(pipeline)
    waiting = make_build(pipeline, pipeline_ir=setup_ir())
    assert jobs_of(waiting)["setup"].state == J.PASSED and jobs_of(waiting)["test"].state == J.SCHEDULED

    with django_capture_on_commit_callbacks(execute=True):
        assert api.delete(caches_url(org.slug, f"/{CacheEntry.objects.get().pk}")).status_code == 204

    # `test` of the waiting build still starts from the reused job's files.
    setup = jobs_of(first)["setup"]
    assert setup.workspace_archive.name and default_storage.exists(setup.workspace_archive.name)


@pytest.mark.django_db
def test_deleting_an_unknown_a_malformed_or_another_organizations_entry_is_404(api, member_api, org,
                                                                               other_pipeline):
    theirs = many_entries(other_pipeline, 1)[0]
    for entry_id in (str(uuid.uuid4()), "not-a-uuid", str(theirs.pk)):
        assert_error(api.delete(caches_url(org.slug, f"/{entry_id}")), 404, "cache_entry_not_found")
    assert CacheEntry.objects.filter(pk=theirs.pk).exists()
    assert_error(member_api.delete(caches_url(org.slug, f"/{uuid.uuid4()}")), 403, "insufficient_org_role")


# ------------------------------------------------------------------ deleting a pipeline's


@pytest.mark.django_db
def test_deleting_a_pipelines_caches_removes_only_its_entries_and_says_how_many(api, org, pipeline):
    other = Pipeline.objects.create(organization=org, slug="other", name="other")
    many_entries(pipeline, 3)
    kept = many_entries(other, 2)

    response = api.delete(pipeline_caches_url(pipeline))

    assert response.status_code == 200, response.content
    assert response.json() == {"deleted": 3}
    assert set(CacheEntry.objects.values_list("pk", flat=True)) == {e.pk for e in kept}
    assert api.delete(pipeline_caches_url(pipeline)).json() == {"deleted": 0}


@pytest.mark.django_db
def test_deleting_a_pipelines_caches_by_step_or_branch(api, org, pipeline, settings):
    many_entries(pipeline, 2, step_key="setup", branch="main")
    deps = many_entries(pipeline, 2, step_key="deps", branch="main")
    many_entries(pipeline, 1, step_key="setup", branch="dev")

    assert api.delete(pipeline_caches_url(pipeline) + "?step_key=setup&branch=dev").json() == {"deleted": 1}
    assert api.delete(pipeline_caches_url(pipeline) + "?step_key=setup").json() == {"deleted": 2}
    assert set(CacheEntry.objects.values_list("pk", flat=True)) == {e.pk for e in deps}


@pytest.mark.django_db
def test_deleting_many_entries_goes_in_batches(api, org, pipeline, monkeypatch):
    from builds.services import caches

    monkeypatch.setattr(caches, "DELETE_BATCH", 4)
    many_entries(pipeline, 10)
    assert api.delete(pipeline_caches_url(pipeline)).json() == {"deleted": 10}
    assert not CacheEntry.objects.exists()


@pytest.mark.django_db
def test_deleting_the_caches_of_an_unknown_or_another_organizations_pipeline_is_404(api, member_api, org, pipeline,
                                                                                    other_pipeline):
    many_entries(other_pipeline, 1)
    assert_error(api.delete(f"/api/v0/organizations/{org.slug}/pipelines/nope/caches"), 404, "pipeline_not_found")
    assert_error(api.delete(pipeline_caches_url(other_pipeline)), 404, "organization_not_found")
    assert CacheEntry.objects.count() == 1
    assert_error(member_api.delete(pipeline_caches_url(pipeline)), 403, "insufficient_org_role")
