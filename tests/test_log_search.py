"""Searching a job's log: `GET .../builds/{n}/jobs/{job_id}/log?q=&limit=`.

The answer is `{"data": [{"line", "text"}], "truncated"}`: the lines containing `q` (a plain
substring, case-insensitive, matched with ANSI escapes removed), each with its 1-based number
counted over the whole log whatever the chunks were, and its text as stored. It is written as
the log is read (builds.responses.LogReader's pieces), so the queries grow with the pieces read,
never with the chunks, and the reading stops once `limit` is passed.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone as dt_timezone
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from builds import responses, services
from builds.models import Build, Job, StreamKind
from harmont.timestamps import ns_from_datetime
from tests.helpers import assert_error, builds_url, make_build

pytestmark = pytest.mark.django_db

T0 = datetime(2025, 1, 6, 12, 0, tzinfo=dt_timezone.utc)
OUT, ERR = StreamKind.STDOUT, StreamKind.STDERR


def log_url(build: Build, job_id: Any) -> str:
    return builds_url(build.pipeline, f"/{build.number}/jobs/{job_id}/log")


def job_of(build: Build, key: str = "a") -> Job:
    return Job.objects.get(build=build, step_key=key)


def write(job: Job, contents: list[str], *, kind: int = OUT) -> None:
    """`contents` as chunks 1, 2, ... of the job's log."""
    services.append_log(job=job, chunks=[
        services.ChunkIn(seq, kind, content, ns_from_datetime(T0 + timedelta(seconds=seq)))
        for seq, content in enumerate(contents, start=1)])


def search(api: Any, build: Build, job: Job, **params: Any) -> Any:
    response = api.get(log_url(build, job.pk), params)
    if response.status_code == 200:
        response.body = b"".join(response.streaming_content)
    return response


def answer(api: Any, build: Build, job: Job, **params: Any) -> dict[str, Any]:
    response = search(api, build, job, **params)
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/json"
    return json.loads(response.body)


@pytest.fixture
def job(build: Build) -> Job:
    job = job_of(build)
    write(job, ["$ make test\n", "compiling 3 files\nwarning: unused variable\n",  # several lines in one chunk
                "running tests\nFAIL: test_lo", "gin (expected 200, got 500)\n",  # one line in two chunks
                "\x1b[31mError:\x1b[0m 1 test failed\n", "done, with warnings"])  # no line break at the end
    return job


# ===================================================================== answers


def test_search_answers_the_matching_lines_with_their_numbers(api, build, job):
    assert answer(api, build, job, q="test") == {
        "data": [{"line": 1, "text": "$ make test"},
                 {"line": 4, "text": "running tests"},
                 {"line": 5, "text": "FAIL: test_login (expected 200, got 500)"},
                 {"line": 6, "text": "\x1b[31mError:\x1b[0m 1 test failed"}],
        "truncated": False}


def test_a_line_split_across_chunks_is_one_line_and_matches_across_the_split(api, build, job):
    assert answer(api, build, job, q="test_login") == {
        "data": [{"line": 5, "text": "FAIL: test_login (expected 200, got 500)"}], "truncated": False}


def test_a_match_split_across_many_small_chunks_is_found(api, build):
    job = job_of(build)
    write(job, ["first\n", *"progress: 100%", " done\n", "last\n"])  # one character per chunk
    assert answer(api, build, job, q="ss: 100% d")["data"] == [{"line": 2, "text": "progress: 100% done"}]


def test_search_is_case_insensitive(api, build, job):
    assert [m["line"] for m in answer(api, build, job, q="WARNING")["data"]] == [3, 7]
    assert [m["line"] for m in answer(api, build, job, q="error:")["data"]] == [6]


def test_search_is_case_insensitive_beyond_ascii(api, build):
    job = job_of(build)
    write(job, ["Grüße aus Köln\n", "ΣΊΣΥΦΟΣ\n"])
    assert answer(api, build, job, q="KÖLN")["data"] == [{"line": 1, "text": "Grüße aus Köln"}]
    assert answer(api, build, job, q="σίσυφος")["data"] == [{"line": 2, "text": "ΣΊΣΥΦΟΣ"}]


def test_ansi_escapes_are_not_matched_but_are_kept_in_the_text(api, build, job):
    # What the page shows is "Error: 1 test failed": an escape's letters are no part of it.
    assert answer(api, build, job, q="Error: 1")["data"] == [{"line": 6, "text": "\x1b[31mError:\x1b[0m 1 test failed"}]
    assert answer(api, build, job, q="31m")["data"] == []
    assert answer(api, build, job, q="[0m")["data"] == []


def test_an_escape_split_across_chunks_is_still_removed(api, build):
    job = job_of(build)
    write(job, ["build \x1b[3", "2mok\x1b[", "0m!\n"])
    assert answer(api, build, job, q="build ok!")["data"] == [{"line": 1, "text": "build \x1b[32mok\x1b[0m!"}]


def test_the_last_line_without_a_line_break_is_searched_too(api, build, job):
    assert answer(api, build, job, q="with warnings")["data"] == [{"line": 7, "text": "done, with warnings"}]


def test_a_crlf_line_end_is_no_part_of_the_text_and_q_is_a_plain_substring(api, build):
    job = job_of(build)
    write(job, ["a.b\r\n", "a+b (c)\r\n", "axb\n"])
    assert answer(api, build, job, q="a.b")["data"] == [{"line": 1, "text": "a.b"}]  # not a pattern
    assert answer(api, build, job, q="+b (c")["data"] == [{"line": 2, "text": "a+b (c)"}]


def test_an_empty_log_and_no_match_answer_an_empty_list(api, build, job):
    assert answer(api, build, job_of(build, "b"), q="x") == {"data": [], "truncated": False}
    assert answer(api, build, job, q="nowhere to be found") == {"data": [], "truncated": False}


def test_limit_is_honoured_and_truncated_says_whether_more_match(api, build, job):
    assert answer(api, build, job, q="t", limit=2) == {
        "data": [{"line": 1, "text": "$ make test"}, {"line": 4, "text": "running tests"}],
        "truncated": True}
    everything = answer(api, build, job, q="t", limit=1000)
    assert len(everything["data"]) == 5 and everything["truncated"] is False
    assert answer(api, build, job, q="t", limit=5) == everything


def test_the_default_limit_is_100(api, build):
    job = job_of(build)
    write(job, ["".join(f"line {n}\n" for n in range(1, 251))])
    body = answer(api, build, job, q="line")
    assert [m["line"] for m in body["data"]] == list(range(1, 101))
    assert body["truncated"] is True


def test_a_long_line_is_cut_in_the_answer_and_matched_past_the_cut(api, build):
    job = job_of(build)
    long_line = "x" * 10_000 + " needle " + "y" * 10_000
    write(job, ["short needle\n", long_line[:7000], long_line[7000:] + "\n"])
    data = answer(api, build, job, q="needle")["data"]
    assert [m["line"] for m in data] == [1, 2]
    assert data[1]["text"] == "x" * responses.SEARCH_LINE_MAX_CHARS


def test_limit_without_q_is_ignored_and_the_raw_log_is_sent(api, build, job):
    response = api.get(log_url(build, job.pk), {"limit": "nonsense"})
    assert response.status_code == 200
    assert response["Content-Type"] == "text/plain; charset=utf-8"
    assert response.getvalue().startswith(b"$ make test\n")


# ===================================================================== bad input


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "ten", "1.5"])
def test_a_bad_limit_is_400_invalid_limit(api, build, job, limit):
    error = assert_error(search(api, build, job, q="test", limit=limit), 400, "invalid_limit")
    assert "from 1 to 1000" in error["message"]


@pytest.mark.parametrize("q", ["", "x" * 201, "two\nlines", "carriage\rreturn"])
def test_a_bad_q_is_422_naming_q(api, build, job, q):
    error = assert_error(search(api, build, job, q=q), 422, "validation_failed")
    assert list(error["fields"]) == ["q"]


def test_q_of_200_characters_is_accepted(api, build, job):
    assert answer(api, build, job, q="x" * 200) == {"data": [], "truncated": False}


def test_q_with_a_range_header_is_422(api, build, job):
    response = api.get(log_url(build, job.pk), {"q": "test"}, HTTP_RANGE="bytes=-10")
    error = assert_error(response, 422, "validation_failed")
    assert "Range" in error["fields"]["q"][0]


def test_search_of_another_orgs_job_is_404(api, other_pipeline):
    foreign = make_build(other_pipeline)
    job = job_of(foreign)
    write(job, ["secret things\n"])
    assert_error(search(api, foreign, job, q="secret"), 404, "organization_not_found")


def test_search_of_a_job_of_another_build_is_404(api, pipeline, build, job):
    assert_error(search(api, make_build(pipeline), job, q="test"), 404, "job_not_found")


def test_search_without_a_token_is_401(anon, build, job):
    assert_error(search(anon, build, job, q="test"), 401, "unauthorized")


# ===================================================================== reading the log


def count_queries(api: Any, build: Build, job: Job, **params: Any) -> tuple[int, dict[str, Any]]:
    with CaptureQueriesContext(connection) as queries:
        body = answer(api, build, job, **params)  # the body is read from the database as it is written
    return len(queries), body


def test_search_query_count_does_not_grow_with_the_chunks(api, build, pipeline, django_assert_num_queries):
    api.get(log_url(build, job_of(build).pk))  # the token's last_used_at write happens once in a while: not here
    counts = []
    for size in (3, 300):
        fresh = make_build(pipeline)
        job = job_of(fresh)
        write(job, [f"line {seq}\n" for seq in range(1, size + 1)])
        queries, body = count_queries(api, fresh, job, q="line 2", limit=1000)
        assert body["data"][0] == {"line": 2, "text": "line 2"}
        counts.append(queries)
    # token, build+pipeline+the caller's membership, job, chunk sizes, chunks: as the raw log
    assert counts == [5, 5]
    with django_assert_num_queries(5):
        answer(api, fresh, job, q="line 2")


def test_a_big_log_is_searched_piece_by_piece(api, build, monkeypatch):
    monkeypatch.setattr(responses, "LOG_PIECE_BYTES", 1000)
    monkeypatch.setattr(responses, "SIZES_PAGE_ROWS", 7)
    job = job_of(build)
    # 40 chunks of ~100 bytes, each ending inside a line that the next one finishes.
    contents = [f"-{n:03d}-" + "." * 90 + ("\nmatch " if n % 10 == 9 else "\n") for n in range(40)]
    write(job, contents)

    response = api.get(log_url(build, job.pk), {"q": "MATCH -"})
    pieces = list(response.streaming_content)

    assert json.loads(b"".join(pieces)) == {"data": [{"line": line, "text": f"match -{chunk:03d}-" + "." * 90}
                                                     for line, chunk in ((11, 10), (21, 20), (31, 30))],
                                            "truncated": False}
    assert len(pieces) >= 3  # written as it was read, not once at the end


def test_reading_stops_once_the_limit_is_passed(api, build, monkeypatch):
    monkeypatch.setattr(responses, "LOG_PIECE_BYTES", 1000)
    job = job_of(build)
    write(job, [f"{n:04d} " + "." * 94 + "\n" for n in range(100)])  # 100 chunks of 100 bytes: 10 pieces

    api.get(log_url(build, job.pk))  # the token's last_used_at write happens once in a while: not here
    whole, body = count_queries(api, build, job, q="....")
    assert len(body["data"]) == 100
    early, body = count_queries(api, build, job, q="....", limit=3)
    assert body == {"data": [{"line": n, "text": f"{n - 1:04d} " + "." * 94} for n in (1, 2, 3)], "truncated": True}
    assert whole - early == 9  # one piece read of ten: the fourth match is in it too


# ===================================================================== the document


def test_openapi_documents_q_limit_and_the_json_answer(client):
    document = json.loads(client.get("/api/v0/openapi.json").content)
    operation = next(op for path, ops in document["paths"].items() if path.endswith("/jobs/{job_id}/log")
                     for op in ops.values() if op.get("operationId") == "getJobLog")
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert parameters["q"]["in"] == "query" and parameters["q"]["schema"] == {"type": "string"}
    assert parameters["limit"]["schema"] == {"type": "integer"}
    assert "case-insensitive" in parameters["q"]["description"]
    success = operation["responses"]["200"]["content"]
    assert set(success) == {"text/plain", "application/json"}
    matches = document["components"]["schemas"]["JobLogMatchList"]
    assert set(matches["required"]) == {"data", "truncated"}
    assert {"400", "404", "422"} <= set(operation["responses"])
