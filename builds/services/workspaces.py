"""Writes for the files a job leaves behind for its `builds_in` children."""

from __future__ import annotations

from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from builds.models import Job


def store_workspace(*, job: Job, archive: bytes) -> None:
    """Keep the job's workspace (a gzipped tarball); a re-upload replaces the stored file."""
    name = default_storage.save(f"workspaces/{job.pk}.tar.gz", ContentFile(archive))
    old = Job.objects.values_list("workspace_archive", flat=True).get(pk=job.pk)
    Job.objects.filter(pk=job.pk).update(workspace_archive=name)
    if old and old != name:
        default_storage.delete(old)
