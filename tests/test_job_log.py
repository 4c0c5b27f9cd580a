"""The raw job log (`GET|HEAD .../builds/{n}/jobs/{job_id}/log`, SPEC §5) and log storage.

The log is every stored chunk's content in seq order, all streams together, as
`text/plain; charset=utf-8`. `HEAD` gives its byte size; `Range: bytes=-N` the last
N bytes (206), as Buildkite's log API does — a cheap tail for scripts. Storage
(`services.append_log`): a chunk is stored once per (job, seq), and past the per-job
limit output is dropped with one meta chunk saying so while the job goes on.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone as dt_timezone
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from builds import responses, services
from builds.models import Build, Job, JobState, LogChunk, StreamKind
from harmont.timestamps import ns_from_datetime
from tests.helpers import assert_error, builds_url, make_agent, make_build

pytestmark = pytest.mark.django_db

T0 = datetime(2025, 1, 6, 12, 0, tzinfo=dt_timezone.utc)
OUT, ERR, META = StreamKind.STDOUT, StreamKind.STDERR, StreamKind.META
# Non-ASCII on purpose: sizes and ranges are in bytes of UTF-8, not characters.
LINES = [(1, OUT, "héllo wörld\n"), (2, ERR, "warning: ✗ 日本語\n"), (3, META, "[harmont] ok 🎉\n"),
         (4, OUT, "plain ascii\n")]
FULL = "".join(content for _, _, content in LINES).encode()


def log_url(build: Build, job_id: Any, *, org_slug: str | None = None) -> str:
    return builds_url(build.pipeline, f"/{build.number}/jobs/{job_id}/log", org_slug=org_slug)


def job_of(build: Build, key: str = "a") -> Job:
    return Job.objects.get(build=build, step_key=key)


def write(job: Job, lines: list[tuple[int, int, str]]) -> int:
    return services.append_log(job=job, chunks=[services.ChunkIn(seq, kind, content, ns_from_datetime(T0 + timedelta(seconds=seq)))
                                                for seq, kind, content in lines])


@pytest.fixture
def job(build) -> Job:
    """Job `a` of `build`, its log LINES written out of order and one of them twice."""
    job = job_of(build)
    write(job, [LINES[2], LINES[0]])
    write(job, [LINES[3], LINES[1], LINES[0]])
    return job


# ===================================================================== GET: the whole log


def test_log_is_the_whole_text_in_seq_order_of_all_streams(api, build, job):
    response = api.get(log_url(build, job.pk))

    assert response.status_code == 200
    assert response["Content-Type"] == "text/plain; charset=utf-8"
    assert response.getvalue() == FULL
    assert response["Content-Length"] == str(len(FULL))
    assert "Content-Range" not in response
    assert response["Accept-Ranges"] == "bytes"


def test_members_read_logs_too(member_api, build, job):
    assert member_api.get(log_url(build, job.pk)).getvalue() == FULL


def test_log_of_a_job_without_output_is_empty(api, build):
    job = job_of(build, "b")
    response = api.get(log_url(build, job.pk))
    assert (response.status_code, response.getvalue(), response["Content-Type"]) == (
        200, b"", "text/plain; charset=utf-8")
    assert api.head(log_url(build, job.pk))["Content-Length"] == "0"
    tail = api.get(log_url(build, job.pk), HTTP_RANGE="bytes=-10")
    assert (tail.status_code, tail.getvalue()) == (200, b"")


# ===================================================================== HEAD: the size


def test_head_gives_the_size_in_bytes_and_no_body(api, build, job):
    response = api.head(log_url(build, job.pk))

    assert response.status_code == 200
    assert response["Content-Length"] == str(len(FULL))
    assert len(FULL) > len(FULL.decode())  # bytes, not characters
    assert response["Content-Type"] == "text/plain; charset=utf-8"
    assert response.content == b""


def test_head_of_a_job_of_another_build_is_404(api, pipeline, build, job):
    other = make_build(pipeline)
    assert api.head(log_url(other, job.pk)).status_code == 404


# ===================================================================== Range: bytes=-N


@pytest.mark.parametrize("n", [1, 5, 13, 14, 30, len(FULL) - 1])
def test_suffix_range_is_206_with_exactly_the_last_n_bytes(api, build, job, n):
    response = api.get(log_url(build, job.pk), HTTP_RANGE=f"bytes=-{n}")

    total = len(FULL)
    assert response.status_code == 206
    assert response.getvalue() == FULL[-n:]  # may cut a UTF-8 sequence: a range is bytes
    assert response["Content-Range"] == f"bytes {total - n}-{total - 1}/{total}"
    assert response["Content-Length"] == str(n)
    assert response["Content-Type"] == "text/plain; charset=utf-8"


@pytest.mark.parametrize("n", [len(FULL), len(FULL) + 1, 10**12])
def test_suffix_range_longer_than_the_log_is_the_whole_log(api, build, job, n):
    response = api.get(log_url(build, job.pk), HTTP_RANGE=f"bytes=-{n}")

    assert response.status_code == 206
    assert response.getvalue() == FULL
    assert response["Content-Range"] == f"bytes 0-{len(FULL) - 1}/{len(FULL)}"


@pytest.mark.parametrize("header", ["bytes=0-10", "bytes=10-", "bytes=-5, -3", "bytes=-5,0-1", "items=-5",
                                    "bytes=-", "bytes=--5", "bytes=-x", "bytes=-0"])
def test_other_range_forms_get_the_whole_log_with_200(api, build, job, header):
    response = api.get(log_url(build, job.pk), HTTP_RANGE=header)

    assert response.status_code == 200
    assert response.getvalue() == FULL
    assert "Content-Range" not in response


def test_tail_across_many_chunks(api, build):
    job = job_of(build)
    lines = [(seq, OUT, f"line {seq:04d} ✓\n") for seq in range(1, 301)]
    write(job, lines)
    full = "".join(content for _, _, content in lines).encode()

    response = api.get(log_url(build, job.pk), HTTP_RANGE="bytes=-2500")  # ~185 chunks, past one fetch of 100

    assert response.status_code == 206
    assert response.getvalue() == full[-2500:]
    assert response["Content-Range"] == f"bytes {len(full) - 2500}-{len(full) - 1}/{len(full)}"


# ===================================================================== who may read


def test_log_of_another_orgs_job_is_404_organization(api, other_pipeline):
    foreign = make_build(other_pipeline)
    job = job_of(foreign)
    write(job, [LINES[0]])

    assert_error(api.get(log_url(foreign, job.pk)), 404, "organization_not_found")
    assert_error(api.get(log_url(foreign, job.pk), HTTP_RANGE="bytes=-3"), 404, "organization_not_found")


def test_log_of_a_job_of_another_build_is_404(api, pipeline, build, job):
    other = make_build(pipeline)
    assert_error(api.get(log_url(other, job.pk)), 404, "job_not_found")


@pytest.mark.parametrize("job_id", ["not-a-uuid", "123", str(uuid.uuid4()), "%C3%A9"])
def test_log_of_a_malformed_or_unknown_job_id_is_404(api, build, job_id):
    assert_error(api.get(log_url(build, job_id)), 404, "job_not_found")


def test_log_of_an_unknown_build_is_404(api, build, job):
    assert_error(api.get(builds_url(build.pipeline, f"/99/jobs/{job.pk}/log")), 404, "build_not_found")


def test_log_without_a_token_is_401_envelope(anon, build, job):
    assert_error(anon.get(log_url(build, job.pk)), 401, "unauthorized")
    assert_error(anon.get(log_url(build, job.pk), HTTP_RANGE="bytes=-3"), 401, "unauthorized")


def test_log_with_a_stranger_token_is_404(stranger_api, build, job):
    assert_error(stranger_api.get(log_url(build, job.pk)), 404, "organization_not_found")


# ===================================================================== queries


@pytest.mark.parametrize(("extra", "expected"), [({}, 5), ({"HTTP_RANGE": "bytes=-100000"}, 6),
                                                 ({"HTTP_RANGE": "bytes=-10"}, 6)])
def test_log_query_count_does_not_grow_with_the_log(api, build, pipeline, extra, expected):
    api.get(log_url(build, job_of(build).pk))  # the token's last_used_at write happens once in a while: not here
    counts = []
    for size in (3, 300):
        fresh = make_build(pipeline)
        job = job_of(fresh)
        write(job, [(seq, OUT, f"line {seq}\n") for seq in range(1, size + 1)])
        with CaptureQueriesContext(connection) as queries:
            response = api.get(log_url(fresh, job.pk), **extra)
            response.getvalue()  # the body is read from the database as it is sent
        assert response.status_code in (200, 206)
        counts.append(len(queries))
    # token, build+pipeline+the caller's membership, job, (a tail: where it starts,) chunk sizes, chunks
    assert counts == [expected, expected]


# ===================================================================== read in pieces


def big_log(job: Job, *, chunks: int, size: int) -> bytes:
    """`chunks` chunks of `size` bytes each (two-byte characters, so bytes and characters differ)."""
    body = "é" * ((size - 7) // 2) + "x" * ((size - 7) % 2)
    lines = [(seq, OUT, f"{seq:06d}{body}\n") for seq in range(1, chunks + 1)]
    write(job, lines)
    return "".join(content for _, _, content in lines).encode()


@pytest.mark.parametrize("extra", [{}, {"HTTP_RANGE": "bytes=-3000000"}, {"HTTP_RANGE": "bytes=-1"}])
def test_a_big_log_is_sent_in_pieces_of_at_most_the_piece_size(api, build, monkeypatch, extra):
    monkeypatch.setattr(responses, "SIZES_PAGE_ROWS", 7)  # several pages of sizes, both ways
    job = job_of(build)
    full = big_log(job, chunks=40, size=100_000)

    response = api.get(log_url(build, job.pk), **extra)
    pieces = list(response.streaming_content)

    body = b"".join(pieces)
    wanted = int(extra["HTTP_RANGE"][len("bytes=-"):]) if extra else len(full)
    assert body == full[-wanted:]
    assert response["Content-Length"] == str(wanted)
    assert max(len(piece) for piece in pieces) <= responses.LOG_PIECE_BYTES
    assert len(pieces) >= wanted / responses.LOG_PIECE_BYTES


def test_one_chunk_bigger_than_a_piece_is_one_piece(api, build, monkeypatch):
    monkeypatch.setattr(responses, "LOG_PIECE_BYTES", 1000)
    job = job_of(build)
    full = big_log(job, chunks=3, size=5000)

    pieces = list(api.get(log_url(build, job.pk)).streaming_content)

    assert [len(piece) for piece in pieces] == [len(full) // 3] * 3
    assert b"".join(pieces) == full


def test_a_log_growing_while_it_is_read_stops_at_the_size_it_declared(api, build, monkeypatch):
    monkeypatch.setattr(responses, "LOG_PIECE_BYTES", 100)
    job = job_of(build)
    full = big_log(job, chunks=5, size=200)

    response = api.get(log_url(build, job.pk))
    first = next(iter(response.streaming_content))
    write(job, [(6, OUT, "later\n")])

    assert first + b"".join(response.streaming_content) == full


# ===================================================================== storage and its limit


def test_a_batch_sent_twice_is_stored_once(api, build):
    job = job_of(build)
    batch = [(1, OUT, "one\n"), (2, ERR, "two ✓\n")]

    assert write(job, batch) == 2
    assert write(job, batch) == 0
    assert write(job, [batch[1], (3, OUT, "three\n")]) == 1

    job.refresh_from_db()
    body = api.get(log_url(build, job.pk)).getvalue()
    assert body == "one\ntwo ✓\nthree\n".encode()
    assert job.log_bytes == len(body)


def test_output_past_the_limit_is_dropped_with_one_meta_chunk_and_the_job_goes_on(api, build, settings, org):
    settings.JOB_LOG_LIMIT_BYTES = 100
    claim = services.claim_job(agent=make_agent(org))
    assert claim is not None and claim.job.step_key == "a"
    job = claim.job
    services.start_job(job=job)
    forty = "é" * 19 + "\n"  # 39 bytes

    assert write(job, [(1, OUT, forty), (2, ERR, forty)]) == 2
    assert write(job, [(3, OUT, forty), (4, OUT, forty)]) == 1  # 3 crosses the limit: the notice takes its seq
    assert write(job, [(5, OUT, "more\n")]) == 0
    assert write(job, [(3, OUT, forty), (6, META, "late meta\n")]) == 0  # a retry of the cut chunk

    stored = list(LogChunk.objects.filter(job=job).order_by("seq").values_list("seq", "stream_kind", "content"))
    assert [(seq, kind) for seq, kind, _ in stored] == [(1, OUT), (2, ERR), (3, META)]
    notice = stored[2][2]
    assert notice == "[harmont] log limit of 100 bytes reached; further output of this job is not stored\n"

    job.refresh_from_db()
    assert (job.state, job.log_truncated) == (JobState.RUNNING, True)
    assert job.log_bytes == 2 * len(forty.encode()) + len(notice.encode())  # everything stored, notice included

    # The job itself goes on and passes.
    assert services.report_finish(job=job, exit_code=0) == JobState.PASSED

    body = api.get(log_url(build, job.pk)).getvalue()
    assert body == (forty + forty + notice).encode()
    assert api.head(log_url(build, job.pk))["Content-Length"] == str(len(body)) == str(job.log_bytes)
    tail = api.get(log_url(build, job.pk), HTTP_RANGE="bytes=-20")
    assert (tail.status_code, tail.getvalue()) == (206, body[-20:])
    assert tail["Content-Range"] == f"bytes {len(body) - 20}-{len(body) - 1}/{len(body)}"


def test_a_chunk_exactly_at_the_limit_is_kept(build, settings):
    settings.JOB_LOG_LIMIT_BYTES = 100
    job = job_of(build)

    assert write(job, [(1, OUT, "x" * 99 + "\n"), (2, OUT, "")]) == 2
    assert write(job, [(3, OUT, "y")]) == 1

    job.refresh_from_db()
    assert list(LogChunk.objects.filter(job=job).order_by("seq").values_list("seq", "stream_kind")) == [
        (1, OUT), (2, OUT), (3, META)]
    assert job.log_truncated is True
