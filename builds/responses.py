"""The file and text answers the API and the pages share: a job's raw log (whole, size, tail, or the lines
matching a search), downloads."""

from __future__ import annotations

import codecs
import json
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from django.db.models import BigIntegerField, Func
from django.http import FileResponse, HttpResponse, StreamingHttpResponse

from builds.models import Artifact, Job, LogChunk
from harmont.errors import ApiError, validation_error

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


# ------------------------------------------------------------------ search: GET .../log?q=

SEARCH_QUERY_MAX_CHARS = 200
SEARCH_DEFAULT_LIMIT = 100
SEARCH_MAX_LIMIT = 1000
# A matching line is answered cut to this many characters: one minified bundle or base64 dump
# printed on one line must not make an answer of `limit` lines megabytes long.
SEARCH_LINE_MAX_CHARS = 4096
# What a terminal shows nothing of, removed before matching (the build page's AnsiConverter drops
# the same): CSI sequences (colours, cursor movement), OSC sequences (titles, links), a stray ESC.
ANSI_SEQUENCE = re.compile(r"\x1b\[[0-9;?]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b")
# A sequence cut off where a piece of the log ends: held back until the next piece completes it.
PARTIAL_ANSI = re.compile(r"\x1b(?:\[[0-9;?]*|\][^\x07\x1b]*)?\Z")
# ...unless it is longer than any real one: a stray `ESC ]` must not hold back the rest of the line.
PARTIAL_ANSI_MAX_CHARS = 256


@dataclass(frozen=True)
class LogSearch:
    query: str
    limit: int


def parse_log_search(params: Mapping[str, str], range_header: str | None) -> LogSearch | None:
    """The search `?q=&limit=` asks for, or None without `q` (the raw log; `limit` is then ignored).

    A bad `limit` is 400 `invalid_limit`, worded as a list's; a bad `q`, or `q` with a Range
    header, is 422 `validation_failed` naming `q`: a tail is bytes and a search answers lines, so
    no answer could honour both, and quietly dropping either would be the wrong answer.
    """
    if "q" not in params:
        return None
    query = params["q"]
    raw_limit = params.get("limit")
    limit = SEARCH_DEFAULT_LIMIT
    if raw_limit:
        bounds = f"limit must be an integer from 1 to {SEARCH_MAX_LIMIT}"
        try:
            limit = int(raw_limit)
        except ValueError:
            raise ApiError("invalid_limit", f"{bounds}, got {raw_limit!r}.") from None
        if not 1 <= limit <= SEARCH_MAX_LIMIT:
            raise ApiError("invalid_limit", f"{bounds}, got {limit}.")
    if not 1 <= len(query) <= SEARCH_QUERY_MAX_CHARS:
        raise validation_error({"q": [f"q must be 1 to {SEARCH_QUERY_MAX_CHARS} characters, got {len(query)}."]})
    if "\n" in query or "\r" in query:
        raise validation_error({"q": ["q is matched within one line, so it can't hold a line break."]})
    if range_header:
        raise validation_error({"q": ["q searches the whole log; it can't be combined with a Range header."]})
    return LogSearch(query=query, limit=limit)


class LineMatcher:
    """Numbers the lines of a log fed to it piece by piece and yields `(number, text)` of those containing `query`.

    Lines end at "\n" (as `grep -n` counts them, and the build page numbers them); the text of
    a line is its characters before its "\n" (and a "\r" before that), cut to
    SEARCH_LINE_MAX_CHARS. Matching is on the line with its ANSI escapes removed, lower-cased
    on both sides. Memory stays bounded however long a line is: of the current line only its
    first SEARCH_LINE_MAX_CHARS, the last `len(query) - 1` visible characters (a match may
    straddle two pieces) and a partial escape sequence are kept.
    """

    def __init__(self, query: str) -> None:
        self.needle = query.lower()
        self.number = 1
        self._reset()

    def _reset(self) -> None:
        self.head = ""
        self.overlap = ""
        self.escape = ""
        self.matched = False
        self.started = False

    def feed(self, text: str) -> Iterator[tuple[int, str]]:
        start = 0
        while (end := text.find("\n", start)) != -1:
            self._scan(text[start:end], line_ends=True)
            if self.matched:
                yield self.number, self.head.removesuffix("\r")
            self.number += 1
            self._reset()
            start = end + 1
        if start < len(text):
            self._scan(text[start:], line_ends=False)

    def finish(self) -> Iterator[tuple[int, str]]:
        """The last line, when the log does not end with a line break."""
        if self.started:
            self._scan("", line_ends=True)
            if self.matched:
                yield self.number, self.head.removesuffix("\r")

    def _scan(self, segment: str, *, line_ends: bool) -> None:
        self.started = True
        if len(self.head) < SEARCH_LINE_MAX_CHARS:
            self.head += segment[:SEARCH_LINE_MAX_CHARS - len(self.head)]
        if self.matched:
            return
        raw, self.escape = self.escape + segment, ""
        cut = None if line_ends else PARTIAL_ANSI.search(raw)
        if cut and len(raw) - cut.start() < PARTIAL_ANSI_MAX_CHARS:
            raw, self.escape = raw[:cut.start()], raw[cut.start():]
        window = self.overlap + ANSI_SEQUENCE.sub("", raw).lower()
        if self.needle in window:
            self.matched = True
        self.overlap = window[len(window) - len(self.needle) + 1:] if len(self.needle) > 1 else ""


def search_log(job: Job, query: str) -> Iterator[tuple[int, str] | None]:
    """The `(number, text)` of the job's lines containing `query`, read from the database piece by
    piece as they are asked for; None after each piece (where an answer may write what it has)."""
    matcher = LineMatcher(query)
    # The log is text, so pieces (whole chunks) are whole UTF-8; only a log that grew while it
    # was read can be cut inside a character, at the very end: replaced, not an error.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for piece in LogReader(job.pk, remaining=job.log_bytes):
        yield from matcher.feed(decoder.decode(piece))
        yield None
    yield from matcher.feed(decoder.decode(b"", final=True))
    yield from matcher.finish()


def log_search_body(job: Job, search: LogSearch) -> Iterator[bytes]:
    """The search's JSON answer, written as the log is read: one write per piece of the log with matches.

    The reading stops at the first match past `limit`, which is only looked for to make `truncated` true.
    """
    found = 0
    out = [b'{"data":[']
    for match in search_log(job, search.query):
        if match is None:
            if out:
                yield b"".join(out)
                out = []
            continue
        if found == search.limit:
            out.append(b'],"truncated":true}')
            yield b"".join(out)
            return
        number, text = match
        out.append((b"," if found else b"") + json.dumps({"line": number, "text": text}, ensure_ascii=False).encode())
        found += 1
    out.append(b'],"truncated":false}')
    yield b"".join(out)


def log_search_response(job: Job, search: LogSearch) -> StreamingHttpResponse:
    """200 with `{"data": [{"line", "text"}], "truncated"}`, streamed (see JobLogView.get)."""
    return StreamingHttpResponse(log_search_body(job, search), content_type="application/json")


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
