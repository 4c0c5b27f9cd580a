"""The file and text answers the API and the pages share: a job's raw log (whole, size, or tail), downloads."""

from __future__ import annotations

import re

from typing import Any

from django.http import FileResponse, HttpResponse

from builds.models import Artifact, Job, LogChunk

SUFFIX_RANGE = re.compile(r"bytes=-([0-9]{1,18})")


def tail_range(header: str | None, size: int) -> int | None:
    """The N of `Range: bytes=-N` (clamped to the size), or None for the whole log.

    Only the suffix form is served: it is what a cheap tail needs. Other
    forms are ignored and the whole log is sent, which RFC 9110 allows.
    """
    if not header:
        return None
    match = SUFFIX_RANGE.fullmatch(header.strip())
    # `bytes=-0` asks for nothing, which no 206 can describe; ignored like the other forms
    # (it used to answer 206 with the whole log: `body[-0:]` is all of it).
    if not match or size == 0 or int(match[1]) == 0:
        return None
    return min(int(match[1]), size)


def job_log_bytes(job: Job) -> bytes:
    contents = LogChunk.objects.filter(job=job).order_by("seq").values_list("content", flat=True)
    return "".join(contents.iterator(chunk_size=500)).encode()


def job_log_tail(job: Job, wanted: int) -> bytes:
    """The last `wanted` bytes, reading chunks from the end only as far as needed."""
    parts: list[bytes] = []
    have = 0
    for content in LogChunk.objects.filter(job=job).order_by("-seq").values_list("content", flat=True).iterator(
            chunk_size=100):
        data = content.encode()
        parts.append(data)
        have += len(data)
        if have >= wanted:
            break
    return b"".join(reversed(parts))[-wanted:]


def text_response(body: bytes, *, status: int) -> HttpResponse:
    response = HttpResponse(body, status=status, content_type="text/plain; charset=utf-8")
    response["Accept-Ranges"] = "bytes"
    return response


def raw_log_response(job: Job, range_header: str | None) -> HttpResponse:
    """200 with the whole log, or 206 with its tail for `Range: bytes=-N` (Buildkite's cheap tail)."""
    wanted = tail_range(range_header, job.log_bytes)
    if wanted is None:
        return text_response(job_log_bytes(job), status=200)
    body = job_log_tail(job, wanted)
    response = text_response(body, status=206)
    response["Content-Range"] = f"bytes {job.log_bytes - len(body)}-{job.log_bytes - 1}/{job.log_bytes}"
    return response


def raw_log_head(job: Job) -> HttpResponse:
    response = HttpResponse(b"", content_type="text/plain; charset=utf-8")
    response["Content-Length"] = str(job.log_bytes)
    response["Accept-Ranges"] = "bytes"
    return response


def download_name(path: str) -> str:
    """The file name a download is saved under: the path's last segment, quotes and backslashes replaced."""
    name = path.rsplit("/", 1)[-1].replace('"', "_").replace("\\", "_").strip()
    return name or "artifact"


def artifact_response(artifact: Artifact) -> FileResponse:
    """The artifact's bytes streamed from storage, always as an attachment.

    Never inline: an HTML or SVG file a job wrote must not run as a page of this
    server's origin.
    """
    response = FileResponse(artifact.file.open("rb"), as_attachment=True, filename=download_name(artifact.path),
                            content_type=artifact.mime_type)
    response["Content-Length"] = str(artifact.size)
    response["X-Content-Type-Options"] = "nosniff"
    return response


def archive_response(field: Any, filename: str) -> FileResponse:
    """A stored gzipped tarball (a build's uploaded source, a job's workspace), as an attachment."""
    return FileResponse(field.open("rb"), content_type="application/gzip", as_attachment=True, filename=filename)
