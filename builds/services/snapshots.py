"""Writes for a job's filesystem snapshot: the image its `builds_in` children start from.

An agent with a container executor commits a passed parent's container and
uploads the image as its engine's `save` makes it (an uncompressed docker-archive
tarball), streamed: the body is counted as it is read, spooled to a temporary
file past the first megabyte, and stored under a name made of the job's id. A
child on another agent downloads it (`selectors.parent_snapshot`) and loads it.
The file goes with its job (builds.services.retention), like a workspace.
"""

from __future__ import annotations

import tempfile
from typing import IO

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.utils import timezone

from builds import states
from builds.models import Job
from builds.services.agents import touch_job
from harmont.errors import ApiError

READ_CHUNK = 256 * 1024
SPOOL_IN_MEMORY_BYTES = 1024 * 1024


def _too_large(size: int) -> ApiError:
    return ApiError("snapshot_too_large", f"The snapshot is more than {size - 1} bytes; a snapshot may be at most "
                                          f"{settings.SNAPSHOT_MAX_BYTES} bytes (HARMONT_SNAPSHOT_MAX_BYTES).")


def _not_live() -> ApiError:
    return ApiError("job_not_active", "The job is no longer running; its snapshot can't change.")


def store_snapshot(*, job: Job, content: IO[bytes], size: int | None = None) -> int:
    """Keep the job's filesystem snapshot read from `content` to its end; a re-upload replaces it. Its size.

    `size` is what the client announced (a Content-Length; None for a chunked
    body): over the limit, it is refused before a byte is read. Only while the
    job is live: once it ended, its children may already have started from
    what it left.
    """
    limit = settings.SNAPSHOT_MAX_BYTES
    if job.state not in states.LIVE_JOB_STATES:
        raise _not_live()
    if size is not None and size > limit:
        raise _too_large(size)
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES) as spool:
        read = 0
        while chunk := content.read(READ_CHUNK):
            read += len(chunk)
            if read > limit:
                raise _too_large(read)
            spool.write(chunk)
        if size is not None and read != size:
            raise ApiError("invalid_request", f"The upload ended after {read} of the {size} bytes its "
                                              "Content-Length announced.")
        if read == 0:
            raise ApiError("validation_failed", "Send the snapshot as a non-empty body.",
                           fields={"body": ["Send the snapshot (a `save` archive) as a non-empty body."]})
        spool.seek(0)
        name = default_storage.save(f"snapshots/{job.pk}.tar", File(spool, name="snapshot"))
    old = Job.objects.values_list("snapshot_image", flat=True).get(pk=job.pk)
    # Only if still live: the job may have ended while the body came in.
    if not Job.objects.filter(pk=job.pk, state__in=states.LIVE_JOB_STATES).update(snapshot_image=name):
        default_storage.delete(name)
        raise _not_live()
    if old and old != name:
        default_storage.delete(old)
    # An upload is a sign of life: a large snapshot takes a while, and the job sends nothing else meanwhile.
    touch_job(job=job, now=timezone.now())
    return read
