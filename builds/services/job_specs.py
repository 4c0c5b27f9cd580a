"""What an agent is told to run: a claimed job's spec, with its environment and secrets composed."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from builds.models import Build, Job, JobKind, SecretAccess
from builds.selectors import builds_in_links
from pipelines.secrets import compose_secrets, secrets_for_job


def job_spec(job: Job) -> dict[str, Any]:
    """The claim answer's `job`: command, environment (secrets included), where its files come from.

    `job` is a claim's job, with its build and pipeline loaded. The values are the
    JSON's own (ids as text, keys in the schema's order): every claim answers one, and
    passing it through JobSpecSerializer cost more than composing it (a test holds
    the serializer's rendering of it equal to it).
    """
    build: Build = job.build
    links = builds_in_links(job)
    root = links.parent_id is None
    # Secrets override the job's own env (the pipeline's, the step's and the build request's),
    # so a build request can't put its own value under an admin's secret name; the server's
    # variables come last (secret names can't take them: pipelines.secrets.is_reserved_name).
    # What the build may have was decided when it was created (Build.secret_access).
    secrets: dict[str, str] = {}
    if gets_secrets(job):
        scope = {"organization_id": build.pipeline.organization_id, "pipeline_id": build.pipeline_id,
                 "protected": build.secret_access == SecretAccess.ALL}
        # A claim's job comes with its secrets' rows (builds.sql.claimed_job); others read them.
        rows = getattr(job, "secret_rows", None)
        secrets = secrets_for_job(**scope) if rows is None else compose_secrets(rows, **scope)
    env = {
        **job.env, **secrets,
        "CI": "true", "HARMONT": "true", "HARMONT_BUILD_ID": str(build.pk), "HARMONT_BUILD_NUMBER": str(build.number),
        "HARMONT_PIPELINE_SLUG": build.pipeline.slug, "HARMONT_BRANCH": build.branch, "HARMONT_COMMIT": build.commit,
        "HARMONT_STEP_KEY": job.step_key, "HARMONT_PULL_REQUEST_FORK": "true" if build.fork else "false",
    }
    return {
        "id": str(job.pk), "build_id": str(build.pk), "build_number": build.number,
        "pipeline_slug": build.pipeline.slug,
        "step_key": job.step_key, "name": job.name, "command": job.command, "env": env,
        "timeout_seconds": job.timeout_seconds, "image": job.image,
        "source": source_spec(build) if root else None,
        "parent_workspace_path": None if root else f"/api/v0/agent/jobs/{job.pk}/parent-workspace",
        # A cached step that runs keeps what it leaves for the later builds that will reuse it.
        "upload_workspace": links.has_children or bool(job.cache_key),
        # For container executors: the parent's whole filesystem, named by the job whose snapshot it is
        # (an agent that made or loaded it already starts from its own copy), and where this job's goes.
        "parent_snapshot": None if root else {"job_id": str(links.parent_id),
                                              "path": f"/api/v0/agent/jobs/{job.pk}/parent-snapshot"},
        "snapshot_upload": {"path": f"/api/v0/agent/jobs/{job.pk}/snapshot", "max_bytes": settings.SNAPSHOT_MAX_BYTES}
        if links.has_children or job.cache_key else None,
        "cancel_grace_seconds": settings.AGENT_CANCEL_GRACE_SECONDS,
        "mask": list(dict.fromkeys(secrets.values())),
        # `envelope`: send the whole rendered envelope too, which registers the repository's pipelines again.
        "render": {"source_slug": build.pipeline.source_slug, "result_path": f"/api/v0/agent/jobs/{job.pk}/pipeline",
                   "envelope": build.discovers_pipelines}
        if job.kind == JobKind.RENDER else None,
        "start_with_finish": True,
    }


def gets_secrets(job: Job) -> bool:
    """Whether secrets may reach the job at all.

    Not in a fork build: its code comes from a pull request of another
    repository, which nobody in the organization reviewed, whatever the
    pipeline's fork policy (an approval lets it run, not read secrets). Not in
    a render job: it runs the repository's `.hm/*.py` only to learn the
    pipeline, which needs no credentials.
    """
    build = job.build
    return not build.fork and build.secret_access != SecretAccess.NONE and job.kind != JobKind.RENDER


def source_spec(build: Build) -> dict[str, Any] | None:
    """Where the build's code comes from: the upload, a tarball URL, else the pipeline's repository."""
    if build.source_archive:
        return _source("archive", path=f"/api/v0/internal/builds/{build.pk}/source.tar.gz")
    if build.source_url:
        return _source("url", url=build.source_url, sha256=build.source_sha256)
    repository = build.pipeline.repository.strip()
    if repository:
        return _source("git", url=repository, commit=build.commit, branch=build.branch)
    return None


def _source(kind: str, **given: str | None) -> dict[str, Any]:
    return {"kind": kind, **{key: given.get(key) for key in ("path", "url", "sha256", "commit", "branch")}}
