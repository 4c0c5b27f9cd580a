"""Retention: `prune` deletes old finished builds with their rows and stored files, and stored
files no row names; deleting a build or an artifact anywhere (admin, cascade) deletes its files,
only once the transaction commits. Each runs against files on disk and against Django's
InMemoryStorage, so nothing depends on one backend."""

from __future__ import annotations

import uuid
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.management import CommandError, call_command
from django.db import transaction
from django.test import Client
from django.utils import timezone

from builds.models import Artifact, Build, BuildState, Job, JobDependency, LogChunk
from builds.services import retention
from organizations.models import Organization, User
from pipelines.models import Pipeline
from tests.helpers import build_at

pytestmark = pytest.mark.django_db

NOW = timezone.now()


@pytest.fixture(params=["filesystem", "memory"], autouse=True)
def storage(request: Any, settings: Any, tmp_path: Any) -> str:
    if request.param == "filesystem":
        settings.MEDIA_ROOT = tmp_path / "media"
    else:
        settings.STORAGES = {**settings.STORAGES,
                             "default": {"BACKEND": "django.core.files.storage.InMemoryStorage"}}
    return request.param


def stored_build(pipeline: Pipeline, *, days_old: float, state: str = BuildState.PASSED) -> Build:
    """A build of `days_old` days with a source, a workspace, an artifact and a log chunk stored."""
    build = build_at(pipeline, NOW - timedelta(days=days_old))
    source = default_storage.save(f"sources/{build.pk}.tar.gz", ContentFile(b"source"))
    Build.objects.filter(pk=build.pk).update(source_archive=source, state=state)
    job = build.jobs.order_by("position").first()
    workspace = default_storage.save(f"workspaces/{job.pk}.tar.gz", ContentFile(b"workspace"))
    Job.objects.filter(pk=job.pk).update(workspace_archive=workspace)
    LogChunk.objects.create(job=job, seq=0, stream_kind=0, content="hello\n", ts=1)
    artifact = Artifact(id=uuid.uuid4(), build=build, job=job, path="out/report.txt", size=8, sha256="0" * 64,
                        mime_type="text/plain")
    artifact.file.save("report.txt", ContentFile(b"artifact"), save=True)
    build.refresh_from_db()
    return build


def files_of(build: Build) -> list[str]:
    names = [build.source_archive.name]
    names += [name for name in Job.objects.filter(build=build).values_list("workspace_archive", flat=True) if name]
    names += list(Artifact.objects.filter(build=build).values_list("file", flat=True))
    return names


def prune(*args: str) -> str:
    out = StringIO()
    call_command("prune", *args, stdout=out)
    return out.getvalue()


def test_prune_deletes_old_finished_builds_with_their_rows_and_files(pipeline, django_capture_on_commit_callbacks):
    old = stored_build(pipeline, days_old=40)
    recent = stored_build(pipeline, days_old=2)
    old_files, recent_files = files_of(old), files_of(recent)
    assert len(old_files) == 3 and all(default_storage.exists(name) for name in old_files)

    with django_capture_on_commit_callbacks(execute=True):
        out = prune("--builds-older-than", "30")

    assert "Deleted 1 build(s), 2 job(s), 1 log chunk(s), 1 artifact(s), 3 stored file(s)." in out
    assert not Build.objects.filter(pk=old.pk).exists()
    assert not Job.objects.filter(build_id=old.pk).exists()
    assert not LogChunk.objects.filter(job__build_id=old.pk).exists()
    assert not Artifact.objects.filter(build_id=old.pk).exists()
    assert not JobDependency.objects.filter(job__build_id=old.pk).exists()
    assert not any(default_storage.exists(name) for name in old_files)
    assert Build.objects.filter(pk=recent.pk).exists()
    assert all(default_storage.exists(name) for name in recent_files)


@pytest.mark.parametrize("state", [BuildState.HELD, BuildState.SCHEDULED, BuildState.RUNNING])
def test_prune_never_deletes_a_build_that_has_not_finished(pipeline, state, django_capture_on_commit_callbacks):
    live = stored_build(pipeline, days_old=400, state=state)
    with django_capture_on_commit_callbacks(execute=True):
        out = prune("--builds-older-than", "1")
    assert "Deleted 0 build(s)" in out
    assert Build.objects.filter(pk=live.pk).exists()
    assert all(default_storage.exists(name) for name in files_of(live))


def test_prune_keep_last_spares_each_pipelines_newest_builds(pipeline, django_capture_on_commit_callbacks):
    second = Pipeline.objects.create(organization=pipeline.organization, slug="second", name="second",
                                     definition=pipeline.definition)
    builds = [stored_build(pipeline, days_old=100 - i) for i in range(5)]
    lone = stored_build(second, days_old=100)
    with django_capture_on_commit_callbacks(execute=True):
        prune("--builds-older-than", "30", "--keep-last", "2")
    remaining = set(Build.objects.values_list("pk", flat=True))
    assert remaining == {builds[3].pk, builds[4].pk, lone.pk}


def test_prune_dry_run_counts_and_deletes_nothing(pipeline, django_capture_on_commit_callbacks):
    old = stored_build(pipeline, days_old=40)
    with django_capture_on_commit_callbacks(execute=True):
        out = prune("--builds-older-than", "30", "--dry-run")
    assert "Would delete 1 build(s), 2 job(s), 1 log chunk(s), 1 artifact(s), 3 stored file(s)." in out
    assert Build.objects.filter(pk=old.pk).exists()
    assert all(default_storage.exists(name) for name in files_of(old))


def test_prune_deletes_in_batches_of_bounded_size(pipeline, monkeypatch, django_capture_on_commit_callbacks):
    monkeypatch.setattr(retention, "PRUNE_BATCH_BUILDS", 2)
    deleted_batches: list[int] = []
    real_count = retention._count

    def counting(build_ids: list[Any], report: retention.PruneReport) -> None:
        deleted_batches.append(len(build_ids))
        real_count(build_ids, report)

    monkeypatch.setattr(retention, "_count", counting)
    old = [stored_build(pipeline, days_old=40) for _ in range(5)]
    with django_capture_on_commit_callbacks(execute=True):
        report = retention.prune_builds(older_than_days=30)
    assert deleted_batches == [2, 2, 1]
    assert report.builds == 5 and not Build.objects.filter(pk__in=[b.pk for b in old]).exists()


def test_prune_without_what_to_prune_is_an_error() -> None:
    with pytest.raises(CommandError, match="--builds-older-than"):
        prune()
    with pytest.raises(CommandError, match="0 or more"):
        prune("--builds-older-than", "-1")
    with pytest.raises(CommandError, match="--keep-last goes with"):
        prune("--orphans", "--keep-last", "3")


def test_deleting_a_pipeline_deletes_its_builds_files(pipeline, django_capture_on_commit_callbacks):
    build = stored_build(pipeline, days_old=1)
    names = files_of(build)
    with django_capture_on_commit_callbacks(execute=True):
        pipeline.delete()
    assert not any(default_storage.exists(name) for name in names)


def test_deleting_an_organization_deletes_its_builds_files(org, pipeline, django_capture_on_commit_callbacks):
    build = stored_build(pipeline, days_old=1)
    names = files_of(build)
    with django_capture_on_commit_callbacks(execute=True):
        Organization.objects.filter(pk=org.pk).delete()
    assert not any(default_storage.exists(name) for name in names)


def test_deleting_an_artifact_deletes_its_file_only(pipeline, django_capture_on_commit_callbacks):
    build = stored_build(pipeline, days_old=1)
    artifact = Artifact.objects.get(build=build)
    name = artifact.file.name
    with django_capture_on_commit_callbacks(execute=True):
        artifact.delete()
    assert not default_storage.exists(name)
    assert default_storage.exists(build.source_archive.name)


def test_a_delete_that_rolls_back_keeps_the_files(pipeline, django_capture_on_commit_callbacks):
    build = stored_build(pipeline, days_old=1)
    names = files_of(build)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        with pytest.raises(RuntimeError):
            with transaction.atomic():
                Build.objects.filter(pk=build.pk).delete()
                raise RuntimeError("rolled back")
    assert callbacks == []
    assert Build.objects.filter(pk=build.pk).exists()
    assert all(default_storage.exists(name) for name in names)


def test_admin_delete_of_a_build_deletes_its_files(pipeline, django_capture_on_commit_callbacks):
    build = stored_build(pipeline, days_old=1)
    names = files_of(build)
    ops = Client()
    ops.force_login(User.objects.create_superuser("ops@example.com", "a-long-passphrase"))
    with django_capture_on_commit_callbacks(execute=True):
        response = ops.post(f"/admin/builds/build/{build.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not Build.objects.filter(pk=build.pk).exists()
    assert not any(default_storage.exists(name) for name in names)


def test_admin_bulk_delete_of_artifacts_deletes_their_files(pipeline, django_capture_on_commit_callbacks):
    build = stored_build(pipeline, days_old=1)
    artifact = Artifact.objects.get(build=build)
    ops = Client()
    ops.force_login(User.objects.create_superuser("ops@example.com", "a-long-passphrase"))
    with django_capture_on_commit_callbacks(execute=True):
        response = ops.post("/admin/builds/artifact/", {"action": "delete_selected", "post": "yes",
                                                        "_selected_action": [str(artifact.pk)]})
    assert response.status_code == 302
    assert not default_storage.exists(artifact.file.name)


def test_prune_orphans_deletes_only_old_files_no_row_names(pipeline, django_capture_on_commit_callbacks):
    build = stored_build(pipeline, days_old=1)
    kept = files_of(build)
    orphans = [default_storage.save(f"sources/{uuid.uuid4()}.tar.gz", ContentFile(b"x")),
               default_storage.save(f"workspaces/{uuid.uuid4()}.tar.gz", ContentFile(b"x")),
               default_storage.save(f"artifacts/{build.pk}/{uuid.uuid4()}", ContentFile(b"x")),
               default_storage.save(f"artifacts/{uuid.uuid4()}/{uuid.uuid4()}", ContentFile(b"x"))]
    elsewhere = default_storage.save("other/keep.txt", ContentFile(b"x"))

    # Just written: their rows may be about to commit, so they stay.
    assert retention.prune_orphans().files == 0
    assert retention.prune_orphans(dry_run=True, now=NOW + timedelta(hours=2)).files == 4
    assert all(default_storage.exists(name) for name in orphans)

    out = StringIO()
    later = NOW + timedelta(hours=2)
    report = retention.prune_orphans(now=later)
    assert report.files == 4
    assert not any(default_storage.exists(name) for name in orphans)
    assert all(default_storage.exists(name) for name in [*kept, elsewhere])
    assert retention.prune_orphans(now=later).files == 0
    call_command("prune", "--orphans", stdout=out)
    assert "Deleted 0 orphaned stored file(s)." in out.getvalue()


def test_prune_orphans_with_nothing_stored_yet_finds_nothing() -> None:
    assert retention.prune_orphans(now=NOW + timedelta(days=1)).files == 0


def test_a_jobs_filesystem_snapshot_goes_with_its_build_and_an_unnamed_one_with_the_orphans(
        pipeline, django_capture_on_commit_callbacks):
    old = stored_build(pipeline, days_old=40)
    job = old.jobs.order_by("position").first()
    snapshot = default_storage.save(f"snapshots/{job.pk}.tar", ContentFile(b"image"))
    Job.objects.filter(pk=job.pk).update(snapshot_image=snapshot)
    orphan = default_storage.save(f"snapshots/{uuid.uuid4()}.tar", ContentFile(b"x"))

    with django_capture_on_commit_callbacks(execute=True):
        out = prune("--builds-older-than", "30")
    report = retention.prune_orphans(now=NOW + timedelta(hours=2))

    assert "4 stored file(s)." in out  # source, workspace, snapshot, artifact
    assert not default_storage.exists(snapshot)
    assert report.files == 1 and not default_storage.exists(orphan)
