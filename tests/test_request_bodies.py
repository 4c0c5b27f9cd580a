"""Request bodies: each route takes at most its limit, refused before the body is read.

JSON routes take HARMONT_MAX_JSON_BYTES; the build creates take a source
archive's base64 on top (HARMONT_SOURCE_MAX_BYTES); the agents' uploads and job
output take HARMONT_MAX_REQUEST_BYTES. A body without Content-Length (chunked)
is counted as it is read and refused once it passes the limit.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import random
from typing import Any

import pytest

from builds.models import Build, LogChunk
from organizations import services as org_services
from organizations.models import Organization
from pipelines import services as pipeline_services
from tests.dsl import hm
from tests.helpers import (assert_error, builds_url, chunk, claim, job_url, make_build, settings_from_env, start,
                           tarball)

pytestmark = pytest.mark.django_db


class Payload:
    """A request body that counts what is read of it (and may refuse being read at all)."""

    def __init__(self, data: bytes, *, readable: bool = True) -> None:
        self.data = io.BytesIO(data)
        self.readable = readable
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        assert self.readable, "the body was read"
        piece = self.data.read(size)
        self.read_bytes += len(piece)
        return piece

    def readline(self, size: int = -1) -> bytes:
        return self.read(size)


def post_raw(client: Any, path: str, payload: Payload, *, length: int | None) -> Any:
    """POST `payload` as JSON, with Content-Length `length`, or chunked (no length) when None."""
    extra: dict[str, Any] = {"wsgi.input": payload}
    if length is None:
        extra["HTTP_TRANSFER_ENCODING"] = "chunked"
    else:
        extra["CONTENT_LENGTH"] = str(length)
    return client.generic("POST", path, content_type="application/json", **extra)


def org_body(size: int) -> bytes:
    """A create-organization body of `size` bytes (the padding in a field the route ignores)."""
    body = json.dumps({"name": "Big", "pad": ""}).encode()
    return json.dumps({"name": "Big", "pad": "x" * (size - len(body))}).encode()


def test_the_json_limit_is_1_mib_by_default():
    loaded = settings_from_env(("MAX_JSON_BYTES", "SOURCE_MAX_BYTES", "MAX_BUILD_REQUEST_BYTES"))
    assert loaded["MAX_JSON_BYTES"] == 1024 * 1024
    assert loaded["SOURCE_MAX_BYTES"] == 32 * 1024 * 1024
    # The base64 of the largest archive, and an ordinary JSON body for the rest.
    assert loaded["MAX_BUILD_REQUEST_BYTES"] == 4 * -(-32 * 1024 * 1024 // 3) + 1024 * 1024


def test_a_source_limit_past_the_request_limit_stops_the_server():
    loaded = settings_from_env(("SOURCE_MAX_BYTES",), HARMONT_SOURCE_MAX_BYTES=str(60 * 1024 * 1024))
    assert "more than HARMONT_MAX_REQUEST_BYTES" in loaded["error"]


def test_a_json_body_past_1_mib_is_413_unread(api):
    payload = Payload(b"", readable=False)
    response = post_raw(api, "/api/v0/organizations", payload, length=1024 * 1024 + 1)
    error = assert_error(response, 413, "payload_too_large")
    assert str(1024 * 1024) in error["message"]
    assert response["X-Request-Id"] == error["request_id"]
    assert Organization.objects.filter(name="Big").count() == 0


def test_a_json_body_at_the_limit_is_read(api, settings):
    settings.MAX_JSON_BYTES = 4096
    body = org_body(4096)
    response = post_raw(api, "/api/v0/organizations", Payload(body), length=len(body))
    assert response.status_code == 201, response.content
    assert response.json()["name"] == "Big"


def test_a_chunked_json_body_past_the_limit_is_413_once_counted_past_it(api, settings):
    settings.MAX_JSON_BYTES = 4096
    payload = Payload(org_body(1024 * 1024))
    response = post_raw(api, "/api/v0/organizations", payload, length=None)
    assert_error(response, 413, "payload_too_large")
    assert payload.read_bytes == 4097  # one byte past the limit, never the rest
    assert Organization.objects.filter(name="Big").count() == 0


def test_a_chunked_json_body_within_the_limit_is_parsed(api, settings):
    settings.MAX_JSON_BYTES = 4096
    response = post_raw(api, "/api/v0/organizations", Payload(org_body(3000)), length=None)
    assert response.status_code == 201, response.content
    assert response.json()["name"] == "Big"


def test_a_build_create_takes_its_source_past_the_json_limit(api, pipeline, settings):
    settings.MAX_JSON_BYTES = 4096
    settings.MAX_BUILD_REQUEST_BYTES = 64 * 1024
    archive = tarball({"big.bin": random.Random(7).randbytes(8000)})  # random bytes don't compress
    body = json.dumps({"branch": "main", "commit": "abc123",
                       "source_b64": base64.b64encode(archive).decode()}).encode()
    assert 4096 < len(body) < 64 * 1024

    response = post_raw(api, builds_url(pipeline), Payload(body), length=len(body))

    assert response.status_code == 201, response.content
    assert Build.objects.get().source_archive


def test_a_build_create_past_its_limit_is_413_unread(api, pipeline, settings):
    settings.MAX_BUILD_REQUEST_BYTES = 64 * 1024
    response = post_raw(api, builds_url(pipeline), Payload(b"", readable=False), length=64 * 1024 + 1)
    assert str(64 * 1024) in assert_error(response, 413, "payload_too_large")["message"]
    assert Build.objects.count() == 0


def test_the_other_build_create_has_the_same_limit(api, pipeline, settings):
    settings.MAX_JSON_BYTES = 4096
    settings.MAX_BUILD_REQUEST_BYTES = 64 * 1024
    path = f"/api/v0/organizations/{pipeline.organization.slug}/builds"
    assert post_raw(api, path, Payload(b"", readable=False), length=64 * 1024 + 1).status_code == 413
    body = json.dumps({"repo_name": pipeline.repo_name, "source_slug": pipeline.source_slug, "branch": "main",
                       "commit": "abc123", "message": "m" * 8000}).encode()
    assert post_raw(api, path, Payload(body), length=len(body)).status_code == 201


def test_a_source_archive_past_its_limit_is_422_and_no_build(api, pipeline, settings):
    settings.SOURCE_MAX_BYTES = 1024
    archive = bytes(range(256)) * 5
    response = api.post(builds_url(pipeline), {"branch": "main", "commit": "abc123",
                                               "source_b64": base64.b64encode(archive).decode()}, format="json")
    error = assert_error(response, 422, "build_invalid")
    assert error["fields"]["source_b64"] == ["The archive is larger than 1024 bytes."]
    assert Build.objects.count() == 0


def test_job_output_takes_more_than_the_json_limit(running, settings):
    settings.MAX_JSON_BYTES = 4096
    spec, job_client = running
    chunks = [chunk(seq, "x" * 3000) for seq in range(1, 4)]
    response = job_client.post(job_url(spec["id"], "logs"), {"chunks": chunks}, format="json")
    assert response.status_code == 200, response.content
    assert LogChunk.objects.filter(job_id=spec["id"]).count() == 3


def test_an_agent_json_route_keeps_the_json_limit(running, settings):
    settings.MAX_JSON_BYTES = 4096
    spec, job_client = running
    response = post_raw(job_client, job_url(spec["id"], "heartbeat"), Payload(b"", readable=False), length=5000)
    assert_error(response, 413, "payload_too_large")


def chunked_post(live: Any, path: str, raw_token: str, pieces: list[bytes]) -> tuple[int, dict[str, Any]]:
    """POST `pieces` with Transfer-Encoding: chunked to the live server; (status, JSON body)."""
    conn = http.client.HTTPConnection(live.host, live.port, timeout=30)
    try:
        conn.request("POST", path, body=iter(pieces), encode_chunked=True,
                     headers={"Authorization": f"Bearer {raw_token}", "Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_the_served_application_counts_a_chunked_body_as_it_arrives(live_asgi, owner, settings):
    settings.MAX_JSON_BYTES = 4096
    raw = org_services.create_personal_token(user=owner, description="live").raw
    body = org_body(3000)
    status, answer = chunked_post(live_asgi, "/api/v0/organizations", raw, [body[i:i + 500]
                                                                           for i in range(0, len(body), 500)])
    assert (status, answer["name"]) == (201, "Big")

    big = org_body(256 * 1024)
    status, answer = chunked_post(live_asgi, "/api/v0/organizations", raw, [big[i:i + 1024]
                                                                           for i in range(0, len(big), 1024)])
    assert (status, answer["error"]["code"]) == (413, "payload_too_large")
    assert Organization.objects.filter(name="Big").count() == 1


def test_a_rendered_pipeline_takes_what_a_build_create_takes(session, org, settings):
    settings.MAX_JSON_BYTES = 4096
    settings.MAX_BUILD_REQUEST_BYTES = 64 * 1024
    pipeline = pipeline_services.create_pipeline(org=org, name="Site", repository="file:///srv/git/site.git",
                                                 default_branch="main", source_slug="ci")
    make_build(pipeline)
    spec, job_client = claim(session)
    start(job_client, spec["id"])
    ir = hm.pipeline([hm.sh("echo " + "x" * 2000, key=f"s{i}") for i in range(4)])
    body = json.dumps({"pipeline_ir": ir}).encode()
    assert 4096 < len(body) < 64 * 1024

    response = post_raw(job_client, job_url(spec["id"], "pipeline"), Payload(body), length=len(body))

    assert (response.status_code, response.json()) == (200, {"jobs": 4})
