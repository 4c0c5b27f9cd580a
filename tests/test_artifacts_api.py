"""Artifacts: the store service and its limits, the agent's upload route, the REST list and download,
and the build page's links.

Jobs are claimed and started over the agent API (the `session` and `running` fixtures);
stored files go to a temporary MEDIA_ROOT, which tests list to prove that a refused
upload left nothing behind.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from builds.agent.files import BoundedReader, collect_artifacts
from builds.services import StoredArtifact, store_artifact
from builds.models import Artifact, Build, Job, JobState
from harmont.errors import ApiError
from harmont.pagination import encode_cursor
from organizations.models import ApiToken, User
from tests.helpers import assert_error, claim, finish, is_postgres, job_url, make_build, parallel_ir, race

pytestmark = pytest.mark.django_db

# Every byte value, so that a download that decodes or re-encodes anything differs.
BINARY = bytes(range(256)) * 5 + b"\r\n\x00end"


@pytest.fixture(autouse=True)
def media(settings: Any, tmp_path: Path) -> Path:
    settings.MEDIA_ROOT = tmp_path / "media"
    return settings.MEDIA_ROOT


def stored_files(media: Path) -> list[Path]:
    return sorted(path for path in media.rglob("*") if path.is_file()) if media.exists() else []


@pytest.fixture
def job(running: tuple[dict[str, Any], APIClient]) -> Job:
    """Job `a` of the `build` fixture, claimed and running."""
    return Job.objects.select_related("agent").get(pk=running[0]["id"])


def store(job: Job, path: str, content: bytes, **kwargs: Any) -> StoredArtifact:
    return store_artifact(job=job, path=path, content=content, **kwargs)


def refused(code: str, **kwargs: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        store_artifact(**kwargs)
    assert caught.value.code == code, caught.value.message
    return caught.value


class Unreadable(io.RawIOBase):
    """A body that must not be read (the upload is refused by its announced size)."""

    def read(self, n: int = -1) -> bytes:
        raise AssertionError("the body was read")


# ===================================================================== the store service


def test_store_computes_size_sha256_and_mime_type_and_keeps_the_bytes(job: Job, media: Path) -> None:
    stored = store(job, "reports/coverage.json", b'{"lines": 93}')

    assert stored.created is True
    artifact = Artifact.objects.get()
    assert artifact == stored.artifact
    assert (artifact.build_id, artifact.job_id, artifact.path, artifact.size, artifact.sha256, artifact.mime_type) == (
        job.build_id, job.pk, "reports/coverage.json", 13, hashlib.sha256(b'{"lines": 93}').hexdigest(),
        "application/json")
    # Stored under ids, never under the job's own path.
    assert artifact.file.name == f"artifacts/{job.build_id}/{artifact.pk}"
    assert stored_files(media) == [media / "artifacts" / str(job.build_id) / str(artifact.pk)]
    assert (media / artifact.file.name).read_bytes() == b'{"lines": 93}'


def test_a_stream_is_stored_whole_and_counts_as_a_sign_of_life(job: Job, media: Path) -> None:
    Job.objects.filter(pk=job.pk).update(last_heartbeat_at=timezone.now() - timezone.timedelta(minutes=5))
    big = BINARY * 1000  # past the in-memory spool: goes through a temporary file

    store_artifact(job=job, path="dist/app.bin", content=io.BytesIO(big), size=len(big))

    artifact = Artifact.objects.get()
    assert (artifact.size, artifact.sha256) == (len(big), hashlib.sha256(big).hexdigest())
    assert (media / artifact.file.name).read_bytes() == big
    job.refresh_from_db()
    assert timezone.now() - job.last_heartbeat_at < timezone.timedelta(seconds=10)


@pytest.mark.parametrize(("path", "normalised", "mime_type"), [
    ("./dist//app.tar.gz", "dist/app.tar.gz", "application/gzip"),
    ("out/./index.html", "out/index.html", "text/html"),
    ("trailing/", "trailing", "application/octet-stream"),
    ("ünïcode name.txt", "ünïcode name.txt", "text/plain"),
    ("x" * 1000, "x" * 1000, "application/octet-stream"),
])
def test_paths_are_normalised(job: Job, path: str, normalised: str, mime_type: str) -> None:
    artifact = store(job, path, b"data").artifact
    assert (artifact.path, artifact.mime_type) == (normalised, mime_type)


@pytest.mark.parametrize("path", ["", "/etc/passwd", "../escape", "a/../../escape", "a/..", "a\x00b", "line\nbreak",
                                  "tab\there", ".", "./", "//", "x" * 1001])
def test_invalid_paths_are_refused_and_nothing_is_stored(job: Job, media: Path, path: str) -> None:
    error = refused("artifact_path_invalid", job=job, path=path, content=b"data")
    assert error.status == 422 and list(error.fields) == ["path"]
    assert not Artifact.objects.exists()
    assert stored_files(media) == []


def test_an_artifact_over_the_limit_is_refused_before_its_body_is_read(job: Job, media: Path, settings: Any) -> None:
    settings.ARTIFACT_MAX_BYTES = 10

    error = refused("artifact_too_large", job=job, path="big.bin", content=Unreadable(), size=11)

    assert error.status == 413
    assert error.message == "The artifact is 11 bytes; one artifact may be at most 10 bytes."
    assert not Artifact.objects.exists() and stored_files(media) == []
    # Exactly at the limit is fine.
    assert store(job, "ten.bin", b"0123456789").artifact.size == 10


def test_a_stream_without_announced_size_is_cut_off_at_the_limit(job: Job, media: Path, settings: Any) -> None:
    settings.ARTIFACT_MAX_BYTES = 1000

    refused("artifact_too_large", job=job, path="big.bin", content=io.BytesIO(BINARY))

    assert not Artifact.objects.exists() and stored_files(media) == []


def test_the_builds_artifacts_together_may_not_pass_the_build_limit(session: APIClient, pipeline: Any,
                                                                    media: Path, settings: Any) -> None:
    settings.BUILD_ARTIFACTS_MAX_BYTES = 10
    build = make_build(pipeline, pipeline_ir=parallel_ir(2))
    other_build = make_build(pipeline, pipeline_ir=parallel_ir(1, prefix="o"))
    first = Job.objects.get(pk=claim(session)[0]["id"])
    second = Job.objects.get(pk=claim(session)[0]["id"])
    other = Job.objects.get(pk=claim(session)[0]["id"])
    assert {first.build_id, second.build_id} == {build.pk} and other.build_id == other_build.pk

    store(first, "six.bin", b"123456")
    # Announced sizes are refused before reading; a stream without one once it is read.
    error = refused("build_artifacts_quota_exceeded", job=second, path="five.bin", content=Unreadable(), size=5)
    refused("build_artifacts_quota_exceeded", job=second, path="five.bin", content=io.BytesIO(b"12345"))

    assert error.status == 413
    assert error.message == ("The build's artifacts already take 6 bytes; 5 more would exceed the build's limit "
                             "of 10 bytes.")
    assert store(second, "four.bin", b"1234").created  # up to the limit exactly
    assert store(other, "ten.bin", b"1234567890").created  # another build has a limit of its own
    assert sorted(Artifact.objects.filter(build=build).values_list("path", "size")) == [
        ("four.bin", 4), ("six.bin", 6)]
    assert len(stored_files(media)) == 3


def test_a_retried_upload_of_the_same_bytes_returns_the_stored_artifact(job: Job, media: Path) -> None:
    first = store(job, "out.bin", BINARY)

    again = store(job, "out.bin", BINARY)
    with_checksum = store(job, "./out.bin", BINARY, sha256=hashlib.sha256(BINARY).hexdigest())

    assert (again.created, with_checksum.created) == (False, False)
    assert again.artifact.pk == with_checksum.artifact.pk == first.artifact.pk
    assert Artifact.objects.count() == 1 and len(stored_files(media)) == 1


def test_a_retry_does_not_count_twice_against_the_build_limit(job: Job, settings: Any) -> None:
    settings.BUILD_ARTIFACTS_MAX_BYTES = len(BINARY)
    store(job, "out.bin", BINARY)
    assert store(job, "out.bin", BINARY).created is False


@pytest.mark.parametrize("content", [b"other bytes", BINARY[:-1] + b"X"])  # another size; the same size
def test_different_bytes_at_a_stored_path_are_a_conflict(job: Job, media: Path, content: bytes) -> None:
    first = store(job, "out.bin", BINARY).artifact

    error = refused("artifact_exists", job=job, path="out.bin", content=content)

    assert error.status == 409
    assert list(Artifact.objects.values_list("pk", "sha256")) == [(first.pk, hashlib.sha256(BINARY).hexdigest())]
    assert stored_files(media) == [media / first.file.name]
    assert (media / first.file.name).read_bytes() == BINARY


def test_the_same_path_in_another_job_is_another_artifact(session: APIClient, pipeline: Any) -> None:
    make_build(pipeline, pipeline_ir=parallel_ir(2))
    jobs = [Job.objects.get(pk=claim(session)[0]["id"]) for _ in range(2)]

    ids = {store(job, "report.txt", f"from {job.step_key}".encode()).artifact.pk for job in jobs}

    assert len(ids) == 2


def test_a_wrong_checksum_is_refused_and_nothing_is_stored(job: Job, media: Path) -> None:
    error = refused("artifact_checksum_mismatch", job=job, path="out.bin", content=BINARY, sha256="0" * 64)
    assert error.status == 422
    error = refused("validation_failed", job=job, path="out.bin", content=BINARY, sha256="not-hex")
    assert error.fields == {"sha256": ["Must be 64 hexadecimal digits."]}
    assert not Artifact.objects.exists() and stored_files(media) == []


def test_a_short_body_is_refused(job: Job, media: Path) -> None:
    error = refused("invalid_request", job=job, path="out.bin", content=io.BytesIO(b"12345"), size=10)
    assert error.message == "The upload ended after 5 of the 10 bytes its Content-Length announced."
    assert not Artifact.objects.exists() and stored_files(media) == []


def test_uploads_are_refused_once_the_job_ended(running: tuple[dict[str, Any], APIClient], media: Path) -> None:
    spec, job_client = running
    assert finish(job_client, spec["id"], exit_code=0).json()["state"] == "passed"
    job = Job.objects.get(pk=spec["id"])

    error = refused("job_not_active", job=job, path="late.txt", content=b"late")

    assert error.status == 409
    assert not Artifact.objects.exists() and stored_files(media) == []


def test_a_job_that_ended_while_its_upload_was_read_stores_nothing(job: Job, media: Path) -> None:
    # The job row the caller holds still says running; the state under the build's lock decides.
    Job.objects.filter(pk=job.pk).update(state=JobState.FAILED)

    refused("job_not_active", job=job, path="late.txt", content=b"late")

    assert not Artifact.objects.exists() and stored_files(media) == []


@pytest.mark.parametrize("state", [JobState.ASSIGNED, JobState.CANCELING, JobState.TIMING_OUT])
def test_assigned_canceling_and_timing_out_jobs_still_store(session: APIClient, build: Build, state: str) -> None:
    job = Job.objects.get(pk=claim(session)[0]["id"])
    Job.objects.filter(pk=job.pk).update(state=state)
    job.refresh_from_db()

    assert store(job, "log.txt", b"partial").created


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_uploads_of_one_build_never_pass_its_limit(session: APIClient, pipeline: Any, settings: Any
                                                              ) -> None:
    if not is_postgres():
        pytest.skip("concurrent uploads need PostgreSQL (SQLite serialises all writers)")
    count = 8
    settings.BUILD_ARTIFACTS_MAX_BYTES = 3 * 100
    build = make_build(pipeline, pipeline_ir=parallel_ir(count))
    jobs = [Job.objects.select_related("agent").get(pk=claim(session)[0]["id"]) for _ in range(count)]

    def upload(i: int) -> str:
        try:
            store(jobs[i], f"part-{i}.bin", bytes([i]) * 100)
        except ApiError as exc:
            return exc.code
        return "stored"

    outcomes = race(count, upload)

    assert sorted(outcomes) == ["build_artifacts_quota_exceeded"] * 5 + ["stored"] * 3
    assert Artifact.objects.filter(build=build).count() == 3


# ===================================================================== the agent's upload route


def upload(job_client: APIClient, job_id: Any, path: str, content: bytes, **query: str):
    return job_client.put(job_url(job_id, "artifacts"), content, content_type="application/octet-stream",
                          QUERY_STRING="&".join([f"path={path}"] + [f"{k}={v}" for k, v in query.items()]))


def test_upload_stores_the_raw_body_and_answers_with_the_artifact(running: tuple[dict[str, Any], APIClient],
                                                                  media: Path) -> None:
    spec, job_client = running

    response = upload(job_client, spec["id"], "dist/app%20v1.bin", BINARY, sha256=hashlib.sha256(BINARY).hexdigest())

    assert response.status_code == 201, response.content
    artifact = Artifact.objects.get()
    assert response.json() == {
        "id": str(artifact.pk), "path": "dist/app v1.bin", "size": len(BINARY),
        "sha256": hashlib.sha256(BINARY).hexdigest(), "mime_type": "application/octet-stream",
        "created_at": artifact.created_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    assert (media / artifact.file.name).read_bytes() == BINARY

    retried = upload(job_client, spec["id"], "dist/app%20v1.bin", BINARY)
    assert retried.status_code == 200 and retried.json() == response.json()
    assert Artifact.objects.count() == 1


def test_an_empty_file_is_an_artifact_too(running: tuple[dict[str, Any], APIClient]) -> None:
    spec, job_client = running
    response = upload(job_client, spec["id"], "empty.txt", b"")
    assert response.status_code == 201, response.content
    assert response.json()["size"] == 0
    assert response.json()["sha256"] == hashlib.sha256(b"").hexdigest()


def test_upload_errors_are_envelopes(running: tuple[dict[str, Any], APIClient], media: Path, settings: Any) -> None:
    spec, job_client = running
    settings.ARTIFACT_MAX_BYTES = 100
    settings.BUILD_ARTIFACTS_MAX_BYTES = 150

    assert_error(upload(job_client, spec["id"], "big.bin", b"x" * 101), 413, "artifact_too_large")
    error = assert_error(upload(job_client, spec["id"], "../up.bin", b"x"), 422, "artifact_path_invalid")
    assert error["fields"] == {"path": ["the path contains a `..` segment"]}
    assert_error(job_client.put(job_url(spec["id"], "artifacts"), b"x", content_type="application/octet-stream"),
                 422, "artifact_path_invalid")  # no path at all
    assert_error(upload(job_client, spec["id"], "a.bin", b"x", sha256="f" * 64), 422, "artifact_checksum_mismatch")
    assert upload(job_client, spec["id"], "first.bin", b"x" * 100).status_code == 201
    assert_error(upload(job_client, spec["id"], "second.bin", b"x" * 51), 413, "build_artifacts_quota_exceeded")
    assert_error(upload(job_client, spec["id"], "first.bin", b"y" * 100), 409, "artifact_exists")
    assert list(Artifact.objects.values_list("path", flat=True)) == ["first.bin"]
    assert len(stored_files(media)) == 1


@pytest.mark.parametrize("headers", [{"CONTENT_LENGTH": "", "HTTP_TRANSFER_ENCODING": "chunked"},
                                     {"CONTENT_LENGTH": "12abc"}])
def test_upload_without_a_content_length_is_411(running: tuple[dict[str, Any], APIClient],
                                                headers: dict[str, str]) -> None:
    spec, job_client = running
    response = job_client.put(job_url(spec["id"], "artifacts") + "?path=a.bin", b"data",
                              content_type="application/octet-stream", **headers)
    assert_error(response, 411, "invalid_request")
    assert not Artifact.objects.exists()


def test_upload_after_the_job_finished_is_409(running: tuple[dict[str, Any], APIClient]) -> None:
    spec, job_client = running
    finish(job_client, spec["id"], exit_code=1)
    assert_error(upload(job_client, spec["id"], "late.txt", b"late"), 409, "job_not_active")
    assert not Artifact.objects.exists()


def test_upload_takes_this_jobs_credential_only(session: APIClient, pipeline: Any, api: APIClient,
                                                anon: APIClient) -> None:
    make_build(pipeline, pipeline_ir=parallel_ir(2))
    (spec_a, client_a), (spec_b, _) = claim(session), claim(session)

    assert_error(upload(client_a, spec_b["id"], "x.txt", b"x"), 404, "job_not_found")
    for client in (anon, api, session):  # no credential, a REST token, the agent's session
        assert_error(upload(client, spec_a["id"], "x.txt", b"x"), 401, "unauthorized")
    assert not Artifact.objects.exists()


# ===================================================================== the REST API


def artifacts_url(build: Build, suffix: str = "") -> str:
    pipeline = build.pipeline
    return (f"/api/v0/organizations/{pipeline.organization.slug}/pipelines/{pipeline.slug}/builds/{build.number}"
            f"/artifacts{suffix}")


def expected(artifact: Artifact) -> dict[str, Any]:
    return {
        "id": str(artifact.pk), "job_id": str(artifact.job_id), "path": artifact.path, "size": artifact.size,
        "sha256": artifact.sha256, "mime_type": artifact.mime_type,
        "created_at": artifact.created_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "download_url": f"http://testserver{artifacts_url(artifact.build, f'/{artifact.pk}/download')}",
    }


@pytest.fixture
def two_jobs(session: APIClient, pipeline: Any) -> tuple[Build, Job, Job]:
    """A build of two parallel jobs, both running."""
    build = make_build(pipeline, pipeline_ir=parallel_ir(2))
    first, second = (Job.objects.select_related("agent").get(pk=claim(session)[0]["id"]) for _ in range(2))
    return build, first, second


def test_list_shows_every_field_oldest_first(api: APIClient, two_jobs: tuple[Build, Job, Job]) -> None:
    build, first, second = two_jobs
    a = store(first, "reports/junit.xml", b"<testsuite/>").artifact
    b = store(second, "app.tar.gz", b"\x1f\x8b").artifact
    c = store(first, "notes.txt", b"hello").artifact

    response = api.get(artifacts_url(build))

    assert response.status_code == 200
    assert response.json() == {"data": [expected(a), expected(b), expected(c)], "next_cursor": None}
    assert [item["mime_type"] for item in response.json()["data"]] == ["application/xml", "application/gzip",
                                                                       "text/plain"]


def test_download_urls_use_the_public_url(api: APIClient, job: Job, settings: Any) -> None:
    settings.PUBLIC_URL = "https://ci.example.org"
    artifact = store(job, "a.txt", b"a").artifact
    item = api.get(artifacts_url(artifact.build)).json()["data"][0]
    assert item["download_url"] == f"https://ci.example.org{artifacts_url(artifact.build, f'/{artifact.pk}/download')}"


def test_list_filters_by_job(api: APIClient, two_jobs: tuple[Build, Job, Job]) -> None:
    build, first, second = two_jobs
    mine = store(first, "a.txt", b"a").artifact
    store(second, "b.txt", b"b")

    assert api.get(artifacts_url(build), {"job_id": str(first.pk)}).json() == {"data": [expected(mine)],
                                                                               "next_cursor": None}
    unknown = api.get(artifacts_url(build), {"job_id": "00000000-0000-0000-0000-000000000000"})
    assert unknown.json() == {"data": [], "next_cursor": None}
    error = assert_error(api.get(artifacts_url(build), {"job_id": "not-a-uuid"}), 400, "invalid_filter")
    assert list(error["fields"]) == ["job_id"]


def test_list_of_a_build_without_artifacts_is_empty(api: APIClient, build: Build) -> None:
    assert api.get(artifacts_url(build)).json() == {"data": [], "next_cursor": None}


def test_pages_walk_every_artifact_once_in_order(api: APIClient, job: Job) -> None:
    same_time = timezone.now()
    # Several in the same microsecond: the id breaks the tie, so none is skipped or repeated.
    ids = [store_artifact(job=job, path=f"f{i}", content=b"x", now=same_time if i < 4 else None).artifact.pk
           for i in range(7)]
    expected_order = [str(pk) for pk in sorted(ids[:4])] + [str(pk) for pk in ids[4:]]

    seen: list[str] = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        body = api.get(artifacts_url(job.build), params).json()
        seen += [item["id"] for item in body["data"]]
        assert len(body["data"]) <= 2
        if body["next_cursor"] is None:
            break
        params["cursor"] = body["next_cursor"]

    assert seen == expected_order


def time_cursor(payload: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


@pytest.mark.parametrize("cursor", [
    "garbage", encode_cursor(5), time_cursor([1, 2]),
    time_cursor({"t": "2026-01-01T00:00:00", "i": "00000000-0000-0000-0000-000000000000"}),  # no time zone
    time_cursor({"t": "2026-01-01T00:00:00+00:00", "i": "not-a-uuid"}),
])
def test_a_bad_cursor_is_400(api: APIClient, job: Job, cursor: str) -> None:
    assert_error(api.get(artifacts_url(job.build), {"cursor": cursor}), 400, "invalid_cursor")


def test_list_query_count_is_independent_of_page_size_and_depth(api: APIClient, owner: User, job: Job,
                                                                django_assert_num_queries: Any) -> None:
    assert ApiToken.objects.filter(user=owner).update(last_used_at=timezone.now()) == 1  # no write on auth
    for i in range(12):
        store(job, f"f{i}.txt", b"x")
    url = artifacts_url(job.build)
    cursor = api.get(url, {"limit": 3}).json()["next_cursor"]
    for params in ({"limit": 1}, {"limit": 100}, {"limit": 3, "cursor": cursor}, {"job_id": str(job.pk)}):
        # the token, the build with the caller's role, one page of artifacts
        with django_assert_num_queries(3):
            assert api.get(url, params).status_code == 200


def test_download_streams_the_bytes_with_headers(api: APIClient, job: Job) -> None:
    artifact = store(job, "dist/app.bin", BINARY).artifact

    response = api.get(artifacts_url(job.build, f"/{artifact.pk}/download"), HTTP_ACCEPT="application/octet-stream")

    assert response.status_code == 200
    assert response.streaming
    assert b"".join(response.streaming_content) == BINARY
    assert response["Content-Type"] == "application/octet-stream"
    assert response["Content-Length"] == str(len(BINARY))
    assert response["Content-Disposition"] == 'attachment; filename="app.bin"'
    assert response["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(("path", "disposition"), [
    ('odd"name\\.html', 'attachment; filename="odd_name_.html"'),
    ("dir/résumé.pdf", "attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf"),
])
def test_download_names_are_safe(api: APIClient, job: Job, path: str, disposition: str) -> None:
    artifact = store(job, path, b"<script>alert(1)</script>").artifact
    response = api.get(artifacts_url(job.build, f"/{artifact.pk}/download"))
    assert response["Content-Disposition"] == disposition  # always an attachment, never rendered inline


def test_a_member_can_list_and_download(member_api: APIClient, job: Job) -> None:
    artifact = store(job, "a.txt", b"for members").artifact
    assert member_api.get(artifacts_url(job.build)).json()["data"] == [expected(artifact)]
    response = member_api.get(artifacts_url(job.build, f"/{artifact.pk}/download"))
    assert b"".join(response.streaming_content) == b"for members"


def test_other_organizations_and_other_builds_are_404(stranger_api: APIClient, api: APIClient, job: Job,
                                                      pipeline: Any, anon: APIClient) -> None:
    artifact = store(job, "a.txt", b"secret").artifact
    download = artifacts_url(job.build, f"/{artifact.pk}/download")
    other_build = make_build(pipeline)

    assert_error(stranger_api.get(artifacts_url(job.build)), 404, "organization_not_found")
    assert_error(stranger_api.get(download), 404, "organization_not_found")
    assert_error(api.get(artifacts_url(other_build, f"/{artifact.pk}/download")), 404, "artifact_not_found")
    assert_error(api.get(artifacts_url(job.build, "/not-a-uuid/download")), 404, "artifact_not_found")
    assert_error(api.get(artifacts_url(job.build, "/00000000-0000-0000-0000-000000000000/download")), 404,
                 "artifact_not_found")
    assert_error(api.get(artifacts_url(job.build).replace(f"/builds/{job.build.number}/", "/builds/999/")), 404,
                 "build_not_found")
    assert_error(anon.get(download), 401, "unauthorized")
    assert api.get(artifacts_url(other_build)).json() == {"data": [], "next_cursor": None}


# ===================================================================== the build page


def page_url(build: Build, suffix: str = "") -> str:
    return f"/orgs/{build.pipeline.organization.slug}/pipelines/{build.pipeline.slug}/builds/{build.number}{suffix}"


@pytest.fixture
def web(owner: User) -> Client:
    client = Client()
    client.force_login(owner)
    return client


def test_build_page_lists_artifacts_with_download_links(web: Client, job: Job) -> None:
    artifact = store(job, "reports/<i>junit.xml", b"x" * 2048).artifact
    link = page_url(job.build, f"/artifacts/{artifact.pk}")

    page = web.get(page_url(job.build)).content.decode()

    row = page[page.index(f'data-artifact-id="{artifact.pk}"'):]
    row = row[:row.index("</tr>")]
    assert f'href="{link}"' in row
    assert "reports/&lt;i&gt;junit.xml" in row  # escaped, not markup
    assert ">a<" in row and "2.0\xa0KB" in row  # the job's key, the size
    response = web.get(link)
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == b"x" * 2048
    assert response["Content-Disposition"] == 'attachment; filename="<i>junit.xml"'


def test_build_page_without_artifacts_says_so(web: Client, build: Build) -> None:
    page = web.get(page_url(build)).content.decode()
    assert 'id="no-artifacts"' in page and 'id="artifacts"' not in page


def test_page_download_is_for_members_of_the_organization_only(client: Client, web: Client, stranger: User,
                                                               job: Job, pipeline: Any) -> None:
    artifact = store(job, "a.txt", b"secret").artifact
    link = page_url(job.build, f"/artifacts/{artifact.pk}")

    assert client.get(link).status_code == 302  # signed out: to the sign-in page
    client.force_login(stranger)
    assert client.get(link).status_code == 404
    # Another build's URL with this artifact's id.
    assert web.get(page_url(make_build(pipeline), f"/artifacts/{artifact.pk}")).status_code == 404


# ===================================================================== the agent's side, without a server


def test_the_agent_collects_regular_files_and_links_inside_only(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "top.txt").write_bytes(b"top")
    (root / "sub" / "deeper" / "data.bin").write_bytes(BINARY)
    (root / "inside-link").symlink_to(root / "top.txt")
    (root / "outside-link").symlink_to(tmp_path / "elsewhere.txt")
    (tmp_path / "elsewhere.txt").write_text("the agent's own files")
    (root / "dir-link").symlink_to(root / "sub")
    (root / "dangling").symlink_to(root / "missing")
    os.mkfifo(root / "fifo")
    (root / "loop").symlink_to(root / "loop")
    (root / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"latin-1 name")

    files, skipped = collect_artifacts(root)

    assert [(relative, path, nofollow) for relative, path, nofollow in files] == [
        ("caf\ufffd.txt", root / os.fsdecode(b"caf\xe9.txt"), True),
        ("inside-link", root / "top.txt", False),
        ("top.txt", root / "top.txt", True),
        ("sub/deeper/data.bin", root / "sub" / "deeper" / "data.bin", True),
    ]
    assert skipped == [
        ("dangling", "a symbolic link to no regular file"),
        ("dir-link", "a symbolic link to no regular file"),
        ("fifo", "not a regular file"),
        ("loop", f"Symlink loop from '{root / 'loop'}'"),
        ("outside-link", "a symbolic link to outside $HARMONT_ARTIFACTS"),
    ]


def test_the_agent_sends_a_growing_file_as_it_was_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "growing.log"
    path.write_bytes(b"0123456789")
    with open(path, "rb") as file:
        body = BoundedReader(file, os.fstat(file.fileno()).st_size)
        with open(path, "ab") as writer:
            writer.write(b"appended later")
        assert body.sha256() == hashlib.sha256(b"0123456789").hexdigest()
        assert body.read(4) + body.read() + body.read() == b"0123456789"
        body.seek(0)  # a retry sends it again from the start
        assert body.read(100) == b"0123456789"


# ===================================================================== settings


def settings_error(**env: str) -> str:
    done = subprocess.run([sys.executable, "-c", "import harmont.settings"], cwd=Path(__file__).parent.parent,
                          env={**os.environ, **env}, capture_output=True, text=True)
    assert done.returncode != 0
    return done.stderr.strip().splitlines()[-1]


def test_settings_refuse_an_artifact_limit_above_the_request_limit() -> None:
    assert settings_error(HARMONT_MAX_REQUEST_BYTES="2048", HARMONT_ARTIFACT_MAX_BYTES="4096") == (
        "django.core.exceptions.ImproperlyConfigured: HARMONT_ARTIFACT_MAX_BYTES (4096) may not exceed "
        "HARMONT_MAX_REQUEST_BYTES (2048): an artifact is uploaded as one request body")


def test_settings_refuse_storage_options_that_are_no_json_object() -> None:
    assert settings_error(HARMONT_STORAGE_OPTIONS="[1]") == (
        "django.core.exceptions.ImproperlyConfigured: HARMONT_STORAGE_OPTIONS must be a JSON object, got list")
    assert settings_error(HARMONT_STORAGE_OPTIONS="{bucket").startswith(
        "django.core.exceptions.ImproperlyConfigured: HARMONT_STORAGE_OPTIONS must be a JSON object: ")


def test_the_storage_backend_and_its_options_come_from_the_environment() -> None:
    code = "import harmont.settings as s, json; print(json.dumps(s.STORAGES['default']))"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True,
                          text=True, check=True, env={**os.environ,
                                                      "HARMONT_STORAGE_BACKEND": "storages.backends.s3.S3Storage",
                                                      "HARMONT_STORAGE_OPTIONS": '{"bucket_name": "ci"}'})
    assert json.loads(done.stdout) == {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": {"bucket_name": "ci"}}
