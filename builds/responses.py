"""The file and text answers the API and the pages share: a job's raw log (whole, size, or tail), downloads."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

from django.db.models import BigIntegerField, Func
from django.http import FileResponse, HttpResponse, StreamingHttpResponse

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


# A raw log is sent in pieces of about this many bytes, each read from the database when
# the previous one has gone out: a 64 MiB log costs the server one piece, not the log.
LOG_PIECE_BYTES = 512 * 1024
# Chunk sizes are read ahead this many rows at a time (seq and length only, no content).
SIZES_PAGE_ROWS = 1000


class OctetLength(Func):
    """The UTF-8 size of a text column, computed by the database (the raw log is counted in bytes)."""

    function = "OCTET_LENGTH"
    output_field = BigIntegerField()

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        return self.as_sql(compiler, connection, template="LENGTH(CAST(%(expressions)s AS BLOB))", **extra)


def chunk_sizes(job_id: uuid.UUID, *, after: int | None = None, before: int | None = None,
                newest_first: bool = False, limit: int | None = None) -> list[tuple[int, int]]:
    """(seq, bytes) of up to `limit` (SIZES_PAGE_ROWS) chunks past `after` (or, newest first, before `before`)."""
    rows = LogChunk.objects.filter(job_id=job_id)
    if after is not None:
        rows = rows.filter(seq__gt=after)
    if before is not None:
        rows = rows.filter(seq__lt=before)
    rows = rows.order_by("-seq" if newest_first else "seq").annotate(size=OctetLength("content"))
    return list(rows.values_list("seq", "size")[:limit or SIZES_PAGE_ROWS])


class LogReader:
    """Reads a job's log in seq order, one piece of at most LOG_PIECE_BYTES (or one chunk) per query.

    `after` is the seq the log starts after (None: the start), `skip` the bytes of the first
    chunk to leave out (a tail starts inside one) and `remaining` the bytes to send in all:
    the size the response declared, so a log still growing can't overrun its Content-Length.
    """

    def __init__(self, job_id: uuid.UUID, *, remaining: int, after: int | None = None, skip: int = 0) -> None:
        self.job_id = job_id
        self.after = after
        self.skip = skip
        self.remaining = remaining
        self.sizes: list[tuple[int, int]] = []

    def read(self) -> bytes:
        """The next piece, or b"" at the end."""
        if self.remaining <= 0:
            return b""
        if not self.sizes:
            self.sizes = chunk_sizes(self.job_id, after=self.after)
            if not self.sizes:
                return b""
        total, count = 0, 0
        for _, size in self.sizes:
            if count and total + size > LOG_PIECE_BYTES:
                break
            total += size
            count += 1
        last = self.sizes[count - 1][0]
        del self.sizes[:count]
        contents = LogChunk.objects.filter(job_id=self.job_id, seq__lte=last).order_by("seq")
        if self.after is not None:
            contents = contents.filter(seq__gt=self.after)
        data = "".join(contents.values_list("content", flat=True)).encode()
        self.after = last
        if self.skip:
            data, self.skip = data[self.skip:], 0
        data = data[:self.remaining]
        self.remaining -= len(data)
        return data

    def __iter__(self) -> Iterator[bytes]:
        while piece := self.read():
            yield piece


def tail_start(job_id: uuid.UUID, wanted: int) -> tuple[int | None, int]:
    """Where the last `wanted` bytes begin: the seq before the chunk holding that byte (None: the
    first chunk) and the bytes of that chunk before it. Only sizes are read, newest first."""
    have, before = 0, None
    while sizes := chunk_sizes(job_id, before=before, newest_first=True):
        for seq, size in sizes:
            have += size
            if have >= wanted:
                return seq - 1, have - wanted
        before = sizes[-1][0]
    return None, 0


def log_response(reader: LogReader, *, status: int) -> StreamingHttpResponse:
    response = StreamingHttpResponse(reader, status=status, content_type="text/plain; charset=utf-8")
    response["Content-Length"] = str(reader.remaining)
    response["Accept-Ranges"] = "bytes"
    return response


def raw_log_response(job: Job, range_header: str | None) -> StreamingHttpResponse:
    """200 with the whole log, or 206 with its tail for `Range: bytes=-N` (Buildkite's cheap tail).

    Both are streamed from the database piece by piece (the WSGI side serves them,
    which iterates a sync body as it sends it).
    """
    wanted = tail_range(range_header, job.log_bytes)
    if wanted is None:
        return log_response(LogReader(job.pk, remaining=job.log_bytes), status=200)
    after, skip = tail_start(job.pk, wanted)
    response = log_response(LogReader(job.pk, remaining=wanted, after=after, skip=skip), status=206)
    response["Content-Range"] = f"bytes {job.log_bytes - wanted}-{job.log_bytes - 1}/{job.log_bytes}"
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


def snapshot_response(field: Any, filename: str) -> FileResponse:
    """A stored filesystem snapshot (an engine's `save` archive), streamed from storage as an attachment."""
    response = FileResponse(field.open("rb"), content_type="application/x-tar", as_attachment=True,
                            filename=filename)
    response["Content-Length"] = str(field.size)
    return response


def archive_response(field: Any, filename: str) -> FileResponse:
    """A stored gzipped tarball (a build's uploaded source, a job's workspace), as an attachment."""
    return FileResponse(field.open("rb"), content_type="application/gzip", as_attachment=True, filename=filename)
