"""Writes for job output: storing log chunks once each, within the per-job log limit."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from builds import sql, states
from builds.models import Job, LogChunk, StreamKind
from builds.services.agents import agent_seen_by
from harmont import metrics
from harmont.errors import ApiError


@dataclass(frozen=True)
class ChunkIn:
    seq: int
    stream_kind: int
    content: str
    ts: int  # Unix nanoseconds

    def __post_init__(self) -> None:
        if type(self.ts) is not int:  # a datetime would be stored as text by SQLite and refused by PostgreSQL
            raise TypeError(f"ChunkIn.ts is Unix nanoseconds (int), not {type(self.ts).__name__}")


def append_log(*, job: Job, chunks: Sequence[ChunkIn], now: datetime | None = None, alive: bool = True) -> int:
    """Store the chunks not stored yet; returns how many were new.

    The job's row lock serialises appends to one job, so a retried batch racing
    its original is stored once and counted once against the log limit. Past
    the limit output is dropped and a single meta chunk says so; the job goes on.
    `alive`: the batch is also a sign of life (a heartbeat) from the job's agent.
    A job that has ended takes no more output: 409 `job_finished`.
    """
    now = now or timezone.now()
    if job.state in states.TERMINAL_JOB_STATES:
        # The state as the credential's lookup read it: a job that ended takes no more output,
        # whoever still holds its credential (which lives on briefly for finish retries).
        raise ApiError("job_finished", f"Job {job.pk} already {job.state}; its log takes no more output.")
    if not chunks:
        return 0
    with transaction.atomic():
        stored, log = store_chunks(job.pk, chunks, now)
        if alive:
            log["last_heartbeat_at"] = now
        if log:
            states.update_job_columns(job.pk, log)
    if alive:
        agent_seen_by(job=job, now=now)
    return stored


def _batch(chunks: Sequence[ChunkIn]) -> tuple[list[ChunkIn], dict[int, int]]:
    """The chunks by seq (a seq named twice in one batch: its last copy counts) and their sizes in bytes."""
    batch = sorted({c.seq: c for c in chunks}.values(), key=lambda c: c.seq)
    return batch, {chunk.seq: len(chunk.content.encode()) for chunk in batch}


def _rows(chunks: Sequence[ChunkIn]) -> list[tuple[int, int, str, int]]:
    return [(chunk.seq, chunk.stream_kind, chunk.content, chunk.ts) for chunk in chunks]


def store_fitting_chunks(job: Job, chunks: Sequence[ChunkIn], now: datetime) -> dict[str, Any] | None:
    """Store the chunks not stored yet without the job's row lock, if all of them fit under the log limit.

    Judged from the log's size as `job` was loaded (for an agent's request: as
    its credential was checked); None when the batch might reach the limit,
    for `store_chunks` to store under the lock. Returns the job's log columns
    to write with them ({} when nothing new was stored).
    """
    if job.log_truncated:
        return {}  # output past the limit is dropped
    batch, sizes = _batch(chunks)
    if job.log_bytes + sum(sizes.values()) > settings.JOB_LOG_LIMIT_BYTES:
        return None
    new = sql.insert_chunks(job.pk, _rows(batch), now)
    added = sum(sizes[seq] for seq in new)
    # Added, not set: without the row lock, another batch may be counted meanwhile.
    return {"log_bytes": sql.Add(added)} if added else {}


def store_chunks(job_id: uuid.UUID, chunks: Sequence[ChunkIn], now: datetime) -> tuple[int, dict[str, Any]]:
    """Store the chunks not stored yet (the caller's transaction); takes the job's row lock.

    Returns how many were new and the job's log columns to write with them
    ({} when nothing was stored).
    """
    limit = settings.JOB_LOG_LIMIT_BYTES
    batch, sizes = _batch(chunks)
    # NO KEY UPDATE (PostgreSQL): a finish inserting its last chunks before it takes its
    # build's lock holds a key-share lock on the job's row; it must not queue behind this.
    log_bytes, truncated = (Job.objects.select_for_update(no_key=True).filter(pk=job_id)
                            .values_list("log_bytes", "log_truncated").get())
    if truncated:
        return 0, {}  # output past the limit is dropped
    if log_bytes + sum(sizes.values()) <= limit:
        # The whole batch fits, whichever of its chunks are stored already: no need to
        # know which are new before inserting. The (job, seq) constraint skips the
        # stored ones and the insert names the rest.
        new = sql.insert_chunks(job_id, _rows(batch), now)
        stored = [chunk.content for chunk in batch if chunk.seq in new]
    else:
        # Near the limit, which chunks are new decides where the log is cut.
        seen = set(LogChunk.objects.filter(job_id=job_id, seq__in=list(sizes)).values_list("seq", flat=True))
        rows: list[tuple[int, int, str, int]] = []
        added = 0
        for chunk in batch:
            if chunk.seq in seen:
                continue
            if log_bytes + added + sizes[chunk.seq] > limit:
                truncated = True
                notice = f"[harmont] log limit of {limit} bytes reached; further output of this job is not stored\n"
                rows.append((chunk.seq, StreamKind.META, notice, chunk.ts))
                break
            added += sizes[chunk.seq]
            rows.append((chunk.seq, chunk.stream_kind, chunk.content, chunk.ts))
        new = sql.insert_chunks(job_id, rows, now)
        stored = [content for seq, _, content, _ in rows if seq in new]
    if not stored:
        return 0, {}
    # log_bytes stays the exact size of what is stored (the raw log's Content-Length);
    # the row lock makes the sum exact.
    added = sum(len(content.encode()) for content in stored)
    metrics.LOG_BYTES.inc(added)
    metrics.LOG_CHUNKS.inc(len(stored))
    columns: dict[str, Any] = {"log_bytes": log_bytes + added}
    if truncated:
        columns["log_truncated"] = True
    return len(stored), columns
