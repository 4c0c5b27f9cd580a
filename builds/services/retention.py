"""Retention: deleting old builds with everything they stored, and stored files no row names.

A build's files are its uploaded source (`Build.source_archive`), its jobs'
workspaces (`Job.workspace_archive`) and filesystem snapshots (`Job.snapshot_image`)
and its artifacts (`Artifact.file`), all in
Django's default storage. Whatever deletes those rows (this module, the admin,
the API, a cascade from a pipeline or an organization) deletes their files
through the `post_delete` handlers below, after the transaction commits: a
delete that rolls back keeps its files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.core.files.storage import default_storage
from django.db import models, transaction
from django.db.models.signals import post_delete
from django.utils import timezone

from builds.models import Artifact, Build, Job, LogChunk
from builds.states import TERMINAL_BUILD_STATES

# Builds deleted per transaction: the delete loads the batch's jobs and artifacts (to find their
# files), so this bounds the memory and the time rows stay locked.
PRUNE_BATCH_BUILDS = 50
# Stored names checked against the database per query.
ORPHAN_BATCH_NAMES = 500
# The prefixes under which rows name files (see Build, Job and Artifact).
STORED_PREFIXES = ("sources", "workspaces", "snapshots", "artifacts")
# A file younger than this may belong to a row not committed yet (an artifact's bytes are
# stored before its row is inserted, a source before its build), so --orphans leaves it.
ORPHAN_GRACE = timedelta(hours=1)


def _delete_file_on_commit(name: str) -> None:
    if name:
        transaction.on_commit(lambda: default_storage.delete(name))


def _build_deleted(sender: type[Build], instance: Build, **kwargs: Any) -> None:
    name = instance.source_archive.name or ""
    if name:
        # A rebuild shares its original's upload: the file goes with the last build naming it,
        # decided after the commit, when every build deleted with this one is gone too.
        transaction.on_commit(lambda: None if Build.objects.filter(source_archive=name).exists()
                              else default_storage.delete(name))


def _job_deleted(sender: type[Job], instance: Job, **kwargs: Any) -> None:
    _delete_file_on_commit(instance.workspace_archive.name or "")
    _delete_file_on_commit(instance.snapshot_image.name or "")


def _artifact_deleted(sender: type[Artifact], instance: Artifact, **kwargs: Any) -> None:
    _delete_file_on_commit(instance.file.name or "")


def connect_file_cleanup() -> None:
    """Called from BuildsConfig.ready. A signal, not a service, because cascades delete these rows too."""
    post_delete.connect(_build_deleted, sender=Build, dispatch_uid="harmont.build_files")
    post_delete.connect(_job_deleted, sender=Job, dispatch_uid="harmont.job_files")
    post_delete.connect(_artifact_deleted, sender=Artifact, dispatch_uid="harmont.artifact_files")


@dataclass
class PruneReport:
    builds: int = 0
    jobs: int = 0
    log_chunks: int = 0
    artifacts: int = 0
    files: int = 0


def _prunable(*, cutoff: datetime, keep_last: int) -> Iterator[list[Any]]:
    """Batches of ids of finished builds created before `cutoff`, sparing each pipeline's newest `keep_last`."""
    old = Build.objects.filter(created_at__lt=cutoff, state__in=TERMINAL_BUILD_STATES)
    pipeline_ids = old.order_by().values_list("pipeline_id", flat=True).distinct()
    for pipeline_id in list(pipeline_ids):
        candidates = old.filter(pipeline_id=pipeline_id)
        if keep_last:
            # The newest `keep_last` of the pipeline's builds, whatever their age or state, stay.
            kept = (Build.objects.filter(pipeline_id=pipeline_id).order_by("-number")
                    .values_list("number", flat=True)[keep_last - 1:keep_last])
            threshold = next(iter(kept), None)
            if threshold is None:
                continue  # the pipeline has no more than `keep_last` builds
            candidates = candidates.filter(number__lt=threshold)
        last_number = -1
        while True:
            batch = list(candidates.filter(number__gt=last_number).order_by("number")
                         .values_list("pk", "number")[:PRUNE_BATCH_BUILDS])
            if not batch:
                break
            last_number = batch[-1][1]
            yield [pk for pk, _ in batch]


def _count(build_ids: list[Any], report: PruneReport) -> None:
    report.builds += len(build_ids)
    report.jobs += Job.objects.filter(build_id__in=build_ids).count()
    report.log_chunks += LogChunk.objects.filter(job__build_id__in=build_ids).count()
    report.artifacts += Artifact.objects.filter(build_id__in=build_ids).count()
    report.files += (
        Build.objects.filter(pk__in=build_ids).exclude(source_archive="").exclude(source_archive=None).count()
        + Job.objects.filter(build_id__in=build_ids).exclude(workspace_archive="")
        .exclude(workspace_archive=None).count()
        + Job.objects.filter(build_id__in=build_ids).exclude(snapshot_image="").exclude(snapshot_image=None).count()
        + Artifact.objects.filter(build_id__in=build_ids).count()
    )


def prune_builds(*, older_than_days: int, keep_last: int = 0, dry_run: bool = False,
                 now: datetime | None = None) -> PruneReport:
    """Delete finished builds created more than `older_than_days` ago, with their rows and files.

    Builds that have not finished (held, scheduled, running) are never deleted,
    however old: an agent may still be working on them; cancel them first.
    Each batch is its own transaction; its builds are locked and re-checked as
    finished first, so a build re-run meanwhile is left alone. `dry_run`
    counts what would go and deletes nothing.
    """
    now = now or timezone.now()
    cutoff = now - timedelta(days=older_than_days)
    report = PruneReport()
    for build_ids in _prunable(cutoff=cutoff, keep_last=keep_last):
        with transaction.atomic():
            locked = list(Build.objects.select_for_update().filter(pk__in=build_ids, state__in=TERMINAL_BUILD_STATES)
                          .values_list("pk", flat=True))
            if not locked:
                continue
            _count(locked, report)
            if not dry_run:
                Build.objects.filter(pk__in=locked).delete()
    return report


def _walk(directory: str) -> Iterator[str]:
    """Every file name under `directory`, through `listdir` so that any storage backend works."""
    try:
        directories, files = default_storage.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in files:
        yield f"{directory}/{name}"
    for name in directories:
        yield from _walk(f"{directory}/{name}")


def _named(names: list[str]) -> set[str]:
    """The names among `names` that a row refers to."""
    lookups: list[tuple[type[models.Model], str]] = [
        (Build, "source_archive"), (Job, "workspace_archive"), (Job, "snapshot_image"), (Artifact, "file")]
    named: set[str] = set()
    for model, field_name in lookups:
        named.update(model._default_manager.filter(**{f"{field_name}__in": names})
                     .values_list(field_name, flat=True))
    return named


def _old_enough(name: str, cutoff: datetime) -> bool:
    try:
        modified = default_storage.get_modified_time(name)
    except NotImplementedError:
        return True  # a backend that can't tell: the grace period can't apply
    except FileNotFoundError:
        return False  # deleted meanwhile
    if timezone.is_naive(modified):
        modified = timezone.make_aware(modified)
    return modified < cutoff


@dataclass
class OrphanReport:
    files: int = 0


def prune_orphans(*, dry_run: bool = False, now: datetime | None = None,
                  on_file: Callable[[str], None] | None = None) -> OrphanReport:
    """Delete stored files under sources/, workspaces/, snapshots/ and artifacts/ that no row names.

    Files younger than ORPHAN_GRACE are kept: their row may be about to be
    committed. Names are checked against the database in batches, so the
    listing is never held whole.
    """
    cutoff = (now or timezone.now()) - ORPHAN_GRACE
    report = OrphanReport()

    def sweep(batch: list[str]) -> None:
        named = _named(batch)
        for name in batch:
            if name in named or not _old_enough(name, cutoff):
                continue
            if not dry_run:
                default_storage.delete(name)
            report.files += 1
            if on_file is not None:
                on_file(name)

    for prefix in STORED_PREFIXES:
        batch: list[str] = []
        for name in _walk(prefix):
            batch.append(name)
            if len(batch) >= ORPHAN_BATCH_NAMES:
                sweep(batch)
                batch = []
        if batch:
            sweep(batch)
    return report
