"""Builds whose pipeline is rendered on an agent.

A build created with neither an IR nor a stored definition starts with one
render job (see `create_build`). Its agent checks the code out, renders the
pipeline from the repository's `.hm/*.py` with the `harmont` package, and sends
the IR here; the rest of the build is planned from it, after the render job in
dependency order. User code never runs in the server: it only parses JSON.

A webhook build of a pipeline registered from its repository is rendered so
too, at the pushed commit, and a push to the default branch also sends the
whole envelope, which registers the repository's pipelines again.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from builds import states
from builds.models import Build, Job, JobDependency, JobKind
from builds.services import caches
from builds.services.builds import RENDER_STEP_KEY, create_concurrency_slots, edge_rows, job_rows, plan_document
from builds.services.discovery import enqueue_discovery
from harmont.errors import ApiError
from pipelines import ir
from pipelines.models import Pipeline

ERROR_MESSAGE_MAX = 2000


def _locked_render(job: Job) -> tuple[Build, str]:
    """The build's lock and the render job's current state, refusing other jobs."""
    if job.kind != JobKind.RENDER:
        raise ApiError("job_not_render", "Only a render job may send the build's pipeline.")
    build = states.lock_build(job.build_id)
    state = Job.objects.values_list("state", flat=True).get(pk=job.pk)
    return build, state


def accept_rendered_pipeline(*, job: Job, document: Any, envelope: Any = None, now: datetime | None = None) -> int:
    """Plan the rendered IR and add the build's jobs; returns how many were added.

    Safe to retry: once the build has its jobs, a repeated report changes
    nothing. A rejected IR fails the build with the planner's error code (like
    a rejected `pipeline_ir` at create time) and answers 422 `build_plan_rejected`.
    With `envelope`, for a build that `discovers_pipelines`, a task registers
    the repository's pipelines from it once this is committed (see
    `builds.services.discovery`), whether or not this pipeline's IR planned.
    """
    now = now or timezone.now()
    error: ir.PlanError | None = None
    with transaction.atomic():
        build, state = _locked_render(job)
        planned = Job.objects.filter(build_id=build.pk).exclude(pk=job.pk).count()
        if planned:
            return planned
        if build.error_code is not None:
            raise ApiError("build_plan_rejected", f"Build #{build.number} already failed ({build.error_code}).")
        if state not in states.LIVE_JOB_STATES:
            raise ApiError("job_not_active", "The render job is no longer running; its result can't change the build.")
        if envelope is not None and build.discovers_pipelines:
            transaction.on_commit(lambda: enqueue_discovery(build_id=build.pk, envelope=envelope))
        default_retry, default_agents, default_branch = Pipeline.objects.values_list(
            "default_retry", "default_agents", "default_branch").get(
            pk=build.pipeline_id)
        stored, plan, error = plan_document(document, env=build.env, default_retry=default_retry,
                                            default_agents=default_agents)
        if plan is not None and any(p.key == RENDER_STEP_KEY for p in plan.jobs):
            plan, error = None, ir.PlanError("duplicate_key", f"The step key {RENDER_STEP_KEY!r} is reserved.")
        if plan is None:
            assert error is not None
            Build.objects.filter(pk=build.pk).update(pipeline_ir=stored, error_code=error.code,
                                                     error_message=error.message[:ERROR_MESSAGE_MAX])
            build.error_code = error.code
            states.settle_build(build_id=build.pk, now=now, locked=build)
        else:
            jobs = job_rows(build_id=build.pk, org_id=job.organization_id, plan=plan, now=now, after=job,
                            fork=build.fork)
            hits = caches.reuse_cached_jobs(jobs, pipeline_id=build.pipeline_id, branch=build.branch,
                                            default_branch=default_branch, secret_access=build.secret_access,
                                            fork=build.fork, now=now)
            Job.objects.bulk_create(jobs)
            create_concurrency_slots(jobs)
            JobDependency.objects.bulk_create(edge_rows(jobs, plan, after=job))
            caches.record_hits(hits, now=now)
            Build.objects.filter(pk=build.pk).update(pipeline_ir=stored, timeout_seconds=plan.timeout_seconds,
                                                     reuses_jobs=bool(hits))
            build.reuses_jobs = bool(hits)
            states.settle_build(build_id=build.pk, now=now, locked=build)
            return len(jobs)
    raise ApiError("build_plan_rejected", f"Build #{build.number} failed: the rendered pipeline was rejected "
                                          f"({error.code}): {error.message}")


def fail_render(*, job: Job, message: str, now: datetime | None = None) -> None:
    """The renderer failed on the agent: the build fails with `render_failed`.

    The job itself ends when its agent finishes it (the renderer's output is in
    its log); the build's error says why no other job will run. Idempotent.
    """
    now = now or timezone.now()
    with transaction.atomic():
        build, state = _locked_render(job)
        if build.error_code is not None or Job.objects.filter(build_id=build.pk).exclude(pk=job.pk).exists():
            return
        if state not in states.LIVE_JOB_STATES:
            raise ApiError("job_not_active", "The render job is no longer running; its result can't change the build.")
        Build.objects.filter(pk=build.pk).update(error_code="render_failed",
                                                 error_message=(message or "The render failed.")[:ERROR_MESSAGE_MAX])
        build.error_code = "render_failed"
        states.settle_build(build_id=build.pk, now=now, locked=build)


def record_render_result(*, job: Job, pipeline_ir: Any = None, error: str | None = None, envelope: Any = None,
                         now: datetime | None = None) -> int:
    """A render job's report: the rendered IR (`pipeline_ir`), or why rendering failed (`error`).

    Returns how many jobs the build gained (0 for a failure); see
    `accept_rendered_pipeline` and `fail_render`.
    """
    if error is not None:
        fail_render(job=job, message=error, now=now)
        return 0
    return accept_rendered_pipeline(job=job, document=pipeline_ir, envelope=envelope, now=now)
