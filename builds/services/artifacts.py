"""Artifacts: the files a job leaves under `$HARMONT_ARTIFACTS`, uploaded by its agent.

The bytes go through Django's default storage (local files, or an S3-compatible
bucket; see the README), under a name made of ids only. The job's own path is
user data and is kept on the row, never used as a storage name.

Artifacts are immutable: the first upload of a (job, path) wins. A retried
upload of the same bytes returns the stored row (the agent may not have seen
the first answer); different bytes for the same path are refused (409), so a
download URL always serves what it served before.
"""

from __future__ import annotations

import hashlib
import io
import mimetypes
import re
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import IO

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.db.models import Sum
from django.utils import timezone

from builds import states
from builds.models import Artifact, Job
from builds.services import test_results
from builds.services.agents import touch_job
from harmont.errors import ApiError

MAX_PATH_CHARS = 1000
READ_CHUNK = 64 * 1024
# Bodies up to this size are spooled in memory on their way to storage; larger ones to a temporary file.
SPOOL_IN_MEMORY_BYTES = 1024 * 1024
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
# What `mimetypes` reports as an encoding is the file's type when it is served as is
# (a .tar.gz is a gzip file, not a tar file with Content-Encoding: gzip).
ENCODING_TYPES = {"gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz",
                  "compress": "application/x-compress", "br": "application/x-brotli"}


@dataclass(frozen=True)
class StoredArtifact:
    artifact: Artifact
    created: bool  # False: the same bytes were already stored at this path (a retried upload)


def normalise_path(raw: str) -> str:
    """The artifact path as stored: relative, `/`-separated, no empty or `.` segments.

    Raises `artifact_path_invalid` for an absolute path, a `..` segment, a NUL or
    other control character, an empty path, or one longer than 1000 characters.
    """
    def invalid(reason: str) -> ApiError:
        return ApiError("artifact_path_invalid", f"Invalid artifact path {raw[:200]!r}: {reason}.",
                        fields={"path": [reason]})

    if not raw:
        raise invalid("the path is empty")
    if CONTROL_CHARACTERS.search(raw):
        raise invalid("the path contains a NUL or another control character")
    if raw.startswith("/"):
        raise invalid("the path is absolute; send it relative to $HARMONT_ARTIFACTS")
    segments = [segment for segment in raw.split("/") if segment not in ("", ".")]
    if ".." in segments:
        raise invalid("the path contains a `..` segment")
    if not segments:
        raise invalid("the path names no file")
    path = "/".join(segments)
    if len(path) > MAX_PATH_CHARS:
        raise invalid(f"the path is longer than {MAX_PATH_CHARS} characters")
    return path


def guess_mime_type(path: str) -> str:
    """The MIME type a download is served with, from the file's name (compressed files as their archive type)."""
    mime_type, encoding = mimetypes.guess_type(path, strict=False)
    if encoding:
        return ENCODING_TYPES.get(encoding, "application/octet-stream")
    return mime_type or "application/octet-stream"


def build_artifact_bytes(build_id: uuid.UUID) -> int:
    """Bytes the build's artifacts take so far (checked against the per-build limit)."""
    return Artifact.objects.filter(build_id=build_id).aggregate(total=Sum("size"))["total"] or 0


def _too_large(size: int) -> ApiError:
    limit = settings.ARTIFACT_MAX_BYTES
    return ApiError("artifact_too_large", f"The artifact is {size} bytes; one artifact may be at most {limit} bytes.")


def _over_quota(used: int, size: int) -> ApiError:
    limit = settings.BUILD_ARTIFACTS_MAX_BYTES
    return ApiError("build_artifacts_quota_exceeded",
                    f"The build's artifacts already take {used} bytes; {size} more would exceed the build's "
                    f"limit of {limit} bytes.")


def _not_live() -> ApiError:
    return ApiError("job_not_active", "The job is no longer running; it can't store artifacts.")


def _conflict(existing: Artifact) -> ApiError:
    return ApiError("artifact_exists", f"The job already stored {existing.path!r} with different content "
                                       f"({existing.size} bytes, sha256 {existing.sha256}).")


def _same_or_conflict(existing: Artifact, *, size: int, sha256: str) -> StoredArtifact:
    if existing.size == size and existing.sha256 == sha256:
        return StoredArtifact(existing, created=False)
    raise _conflict(existing)


def _spool(content: IO[bytes], *, declared: int | None) -> tuple[IO[bytes], int, str]:
    """Copy the body to a spool file, hashing and counting; stop as soon as it is over the limit."""
    limit = settings.ARTIFACT_MAX_BYTES
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES)
    digest = hashlib.sha256()
    size = 0
    try:
        while True:
            chunk = content.read(READ_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise _too_large(size if declared is None else max(size, declared))
            digest.update(chunk)
            spool.write(chunk)
        if declared is not None and size != declared:
            raise ApiError("invalid_request", f"The upload ended after {size} of the {declared} bytes its "
                                              "Content-Length announced.")
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool, size, digest.hexdigest()


def store_artifact(*, job: Job, path: str, content: bytes | IO[bytes], size: int | None = None,
                   sha256: str | None = None, now: datetime | None = None) -> StoredArtifact:
    """Store one file a job left under `$HARMONT_ARTIFACTS`.

    `content` is the bytes, or a stream read to its end (a request body is read
    in chunks and spooled, never held whole in memory). `size` is what the
    client announced (its Content-Length): an announced size over a limit is
    refused before a byte is read. Size and SHA-256 are computed here; a
    client's `sha256` is only checked against them.

    Only a live job (assigned, running, canceling, timing out) stores artifacts.
    The per-build limit is enforced under the build's row lock (`lock_build`),
    which every writer of the build's artifacts takes, so concurrent uploads of
    one build can't together pass it. The bytes are written to storage before
    that lock is taken, so a slow storage never holds it; a refused upload's
    bytes are deleted again.
    """
    now = now or timezone.now()
    path = normalise_path(path)
    if sha256 is not None:
        sha256 = sha256.lower()
        if not SHA256_HEX.fullmatch(sha256):
            raise ApiError("validation_failed", "sha256 must be 64 hexadecimal digits.",
                           fields={"sha256": ["Must be 64 hexadecimal digits."]})
    if isinstance(content, bytes):
        size = len(content) if size is None else size
        content = io.BytesIO(content)
    if job.state not in states.LIVE_JOB_STATES:
        raise _not_live()
    # Cheap refusals first, before reading the body: the announced size over either limit,
    # or a retry of an upload already stored (when the client named its checksum).
    if size is not None:
        if size > settings.ARTIFACT_MAX_BYTES:
            raise _too_large(size)
        existing = Artifact.objects.filter(job_id=job.pk, path=path).first()
        if existing is not None:
            if existing.size != size:
                raise _conflict(existing)
            if sha256 is not None:
                return _same_or_conflict(existing, size=size, sha256=sha256)
        else:
            used = build_artifact_bytes(job.build_id)
            if used + size > settings.BUILD_ARTIFACTS_MAX_BYTES:
                raise _over_quota(used, size)

    spool, size, digest = _spool(content, declared=size)
    with spool:
        if sha256 is not None and sha256 != digest:
            raise ApiError("artifact_checksum_mismatch", f"The upload's SHA-256 is {digest}, not {sha256}.",
                           fields={"sha256": [f"The uploaded bytes hash to {digest}."]})
        existing = Artifact.objects.filter(job_id=job.pk, path=path).first()
        if existing is not None:  # a retry: nothing to write
            return _same_or_conflict(existing, size=size, sha256=digest)
        artifact = Artifact(id=uuid.uuid4(), build_id=job.build_id, job_id=job.pk, path=path, size=size,
                            sha256=digest, mime_type=guess_mime_type(path), created_at=now)
        artifact.file.save(artifact.path.rsplit("/", 1)[-1], File(spool, name="artifact"), save=False)
    stored_name = artifact.file.name
    try:
        with transaction.atomic():
            states.lock_build(job.build_id)
            # Re-read under the lock: the job may have ended, or a racing retry stored the path.
            if not Job.objects.filter(pk=job.pk, state__in=states.LIVE_JOB_STATES).exists():
                raise _not_live()
            existing = Artifact.objects.filter(job_id=job.pk, path=path).first()
            if existing is not None:
                result = _same_or_conflict(existing, size=size, sha256=digest)
            else:
                used = build_artifact_bytes(job.build_id)
                if used + size > settings.BUILD_ARTIFACTS_MAX_BYTES:
                    raise _over_quota(used, size)
                artifact.save(force_insert=True)
                result = StoredArtifact(artifact, created=True)
    except (ApiError, IntegrityError):
        default_storage.delete(stored_name)
        raise
    if not result.created:
        default_storage.delete(stored_name)
    else:
        test_results.queue_report(artifact=result.artifact)  # a JUnit report: parsed once this upload committed
    # An upload is a sign of life: a job with many large artifacts sends no heartbeats meanwhile.
    touch_job(job=job, now=timezone.now())
    return result
