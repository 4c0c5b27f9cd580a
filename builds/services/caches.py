"""Step caches: a cached step whose key matches an earlier passed job reuses it instead of running.

The key of each planned job is computed by `pipelines.cache_keys` when its
build is planned (`assign_cache_keys`). The hit is decided right there, in the
transaction that inserts the build's jobs, with one query for all of them
(`reuse_cached_jobs`): a hit keeps its job out of every agent's reach (never
`scheduled`) and names the job it reuses; `states.settle_build` passes it once
its prerequisites are met, and its `builds_in` children start from the reused
job's snapshot or workspace (selectors). A miss runs, uploads what it leaves
(the spec asks for it) and, when it passes, becomes an entry (`record_entry`).

Scope, as GitHub Actions scopes its caches: a build reads the entries of its
own branch and of its pipeline's default branch, written with the same secret
access; a fork build neither reads nor writes any. An organization's entries
take at most HARMONT_CACHE_MAX_BYTES together: past it the least recently used
go, and their jobs' stored files with them once nothing still needs them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.db.models import F, Q, Sum

from builds.models import CacheEntry, Job, JobState, LogChunk, StreamKind
from builds.states import TERMINAL_BUILD_STATES
from harmont.errors import ApiError
from harmont.serializers import parse_uuid
from harmont.timestamps import ns_from_datetime
from organizations.models import Organization
from pipelines import cache_keys
from pipelines.ir import Plan
from pipelines.models import Pipeline

J = JobState


def assign_cache_keys(jobs: list[Job], plan: Plan, *, now: datetime) -> None:
    """Set each unsaved job's `cache_key` (and its transient `cache_max_age`) from its planned step.

    `jobs` are `plan.jobs` in order; a `builds_in` parent comes before its child.
    """
    computed: list[cache_keys.StepCache | None] = []
    moment = int(now.timestamp())
    for planned, job in zip(plan.jobs, jobs):
        parent = computed[planned.builds_in] if planned.builds_in is not None else None
        step = cache_keys.step_cache(planned.cache, command=planned.command, image=planned.image, env=planned.env,
                                     parent=parent, has_parent=planned.builds_in is not None, now=moment)
        computed.append(step)
        job.cache_key = step.key if step else None
        job.cache_max_age = step.max_age_seconds if step else None  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Hit:
    job: Job
    entry_id: uuid.UUID
    reused_job_id: uuid.UUID
    reused_build_number: int
    branch: str


def reuse_cached_jobs(jobs: list[Job], *, pipeline_id: int, branch: str, default_branch: str, secret_access: str,
                      fork: bool, now: datetime) -> list[Hit]:
    """Decide the hits among unsaved `jobs` (one query) and mark them; `record_hits` once they are saved.

    A hit's job names the job it reuses and, were it `scheduled`, waits
    `pending` instead, so no agent claims it.
    """
    wanted = {job.cache_key for job in jobs if job.cache_key}
    if fork or not wanted:
        return []
    branches = {branch, default_branch} - {""}
    rows = (CacheEntry.objects.filter(pipeline_id=pipeline_id, key__in=wanted, secret_access=secret_access,
                                      branch__in=branches)
            .values_list("id", "key", "branch", "created_at", "job_id", "job__build__number"))
    best: dict[str, list[tuple[uuid.UUID, str, datetime, uuid.UUID, int]]] = {}
    for entry_id, key, entry_branch, created_at, job_id, number in rows:
        best.setdefault(key, []).append((entry_id, entry_branch, created_at, job_id, number))
    hits = []
    for job in jobs:
        max_age = getattr(job, "cache_max_age", None)
        fresh = [entry for entry in best.get(job.cache_key or "", ())
                 if max_age is None or entry[2] >= now - timedelta(seconds=max_age)]
        if not fresh:
            continue
        # The build's own branch first (what it wrote itself), then the newest.
        entry_id, entry_branch, _, reused_id, number = max(fresh, key=lambda e: (e[1] == branch, e[2]))
        job.reused_job_id = reused_id
        if job.state == J.SCHEDULED:
            job.state, job.scheduled_at = J.PENDING, None
        line = (f"Cached: this step reuses job {reused_id} of build #{number} (cache key {job.cache_key[:12]}, "
                f"branch {entry_branch}); it does not run again.\n")
        job.log_bytes = len(line.encode())
        hits.append(Hit(job=job, entry_id=entry_id, reused_job_id=reused_id, reused_build_number=number,
                        branch=entry_branch))
        job.cache_line = line  # type: ignore[attr-defined]
    return hits


def record_hits(hits: list[Hit], *, now: datetime) -> None:
    """After the hits' jobs are inserted: their log line (two queries however many hits)."""
    if not hits:
        return
    ts = ns_from_datetime(now)
    LogChunk.objects.bulk_create([LogChunk(job=hit.job, seq=0, stream_kind=StreamKind.META,
                                           content=hit.job.cache_line, ts=ts, created_at=now)  # type: ignore[attr-defined]
                                  for hit in hits])
    CacheEntry.objects.filter(pk__in={hit.entry_id for hit in hits}).update(hits=F("hits") + 1, last_used_at=now)


def _stored_size(*names: str) -> int:
    total = 0
    for name in names:
        if name:
            try:
                total += default_storage.size(name)
            except OSError:
                pass  # gone meanwhile: it counts for nothing
    return total


def record_entry(*, job_id: uuid.UUID, now: datetime) -> CacheEntry | None:
    """A cached step's job passed: make it the entry for its key and scope (replacing an older one).

    Inside the transaction that ends the job. None for a job that reused
    another (nothing new to keep) and for a fork build's.
    """
    job = (Job.objects.select_related("build__pipeline")
           .only("id", "organization_id", "step_key", "cache_key", "reused_job_id", "workspace_archive",
                 "snapshot_image", "build__branch", "build__fork", "build__secret_access", "build__pipeline_id",
                 "build__pipeline__organization_id")
           .get(pk=job_id))
    build = job.build
    if not job.cache_key or job.reused_job_id is not None or build.fork:
        return None
    size = _stored_size(job.workspace_archive.name or "", job.snapshot_image.name or "")
    scope = {"pipeline_id": build.pipeline_id, "key": job.cache_key, "branch": build.branch,
             "secret_access": build.secret_access}
    values = {"organization_id": job.organization_id, "step_key": job.step_key, "job_id": job.pk,
              "size_bytes": size, "hits": 0, "created_at": now, "last_used_at": now}
    try:
        with transaction.atomic():
            entry, _ = CacheEntry.objects.update_or_create(**scope, defaults=values)
    except IntegrityError:
        # Another job with the key passed at the same moment and made the entry first: it stays.
        return None
    evict_over_limit(organization_id=job.organization_id)
    return entry


def evict_over_limit(*, organization_id: int, limit: int | None = None) -> int:
    """Delete the organization's least recently used entries until they fit under the limit; how many went."""
    limit = settings.CACHE_MAX_BYTES if limit is None else limit
    entries = CacheEntry.objects.filter(organization_id=organization_id)
    total = entries.aggregate(total=Sum("size_bytes"))["total"] or 0
    if total <= limit:
        return 0
    doomed: list[uuid.UUID] = []
    jobs: list[uuid.UUID] = []
    for entry_id, size, job_id in entries.order_by("last_used_at", "id").values_list("id", "size_bytes", "job_id"
                                                                                      ).iterator(chunk_size=200):
        if total <= limit:
            break
        doomed.append(entry_id)
        jobs.append(job_id)
        total -= size
    delete_entries(entry_ids=doomed, job_ids=jobs)
    return len(doomed)


def delete_entries(*, entry_ids: list[uuid.UUID], job_ids: list[uuid.UUID]) -> None:
    """Delete entries and free their jobs' stored files where nothing needs them any more.

    A job's snapshot and workspace stay while another entry names the job,
    while its own build has not finished (its children may still start from
    them), and while a job of an unfinished build reuses it (its children
    start from the reused job's files).
    """
    with transaction.atomic():
        _delete_entries(entry_ids=entry_ids, job_ids=job_ids)


def _delete_entries(*, entry_ids: list[uuid.UUID], job_ids: list[uuid.UUID]) -> None:
    CacheEntry.objects.filter(pk__in=entry_ids).delete()
    still_needed = (Q(cache_entries__isnull=False) | ~Q(build__state__in=TERMINAL_BUILD_STATES)
                    | Q(pk__in=Job.objects.filter(reused_job_id__in=job_ids)
                        .exclude(build__state__in=TERMINAL_BUILD_STATES).values("reused_job_id")))
    freed = list(Job.objects.filter(pk__in=job_ids).exclude(still_needed).values_list(
        "pk", "workspace_archive", "snapshot_image"))
    if not freed:
        return
    Job.objects.filter(pk__in=[pk for pk, _, _ in freed]).update(workspace_archive="", snapshot_image="")
    names = [name for _, workspace, snapshot in freed for name in (workspace, snapshot) if name]
    transaction.on_commit(lambda: [default_storage.delete(name) for name in names])


def delete_entry(*, entry: CacheEntry) -> None:
    """An admin deletes one entry: later builds run its step again."""
    delete_entries(entry_ids=[entry.pk], job_ids=[entry.job_id])


# Rows deleted per statement when a pipeline's entries go: a bounded IN list on every database.
DELETE_BATCH = 500


def delete_pipeline_entries(*, pipeline: Pipeline, step_key: str | None = None, branch: str | None = None) -> int:
    """An admin empties a pipeline's cache (or one step's, or one branch's); how many entries went.

    One transaction: a build inserted meanwhile either reused an entry
    before it went (its job keeps the files alive) or runs its step again.
    """
    entries = CacheEntry.objects.filter(pipeline=pipeline)
    if step_key is not None:
        entries = entries.filter(step_key=step_key)
    if branch is not None:
        entries = entries.filter(branch=branch)
    deleted = 0
    with transaction.atomic():
        rows = list(entries.values_list("id", "job_id"))
        for start in range(0, len(rows), DELETE_BATCH):
            batch = rows[start:start + DELETE_BATCH]
            _delete_entries(entry_ids=[pk for pk, _ in batch], job_ids=[job for _, job in batch])
            deleted += len(batch)
    return deleted


def get_entry(*, organization: Organization, entry_id: str) -> CacheEntry:
    """The organization's entry `entry_id`; 404 `cache_entry_not_found` for another's, a deleted or a malformed id."""
    pk = parse_uuid(entry_id)
    entry = CacheEntry.objects.filter(organization=organization, pk=pk).first() if pk else None
    if entry is None:
        raise ApiError("cache_entry_not_found", f"No cache entry {entry_id} in organization {organization.slug!r}.")
    return entry
