"""Public pipelines: read-only pages, logs, live streams and artifacts for anyone; badges for README files."""

from __future__ import annotations

import hashlib
import re
from xml.etree import ElementTree

import pytest
from django.test import Client

from builds import services as build_services
from builds.models import Artifact, Build, Job, JobState, LogChunk
from builds.services import artifacts as artifact_services
from harmont.logtokens import log_token_opens_build
from pipelines.models import Pipeline, Visibility
from tests.helpers import make_build, run_job

pytestmark = pytest.mark.django_db


def page(build: Build, suffix: str = "") -> str:
    return f"/orgs/{build.pipeline.organization.slug}/pipelines/{build.pipeline.slug}/builds/{build.number}{suffix}"


def history(pipeline: Pipeline) -> str:
    return f"/orgs/{pipeline.organization.slug}/pipelines/{pipeline.slug}/"


def badge(pipeline: Pipeline, query: str = "") -> str:
    return f"/orgs/{pipeline.organization.slug}/pipelines/{pipeline.slug}/badge.svg{query}"


@pytest.fixture
def public(pipeline) -> Pipeline:
    Pipeline.objects.filter(pk=pipeline.pk).update(visibility=Visibility.PUBLIC)
    pipeline.refresh_from_db()
    return pipeline


NOTES = b"release notes\n"


@pytest.fixture
def ran(public, owner, settings, tmp_path) -> Build:
    """A build of the public pipeline: `a` passed with output and an artifact, `b` failed; triggered by the owner."""
    settings.MEDIA_ROOT = tmp_path
    build = make_build(public, message="Ship it")
    Build.objects.filter(pk=build.pk).update(created_by=owner)
    a, b = Job.objects.filter(build=build).order_by("position")
    assert build_services.move_job(job=a, state=JobState.ASSIGNED)
    assert build_services.move_job(job=a, state=JobState.RUNNING)
    a.refresh_from_db()
    artifact_services.store_artifact(job=a, path="notes.txt", content=NOTES, sha256=hashlib.sha256(NOTES).hexdigest())
    assert build_services.finish_job(job=a, state=JobState.PASSED, exit_code=0)
    LogChunk.objects.create(job=a, seq=1, stream_kind=0, content="hello from a\n", ts=1)
    Job.objects.filter(pk=a.pk).update(log_bytes=len("hello from a\n"))
    run_job(b, JobState.FAILED, exit_code=3)
    build.refresh_from_db()
    return build


@pytest.fixture
def visitor() -> Client:
    return Client(enforce_csrf_checks=True)


# ---------------------------------------------------------------- pages for anyone


def test_a_signed_out_visitor_reads_a_public_build_page_without_any_control(visitor, ran, owner):
    response = visitor.get(page(ran))

    assert response.status_code == 200
    html = response.content.decode()
    assert "Build #1" in html and "Ship it" in html
    assert 'method="post"' not in html
    for control in ("cancel-form", "rebuild-form", "approve-form", "data-retry-form"):
        assert control not in html, control
    assert owner.email not in html  # who triggered it is the organization's business
    assert "Sign in" in html


def test_a_public_build_pages_helpers_answer_visitors(visitor, ran):
    status = visitor.get(page(ran, "/status.json"))
    assert status.status_code == 200
    body = status.json()
    assert body["build"]["state"] == "failed" and body["build"]["cancelable"] is False
    assert [job["retryable"] for job in body["jobs"]] == [False, False]  # members would be offered Retry on b

    minted = visitor.get(page(ran, "/log-token.json")).json()
    assert log_token_opens_build(minted["token"], ran.pk)  # this build's streams, nothing else


def test_a_visitor_reads_a_public_jobs_raw_log_and_downloads_its_artifacts(visitor, ran):
    job = Job.objects.get(build=ran, step_key="a")
    raw = visitor.get(page(ran, f"/jobs/{job.pk}/log"))
    assert raw.status_code == 200 and b"".join(raw.streaming_content) == b"hello from a\n"

    artifact = Artifact.objects.get(job=job)
    assert f'/artifacts/{artifact.pk}"' in visitor.get(page(ran)).content.decode()  # listed on the page
    download = visitor.get(page(ran, f"/artifacts/{artifact.pk}"))
    assert download.status_code == 200 and b"".join(download.streaming_content) == NOTES


def test_a_public_pipelines_history_is_readable_without_its_forms_or_schedules(visitor, ran, owner):
    response = visitor.get(history(ran.pipeline))
    assert response.status_code == 200
    html = response.content.decode()
    assert f"/builds/{ran.number}" in html
    for hidden in ("new-build-form", "new-schedule-form", 'id="schedules"', owner.email):
        assert hidden not in html, hidden
    assert 'id="public-note"' in html


def test_a_signed_in_stranger_reads_a_public_build_but_gets_404_for_a_private_one(stranger, ran, pipeline, make_user):
    client = Client()
    client.force_login(stranger)
    assert client.get(page(ran)).status_code == 200
    Pipeline.objects.filter(pk=ran.pipeline_id).update(visibility=Visibility.PRIVATE)
    assert client.get(page(ran)).status_code == 404
    assert client.get(page(ran, "/status.json")).status_code == 404


def test_a_private_pipeline_still_asks_visitors_to_sign_in(visitor, build):
    assert build.pipeline.visibility == Visibility.PRIVATE
    response = visitor.get(page(build))
    assert response.status_code == 302 and "/login" in response["Location"]
    assert visitor.get(page(build, "/status.json")).status_code == 401
    assert visitor.get(page(build, "/log-token.json")).status_code == 401
    assert visitor.get(history(build.pipeline)).status_code == 302


def test_an_archived_public_pipeline_is_not_shown(visitor, ran):
    from django.utils import timezone

    Pipeline.objects.filter(pk=ran.pipeline_id).update(archived_at=timezone.now())
    assert visitor.get(page(ran)).status_code == 302  # nothing public any more: sign in to look


def test_visitors_can_not_act_on_a_public_build(visitor, ran, stranger):
    job = Job.objects.get(build=ran, step_key="b")
    before = (Build.objects.filter(pipeline=ran.pipeline).count(), Job.objects.filter(build=ran).count())
    # No session: the POST routes send the visitor to sign in.
    for suffix in ("/cancel", "/rebuild", f"/jobs/{job.pk}/retry"):
        assert Client().post(page(ran, suffix)).status_code == 302, suffix
    assert Client().post(history(ran.pipeline), {"branch": "main", "commit": "HEAD"}).status_code == 302
    # Signed in, but no member: no build is started, retried or canceled.
    client = Client()
    client.force_login(stranger)
    for suffix in ("/cancel", "/rebuild", f"/jobs/{job.pk}/retry"):
        assert client.post(page(ran, suffix)).status_code == 404, suffix
    assert client.post(history(ran.pipeline), {"branch": "main", "commit": "HEAD"}).status_code == 403
    assert (Build.objects.filter(pipeline=ran.pipeline).count(), Job.objects.filter(build=ran).count()) == before
    ran.refresh_from_db()
    assert ran.cancel_requested_at is None


def test_members_still_get_their_controls_on_a_public_pipeline(owner, ran):
    client = Client()
    client.force_login(owner)
    html = client.get(page(ran)).content.decode()
    assert "rebuild-form" in html and "data-retry-form" in html and owner.email in html


def test_a_visitors_build_page_costs_a_fixed_number_of_queries(visitor, ran, django_assert_num_queries):
    visitor.get(page(ran))  # warm whatever is cached per process
    # the build with its pipeline and organization, its jobs, their edges, its artifacts, the jobs' test counts
    with django_assert_num_queries(5):
        assert visitor.get(page(ran)).status_code == 200
    with django_assert_num_queries(3):  # the build, its jobs, their edges
        assert visitor.get(page(ran, "/status.json")).status_code == 200


# ---------------------------------------------------------------- badges


def badge_text(response) -> list[str]:
    root = ElementTree.fromstring(response.content)
    return [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]


def test_a_public_pipelines_badge_shows_the_latest_finished_build_of_the_default_branch(visitor, ran, public):
    newer = make_build(public)  # scheduled, not finished: the badge keeps showing the finished one
    assert newer.state == "scheduled"

    response = visitor.get(badge(public))

    assert response.status_code == 200
    assert response["Content-Type"] == "image/svg+xml; charset=utf-8"
    assert response["Cache-Control"] == "public, max-age=60"
    assert badge_text(response) == ["build", "failed"]
    assert "#cf222e" in response.content.decode()


def test_a_badge_for_another_branch_and_for_none_yet(visitor, public):
    build = make_build(public, branch="release/2")
    for job in Job.objects.filter(build=build):
        run_job(job)
    assert badge_text(visitor.get(badge(public, "?branch=release/2"))) == ["build", "passed"]
    assert badge_text(visitor.get(badge(public))) == ["build", "no builds"]  # main has none


def test_a_private_pipelines_badge_is_for_signed_in_members_only(visitor, build, owner, stranger,
                                                                 django_assert_num_queries):
    assert visitor.get(badge(build.pipeline)).status_code == 404  # not a redirect: an <img> can't sign in
    client = Client()
    client.force_login(stranger)
    assert client.get(badge(build.pipeline)).status_code == 404
    client.force_login(owner)
    client.get(badge(build.pipeline))
    with django_assert_num_queries(5):  # session, user, memberships, the pipeline, its latest finished build
        response = client.get(badge(build.pipeline))
    assert response.status_code == 200
    assert response["Cache-Control"] == "private, max-age=60" and response["Vary"] == "Cookie"
    assert badge_text(response) == ["build", "no builds"]


def test_a_badges_text_is_escaped(visitor, public):
    build = make_build(public, branch="feature/<x>")
    for job in Job.objects.filter(build=build):
        run_job(job)
    response = visitor.get(badge(public, "?branch=feature/<x>"))
    ElementTree.fromstring(response.content)  # well-formed: the branch in its title is escaped
    assert "<x>" not in response.content.decode() and re.search(r"feature/&lt;x&gt;", response.content.decode())
