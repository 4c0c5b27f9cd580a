"""Writes for the files a job leaves behind for its `builds_in` children."""

from __future__ import annotations

from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from builds import states
from builds.models import Job
from harmont.errors import ApiError


def store_workspace(*, job: Job, archive: bytes) -> None:
    """Keep the job's workspace (a gzipped tarball); a re-upload replaces the stored file.

    Only while the job is live: once it ended, its children may already have
    started from what it left.
    """
    if job.state not in states.LIVE_JOB_STATES:
        raise ApiError("job_not_active", "The job is no longer running; its workspace can't change.")
    name = default_storage.save(f"workspaces/{job.pk}.tar.gz", ContentFile(archive))
    old = Job.objects.values_list("workspace_archive", flat=True).get(pk=job.pk)
    Job.objects.filter(pk=job.pk).update(workspace_archive=name)
    if old and old != name:
        default_storage.delete(old)
