"""A job's output on its way to the server: masked, numbered, shipped in order."""

from __future__ import annotations

import codecs
import io
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from builds.agent.spec import JobSpec
from builds.agent.transport import AgentError, Transport

log = logging.getLogger("harmont.agent")
STDOUT, STDERR, META = 0, 1, 2
MAX_CHUNK_CHARS = 64 * 1024
# Characters of content per log request. After the server was away, the backlog may be
# far larger than the route takes (HARMONT_MAX_REQUEST_BYTES, 64 MiB by default) once
# JSON-escaped (up to 12 bytes a character): it goes in requests of this size instead.
MAX_BATCH_CHARS = 2 * 1024 * 1024

REDACTED = "[REDACTED]"
# Shorter values are injected but not masked: replacing every "1" or "ok" in a log would
# destroy the output and, by the holes it leaves, tell the value anyway.
MIN_MASKED_LENGTH = 3


class SecretMasker:
    """Replaces secret values with [REDACTED] in one stream of output that arrives in pieces.

    A value may be split across two reads of a pipe, so the end of a piece that
    could be the start of a value (at most len(longest value) - 1 characters, and
    usually nothing) is held back and masked together with the next piece;
    `close()` releases it at the end of the output. Besides each value, each line
    of a multi-line value is masked (a key file printed line by line), all with
    surrounding whitespace stripped; longer values are replaced first.
    """

    def __init__(self, values: list[str]) -> None:
        candidates = {part.strip() for value in values for part in (value, *value.splitlines())}
        self.values = sorted((c for c in candidates if len(c) >= MIN_MASKED_LENGTH), key=lambda c: (-len(c), c))
        self.pattern = re.compile("|".join(map(re.escape, self.values))) if self.values else None
        self.tail = ""

    def feed(self, text: str) -> str:
        """The masked text that can be shipped now; a possible start of a value is kept for later."""
        if self.pattern is None:
            return text
        raw = self.tail + text
        cut = self._held_from(raw, 0)
        out: list[str] = []
        pos = 0
        for match in self.pattern.finditer(raw):
            if match.start() >= cut:
                break
            out += [raw[pos:match.start()], REDACTED]
            pos = match.end()
            if pos > cut:  # a whole value ran into the held part: keep back only what follows it
                cut = self._held_from(raw, pos)
        out.append(raw[pos:cut])
        self.tail = raw[cut:]
        return "".join(out)

    def close(self) -> str:
        """The output ended: what was held back, masked."""
        rest, self.tail = self.tail, ""
        return self.pattern.sub(REDACTED, rest) if self.pattern is not None and rest else rest

    def _held_from(self, raw: str, lo: int) -> int:
        """Where the longest suffix of raw[lo:] that is a proper prefix of some value starts (len(raw): none)."""
        end = len(raw)
        start = end
        for value in self.values:
            # Only lengths that would hold back more than already found; the first
            # character is compared before the whole prefix.
            for length in range(min(len(value) - 1, end - lo), end - start, -1):
                if raw[end - length] == value[0] and raw.endswith(value[:length]):
                    start = end - length
                    break
        return start


@dataclass
class LogShipper:
    """Masks secrets in output, numbers the chunks and ships them in order; a failed batch is re-sent as it was.

    Once the server says the job has ended (409 `job_finished`: the reaper gave up on
    this agent, the build timed out), the log is closed: nothing more is kept or sent,
    and the command is asked to stop, as for a cancel.
    """

    transport: Transport
    job: JobSpec
    seq: int = 0
    pending: list[dict[str, Any]] = field(default_factory=list)
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    timeout_requested: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    maskers: dict[int, SecretMasker] = field(default_factory=dict)  # one per stream kind
    ended: threading.Event = field(default_factory=threading.Event)  # the server ended the job
    # Called before each shipment: a held-back start goes first (builds/agent/starts.py).
    before_send: Callable[[], None] | None = None

    def add(self, stream_kind: int, text: str) -> None:
        if not text:
            return
        text = clean_text(text)  # before masking: a secret value holds no NUL (the environment can't)
        with self.lock:
            masker = self.maskers.get(stream_kind)
            if masker is None:
                masker = self.maskers[stream_kind] = SecretMasker(self.job.mask)
            self._number(stream_kind, masker.feed(text))

    def close(self) -> None:
        """The output is over: release what the maskers held back (masked) as the last chunks."""
        with self.lock:
            for stream_kind, masker in sorted(self.maskers.items()):
                self._number(stream_kind, masker.close())

    def _number(self, stream_kind: int, text: str) -> None:
        # Called with the lock held, with text already masked.
        if self.ended.is_set():
            return
        for start in range(0, len(text), MAX_CHUNK_CHARS):
            self.seq += 1
            self.pending.append({"seq": self.seq, "stream_kind": stream_kind,
                                 "content": text[start:start + MAX_CHUNK_CHARS], "ts": time.time_ns()})

    def flush(self) -> None:
        """Send what is pending now, in order, in requests of at most MAX_BATCH_CHARS of content.

        Output that arrives meanwhile waits for the next flush, so a command that
        prints faster than the server takes it can't keep the caller here.
        """
        with self.lock:
            last = self.pending[-1]["seq"] if self.pending else 0
        while True:
            with self.lock:
                batch = self._batch(up_to=last)
            if not batch or not self._send(batch):
                return

    def _batch(self, *, up_to: int) -> list[dict[str, Any]]:
        # Called with the lock held: the oldest pending chunks, at least one, within the budget.
        batch: list[dict[str, Any]] = []
        size = 0
        for chunk in self.pending:
            if chunk["seq"] > up_to or (batch and size + len(chunk["content"]) > MAX_BATCH_CHARS):
                break
            batch.append(chunk)
            size += len(chunk["content"])
        return batch

    def _send(self, batch: list[dict[str, Any]]) -> bool:
        """Ship one batch; False once the server has ended the job (nothing more is sent)."""
        if self.before_send is not None:
            self.before_send()
        try:
            answer = self.transport.json("POST", f"/api/v0/agent/jobs/{self.job.id}/logs", token=self.job.token,
                                         body={"chunks": batch})
        except AgentError as exc:
            if exc.status != 409 or error_code(exc.body) != "job_finished":
                raise
            log.warning("job %s has ended on the server; its further output is dropped", self.job.id)
            with self.lock:
                self.ended.set()
                self.pending = []
            self.cancel_requested.set()
            return False
        with self.lock:
            sent = {chunk["seq"] for chunk in batch}
            self.pending = [chunk for chunk in self.pending if chunk["seq"] not in sent]
        if answer and answer.get("cancel"):
            self.cancel_requested.set()
        if answer and answer.get("timeout"):
            self.timeout_requested.set()
        return True


def clean_text(text: str) -> str:
    """`text` with each NUL replaced by U+FFFD, as a bad byte of UTF-8 is: the server's database can't store NUL
    in text (PostgreSQL refuses it), so the log route refuses it, and the rest of the output would be lost."""
    return text.replace("\x00", "\ufffd")


def error_code(body: Any) -> str | None:
    """The `code` of an error envelope (None for any other body)."""
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("code") if isinstance(error, dict) else None


def pump(stream: io.BufferedReader, kind: int, shipper: LogShipper) -> None:
    """Read a pipe as it fills and hand decoded text to the shipper (UTF-8, bad bytes replaced)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while True:
        data = stream.read1(65536)
        if not data:
            shipper.add(kind, decoder.decode(b"", final=True))
            return
        shipper.add(kind, decoder.decode(data))
