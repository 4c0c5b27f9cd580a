"""POST .../builds/{n}/rebuild: the same branch, commit, message, env, IR and uploaded source, as a new build."""

from __future__ import annotations

import base64
import json

import pytest
from django.core.files.storage import default_storage

from builds import services as build_services
from builds.models import Build, BuildState, Job, JobState, SecretAccess
from organizations.models import Role
from pipelines.models import ForkPullRequests, Pipeline
from tests.helpers import (ANY_SOURCE, assert_error, builds_url, iso, job_states, make_build, run_job, tarball,
                           two_step_ir)


def rebuild_url(build: Build) -> str:
    return builds_url(build.pipeline, f"/{build.number}/rebuild")


def one_step_ir(cmd: str = "make test") -> dict:
    return {"version": "0", "steps": [{"type": "command", "key": "test", "cmd": cmd}]}


@pytest.mark.django_db
def test_rebuild_repeats_the_build_with_the_next_number(api, owner, pipeline):
    original = make_build(pipeline, branch="feature/x", commit="0123abcd", message="Try again",
                          env={"FLAVOUR": "mint"}, pipeline_ir=json.dumps(one_step_ir("echo $FLAVOUR")))
    run_job(Job.objects.get(build=original), JobState.FAILED, exit_code=1)

    response = api.post(rebuild_url(original))

    assert response.status_code == 201, response.content
    body = response.json()
    rebuilt = Build.objects.get(pk=body["id"])
    assert body == {
        "id": str(rebuilt.id), "number": 2, "state": "scheduled", "pipeline_slug": "web-ci",
        "branch": "feature/x", "commit": "0123abcd", "message": "Try again", "source": "api", "fork": False,
        "secret_access": "all", "error_code": None, "error_message": None, "rebuild_of": 1, "waiting_reason": None,
        "created_at": iso(rebuilt.created_at), "scheduled_at": iso(rebuilt.scheduled_at), "started_at": None,
        "finished_at": None,
    }
    assert rebuilt.env == {"FLAVOUR": "mint"}
    assert rebuilt.pipeline_ir == original.pipeline_ir
    assert rebuilt.created_by == owner
    job = Job.objects.get(build=rebuilt)
    assert (job.step_key, job.command, job.state, job.env["FLAVOUR"]) == ("test", "echo $FLAVOUR", "scheduled",
                                                                           "mint")
    original.refresh_from_db()
    assert original.state == BuildState.FAILED and original.rebuild_of is None  # the original is untouched
    assert api.get(builds_url(pipeline, "/2")).json()["rebuild_of"] == 1


@pytest.mark.django_db
def test_rebuild_of_a_stored_definition_build_plans_what_it_ran(api, pipeline):
    original = make_build(pipeline)
    Pipeline.objects.filter(pk=pipeline.pk).update(definition=one_step_ir("echo changed since"))

    rebuilt = Build.objects.get(pk=api.post(rebuild_url(original)).json()["id"])

    assert rebuilt.pipeline_ir == two_step_ir()
    assert job_states(rebuilt) == {"a": "scheduled", "b": "pending"}


@pytest.mark.django_db
def test_rebuild_shares_the_uploaded_source_and_the_file_outlives_the_original(api, pipeline, django_capture_on_commit_callbacks):
    archive = tarball({"README": b"hello"})
    original = make_build(pipeline, source_b64=base64.b64encode(archive).decode())
    name = original.source_archive.name

    with django_capture_on_commit_callbacks(execute=True):
        rebuilt = Build.objects.get(pk=api.post(rebuild_url(original)).json()["id"])

    assert rebuilt.source_archive.name == name  # the same stored file, not a copy
    assert rebuilt.source_url.endswith(f"/api/v0/internal/builds/{rebuilt.id}/source.tar.gz")
    assert sorted(default_storage.listdir("sources")[1]).count(name.split("/")[-1]) == 1
    with django_capture_on_commit_callbacks(execute=True):
        original.delete()
    assert default_storage.exists(name)  # the rebuild still names it
    with default_storage.open(name) as stored:
        assert stored.read() == archive
    with django_capture_on_commit_callbacks(execute=True):
        rebuilt.delete()
    assert not default_storage.exists(name)  # gone with the last build naming it


@pytest.mark.django_db
def test_rebuild_keeps_a_source_url_without_an_upload(api, pipeline):
    original = make_build(pipeline, source_url="https://example.com/code.tar.gz", source_sha256="a" * 64)
    rebuilt = Build.objects.get(pk=api.post(rebuild_url(original)).json()["id"])
    assert (rebuilt.source_url, rebuilt.source_sha256) == ("https://example.com/code.tar.gz", "a" * 64)
    assert not rebuilt.source_archive


@pytest.mark.django_db
def test_a_members_rebuild_never_gets_more_secrets_than_the_original(api, member_api, member, owner, pipeline):
    by_owner = build_services.create_build(
        pipeline=pipeline, request=build_services.validate_build_request(branch="main", commit="HEAD",
                                                                         pipeline_ir=one_step_ir()),
        created_by=owner, creator_role=Role.OWNER)
    assert by_owner.secret_access == SecretAccess.ALL
    by_webhook = make_build(pipeline, source="webhook", commit="0123abcd")
    assert by_webhook.secret_access == SecretAccess.ALL

    # The owner's role gave the original every secret; the member's rebuild gets the unprotected ones.
    assert member_api.post(rebuild_url(by_owner)).json()["secret_access"] == "unprotected"
    # A webhook build's commands are the organization's own at the commit its branch named.
    assert member_api.post(rebuild_url(by_webhook)).json()["secret_access"] == "all"
    assert api.post(rebuild_url(by_owner)).json()["secret_access"] == "all"
    # The rebuild says who asked, and where from.
    latest = Build.objects.order_by("-number").first()
    assert latest.created_by == owner and latest.source == "api"


@pytest.mark.django_db
def test_a_forks_rebuild_stays_without_secrets_and_is_held_again_for_a_member(api, member_api, pipeline):
    Pipeline.objects.filter(pk=pipeline.pk).update(fork_pull_requests=ForkPullRequests.REQUIRE_APPROVAL)
    pipeline.refresh_from_db()
    request = build_services.validate_build_request(branch="feature", commit="0123abcd", source="webhook",
                                                    allowed_sources=ANY_SOURCE)
    fork_build = build_services.create_build(pipeline=pipeline, request=request, fork=True, held=True)
    assert fork_build.state == BuildState.HELD

    by_member = member_api.post(rebuild_url(fork_build)).json()
    assert (by_member["state"], by_member["fork"], by_member["secret_access"]) == ("held", True, "none")
    by_owner = api.post(rebuild_url(fork_build)).json()
    assert (by_owner["state"], by_owner["fork"], by_owner["secret_access"]) == ("scheduled", True, "none")


@pytest.mark.django_db
def test_rebuild_works_where_manual_builds_are_off(api, pipeline):
    original = make_build(pipeline, source="webhook", commit="0123abcd")
    Pipeline.objects.filter(pk=pipeline.pk).update(allow_manual=False)
    assert api.post(rebuild_url(original)).status_code == 201
    # A new manual build is still refused.
    assert_error(api.post(builds_url(pipeline), {"branch": "main", "commit": "HEAD"}, format="json"), 403,
                 "pipeline_manual_disabled")


@pytest.mark.django_db
def test_rebuild_of_a_rejected_plan_fails_again_the_same_way(api, pipeline):
    with pytest.raises(Exception):
        make_build(pipeline, pipeline_ir="{not json")
    original = Build.objects.get(pipeline=pipeline)

    response = api.post(rebuild_url(original))

    error = assert_error(response, 422, "build_plan_rejected")
    assert "#2" in error["message"]
    rebuilt = Build.objects.get(pipeline=pipeline, number=2)
    assert (rebuilt.state, rebuilt.error_code, rebuilt.rebuild_of) == ("failed", original.error_code, 1)


@pytest.mark.django_db
def test_rebuild_with_an_idempotency_key_creates_one_build(api, build):
    first = api.post(rebuild_url(build), HTTP_IDEMPOTENCY_KEY="rebuild-once")
    again = api.post(rebuild_url(build), HTTP_IDEMPOTENCY_KEY="rebuild-once")
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert Build.objects.filter(pipeline=build.pipeline).count() == 2


@pytest.mark.django_db
def test_rebuild_of_another_organizations_build_is_404(api, stranger_api, build, other_pipeline):
    assert_error(stranger_api.post(rebuild_url(build)), 404, "organization_not_found")
    assert_error(api.post(builds_url(build.pipeline, "/99/rebuild")), 404, "build_not_found")
    assert_error(api.post(builds_url(build.pipeline, "/abc/rebuild")), 404, "build_not_found")
    assert Build.objects.filter(pipeline=build.pipeline).count() == 1


@pytest.mark.django_db
def test_the_rebuild_button_creates_the_build_and_the_new_page_links_back(client, member, build):
    client.force_login(member)
    page = f"/orgs/{build.pipeline.organization.slug}/pipelines/{build.pipeline.slug}/builds/{build.number}"
    assert 'id="rebuild-form"' in client.get(page).content.decode()

    response = client.post(f"{page}/rebuild")

    rebuilt = Build.objects.get(pipeline=build.pipeline, number=2)
    assert response.status_code == 302 and response["Location"].endswith("/builds/2")
    assert (rebuilt.source, rebuilt.rebuild_of, rebuilt.created_by) == ("ui", 1, member)
    html = client.get(response["Location"]).content.decode()
    assert "Rebuild of" in html and f'/builds/{build.number}" data-rebuild-of>#1</a>' in html


@pytest.mark.django_db
def test_the_rebuild_button_needs_the_csrf_token(member, build):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(member)
    page = f"/orgs/{build.pipeline.organization.slug}/pipelines/{build.pipeline.slug}/builds/{build.number}"
    assert client.post(f"{page}/rebuild").status_code == 403
    assert Build.objects.filter(pipeline=build.pipeline).count() == 1


# ---------------------------------------------------------------- end to end, with a real agent


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_rebuild_runs_on_an_agent_with_the_originals_uploaded_source(api, pipeline, agents, e2e_server):
    from tests.e2e import create_build, finished, jobs_by_key, stdout_of, wait_for

    agents.start("a1")
    archive = tarball({"VERSION": b"3.1.4\n"})
    original = create_build(api, pipeline, {"version": "0", "steps": [
        {"type": "command", "key": "show", "cmd": 'echo "version $(cat VERSION) for $FLAVOUR"'}]},
        env={"FLAVOUR": "mint"}, source_b64=base64.b64encode(archive).decode())
    assert wait_for(lambda: finished(original), 60, what="the original build").state == "passed"

    response = api.post(rebuild_url(original))

    assert response.status_code == 201, response.content
    rebuilt = Build.objects.get(pk=response.json()["id"])
    done = wait_for(lambda: finished(rebuilt), 60, what="the rebuild")
    assert (done.state, done.rebuild_of, done.source_archive.name) == ("passed", original.number,
                                                                      original.source_archive.name)
    assert stdout_of(jobs_by_key(done)["show"]) == stdout_of(jobs_by_key(original)["show"]) == \
        "version 3.1.4 for mint\n"
