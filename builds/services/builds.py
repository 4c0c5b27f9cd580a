"""Writes for builds: validating a create request, creating, canceling."""

from __future__ import annotations

import base64
import binascii
import fnmatch
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from builds import states
from builds.services import caches, concurrency, notifications
from builds.models import (Build, BuildSource, BuildState, ConcurrencySlot, EdgeKind, Job, JobDependency, JobKind,
                           JobState, SecretAccess, WebhookEvent)
from harmont.errors import ApiError, validation_error
from organizations.models import Organization, Role, User
from pipelines import agent_tags, ir
from pipelines.models import ForkPullRequests, Pipeline

# Also the sources a client may choose: `webhook`, `schedule` and `trigger_job` say the
# server's own code started the build, which is what lets it pass `allow_manual: false`.
MANUAL_SOURCES = frozenset({BuildSource.API, BuildSource.UI})
REF_MAX_LENGTH = 255
# A commit is what agents hand to `git fetch`/`git checkout`: an (abbreviated) object id or HEAD.
COMMIT = re.compile(r"HEAD|[0-9a-fA-F]{4,64}")
# git check-ref-format's forbidden characters: ASCII controls, space, DEL and ~^:?*[\
REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
# The render job's key; the planner refuses it in rendered pipelines so it stays unique.
RENDER_STEP_KEY = ":render"


@dataclass(frozen=True)
class BuildRequest:
    """A validated create-build request, before anything is written."""

    branch: str
    commit: str
    message: str | None
    source: str
    env: dict[str, str]
    pipeline_ir: Any  # str | dict | None
    source_archive: bytes | None
    source_url: str | None
    source_sha256: str | None


class BuildPlanRejected(ApiError):
    """422 `build_plan_rejected`, carrying the failed build that `create_build` recorded for the attempt."""

    def __init__(self, build: Build, message: str) -> None:
        super().__init__("build_plan_rejected", message)
        self.build = build


def ref_name_problem(name: str) -> str | None:
    """Why `name` is no branch or tag name git would accept (None: it is one).

    Branch and commit reach the agents' git command lines, so a value git would
    read as an option (`--upload-pack=...`) or as a revision expression must
    never get into a build: git check-ref-format's rules, checked here.
    """
    if name.startswith("-"):
        return "Must not start with '-'."
    if REF_FORBIDDEN.search(name):
        return "Must not contain spaces, control characters or any of ~ ^ : ? * [ \\."
    if ".." in name or "@{" in name or "//" in name:
        return "Must not contain '..', '@{' or '//'."
    if name == "@" or name.startswith("/") or name.endswith(("/", ".", ".lock")):
        return "Must not be '@', start with '/' or end with '/', '.' or '.lock'."
    if any(part.startswith(".") for part in name.split("/")):
        return "No part between slashes may start with '.'."
    return None


def validate_build_request(*, branch: Any, commit: Any, message: Any = None, source: Any = None,
                           env: Any = None, pipeline_ir: Any = None, source_b64: Any = None,
                           source_url: Any = None, source_sha256: Any = None,
                           also_required: dict[str, Any] | None = None,
                           allowed_sources: frozenset[str] = MANUAL_SOURCES) -> BuildRequest:
    """Check every field of a create-build request; 422 `build_invalid` listing all bad fields.

    `also_required` names further string fields the caller's route needs (the
    by-repo route's `repo_name` and `source_slug`), reported in the same pass.
    `allowed_sources`: what `source` may be; a client may set only `api` and
    `ui`, the server's own paths (webhooks) name the one they set.
    """
    fields: dict[str, list[str]] = {}

    def text(name: str, value: Any, *, required: bool = False, max_length: int = 255) -> str | None:
        if value is None or value == "":
            if required:
                fields[name] = ["This field is required."]
            return None
        if not isinstance(value, str):
            fields[name] = ["Must be a string."]
            return None
        if len(value) > max_length:
            fields[name] = [f"At most {max_length} characters."]
            return None
        return value

    for name, value in (also_required or {}).items():
        text(name, value, required=True)
    branch_v = text("branch", branch, required=True, max_length=REF_MAX_LENGTH)
    if branch_v is not None and (problem := ref_name_problem(branch_v)):
        fields["branch"] = [problem]
    commit_v = text("commit", commit, required=True)
    if commit_v is not None and not COMMIT.fullmatch(commit_v):
        fields["commit"] = ["Must be a commit id (4 to 64 hexadecimal characters) or HEAD."]
    message_v = text("message", message, max_length=100_000)
    if message_v is not None and not storable_text(message_v):
        fields["message"] = ["Must not contain NUL characters or lone surrogates."]
    source_v = text("source", source) or BuildSource.API
    if source_v not in allowed_sources:
        fields["source"] = [f"Must be one of: {', '.join(sorted(allowed_sources))}."]
    env_v: dict[str, str] = {}
    if env is not None:
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            fields["env"] = ["Must be an object mapping strings to strings."]
        elif not all(storable_text(k) and storable_text(v) for k, v in env.items()):
            fields["env"] = ["Names and values must not contain NUL characters or lone surrogates."]
        else:
            env_v = env
    if pipeline_ir is not None and not isinstance(pipeline_ir, (str, dict)):
        fields["pipeline_ir"] = ["Must be the v0 IR as a JSON string (or object)."]
    archive: bytes | None = None
    if source_b64 not in (None, ""):
        if not isinstance(source_b64, str):
            fields["source_b64"] = ["Must be a base64 string."]
        else:
            try:
                archive = base64.b64decode(source_b64, validate=True)
            except (binascii.Error, ValueError):
                fields["source_b64"] = ["Not valid base64."]
            if archive is not None and len(archive) > settings.SOURCE_MAX_BYTES:
                fields["source_b64"] = [f"The archive is larger than {settings.SOURCE_MAX_BYTES} bytes."]
    url_v = text("source_url", source_url, max_length=2000)
    sha_v = text("source_sha256", source_sha256, max_length=64)
    if sha_v is not None and (len(sha_v) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha_v)):
        fields["source_sha256"] = ["Must be 64 hexadecimal characters."]
    if fields:
        raise validation_error(fields, code="build_invalid", message=f"Invalid build request: {', '.join(sorted(fields))}.")
    return BuildRequest(
        branch=branch_v or "", commit=commit_v or "", message=message_v, source=source_v, env=env_v,
        pipeline_ir=pipeline_ir if pipeline_ir not in ("",) else None, source_archive=archive,
        source_url=url_v, source_sha256=sha_v.lower() if sha_v else None,
    )


def storable_text(value: str) -> bool:
    """Whether the database can store `value`: PostgreSQL refuses NUL in text and JSON, UTF-8 has no lone surrogates."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def find_pipeline_by_repo(*, org: Organization, repo_name: str, source_slug: str) -> Pipeline:
    """The oldest live pipeline of `org` with this repo (any case) and source slug."""
    pipeline = (
        Pipeline.objects.for_org(org)
        .filter(repo_name__iexact=repo_name, source_slug=source_slug)
        .order_by("id")
        .first()
    )
    if pipeline is None:
        raise ApiError("pipeline_not_found",
                       f"No pipeline for repository {repo_name!r} with source slug {source_slug!r}.")
    return pipeline


def can_check_out(*, pipeline: Pipeline, request: BuildRequest) -> bool:
    """Whether an agent can get the build's code: uploaded, a tarball URL, or the pipeline's repository."""
    return bool(request.source_archive is not None or request.source_url or pipeline.repository.strip())


def plan_document(document: Any, *, env: dict[str, str],
                  default_retry: Any = None, default_agents: Any = None
                  ) -> tuple[Any, ir.Plan | None, ir.PlanError | None]:
    """Decode and plan an IR document: (what to store as the build's IR, plan, error).

    `default_retry` and `default_agents`: the pipeline's, for the steps without
    a `retry` or an `agents` selector of their own.
    """
    try:
        loaded = ir.load_ir(document)
    except ir.PlanError as exc:
        # Not JSON: keep what was sent (bounded, as text the database takes) so the failed build shows it.
        raw = str(document)[:100_000].encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
        return {"raw": raw}, None, exc
    try:
        return loaded, ir.plan_ir(loaded, build_env=env, limits=ir.Limits.from_settings(),
                                  default_retry=default_retry, default_agents=default_agents), None
    except ir.PlanError as exc:
        try:
            ir.check_storable(loaded)
        except ir.PlanError:
            return None, None, exc  # too deep, or text no JSON column holds: nothing of it is kept
        return loaded, None, exc


def _plan(pipeline: Pipeline, request: BuildRequest, *, render: bool = False
          ) -> tuple[Any, ir.Plan | None, ir.PlanError | None]:
    """Decide the IR (request, else stored definition) and plan it, before any write.

    With neither, or with `render` and no IR in the request, the build is
    rendered on an agent from the repository's `.hm/*.py` at the build's
    commit (all three results None), if an agent can get the code at all.
    """
    stored = None if render and can_check_out(pipeline=pipeline, request=request) else pipeline.definition
    document = request.pipeline_ir if request.pipeline_ir is not None else stored
    if document is None:
        if can_check_out(pipeline=pipeline, request=request):
            return None, None, None
        return None, None, ir.PlanError(
            "definition_missing",
            f"The request has no pipeline_ir, pipeline {pipeline.slug!r} has no stored definition, "
            f"and there is no source to render one from.",
        )
    return plan_document(document, env=request.env, default_retry=pipeline.default_retry,
                         default_agents=pipeline.default_agents)


def is_protected_branch(pipeline: Pipeline, branch: str) -> bool:
    """The pipeline's default branch, or one matching a `protected_branches` pattern (fnmatch, case-sensitive)."""
    patterns = pipeline.protected_branches if isinstance(pipeline.protected_branches, list) else []
    return branch == pipeline.default_branch or any(
        isinstance(pattern, str) and fnmatch.fnmatchcase(branch, pattern) for pattern in patterns)


def secret_access_for(*, pipeline: Pipeline, request: BuildRequest, creator_role: str | None, fork: bool) -> str:
    """Which secrets the build's jobs get, decided once, when it is created.

    None for a pull request from a fork. All for a build an admin or owner
    triggered, and for one whose commands are the organization's own: the
    pipeline's stored definition, or what a render job renders from the
    repository at the build's commit, with no client-sent `pipeline_ir`,
    `env`, `source_b64` or `source_url` (any of which can run other commands:
    `BASH_ENV` in `env` is enough), on a protected branch, at that branch's tip
    for a build a person triggered. Every other build,
    such as a member's with their own IR, gets the unprotected secrets only.
    Only the server's own paths (webhooks) set a source other than `api` or
    `ui` (`validate_build_request` refuses it from clients), so the `env` of
    such a build is the server's, not a client's.
    """
    if fork:
        return SecretAccess.NONE
    if creator_role in (Role.ADMIN, Role.OWNER):
        return SecretAccess.ALL
    own_commands = (request.pipeline_ir is None and request.source_archive is None and not request.source_url
                    and (request.source not in MANUAL_SOURCES or not request.env))
    # A person names the commit, which may sit on any branch of the repository (or a pull request's
    # ref) whatever branch they call it: only the branch's tip, `HEAD`, is what that branch says.
    # A webhook's commit is the one GitHub signed for its branch.
    branch_content = request.source not in MANUAL_SOURCES or request.commit.upper() == "HEAD"
    if own_commands and branch_content and is_protected_branch(pipeline, request.branch):
        return SecretAccess.ALL
    return SecretAccess.UNPROTECTED


def create_build(*, pipeline: Pipeline, request: BuildRequest, created_by: User | None = None,
                 creator_role: str | None = None, fork: bool = False, held: bool = False,
                 rebuild_of: Build | None = None, render: bool = False, discovers_pipelines: bool = False,
                 now: datetime | None = None) -> Build:
    """Number, store and plan a build: the build row, its jobs and their edges in bulk.

    A rejected plan still records the build (`failed`, with the planner's
    error code) and then raises 422 `build_plan_rejected` (`BuildPlanRejected`,
    which carries that build), so the attempt is
    visible in the history exactly like a build that failed.

    `creator_role` is the role of `created_by` in the pipeline's organization
    (None: no person triggered it). `fork`: the code comes from a pull request
    of another repository. Both decide the build's `secret_access` (see
    `secret_access_for`). `held`: its root jobs wait, `held`, until `approve_build`.
    `rebuild_of`: the build this one repeats (`rebuild_build`), whose stored
    upload it shares and whose secret access bounds its own. `render`: the
    pipeline is rendered from the repository at the build's commit even if it
    has a stored definition (a webhook build of a registered pipeline);
    `discovers_pipelines`: that render's envelope registers the repository's
    pipelines again (`builds.services.discovery`).
    """
    if rebuild_of is None and not pipeline.allow_manual and request.source in MANUAL_SOURCES:
        raise ApiError("pipeline_manual_disabled",
                       f"Pipeline {pipeline.slug!r} does not allow manual builds (source {request.source!r}).")
    now = now or timezone.now()
    document, plan, error = _plan(pipeline, request, render=render)
    if rebuild_of is None:
        secret_access = secret_access_for(pipeline=pipeline, request=request, creator_role=creator_role, fork=fork)
    else:
        secret_access = rebuild_secret_access(original=rebuild_of, creator_role=creator_role)
    build_id = uuid.uuid4()
    archive_name, own_archive = None, False
    if rebuild_of is not None and rebuild_of.source_archive:
        archive_name = rebuild_of.source_archive.name  # shared, not copied: the bytes are the same
    elif request.source_archive is not None:
        archive_name = default_storage.save(f"sources/{build_id}.tar.gz", ContentFile(request.source_archive))
        own_archive = True
    try:
        build = _insert_build(pipeline=pipeline, build_id=build_id, request=request, document=document,
                              plan=plan, error=error, archive_name=archive_name, created_by=created_by,
                              fork=fork, secret_access=secret_access, held=held,
                              rebuild_of=None if rebuild_of is None else rebuild_of.number,
                              discovers_pipelines=discovers_pipelines and plan is None and error is None, now=now)
    except BaseException:
        if own_archive:
            default_storage.delete(archive_name)
        raise
    if error is None and pipeline.cancel_intermediate_builds and supersedes_on_branch(pipeline, build.branch):
        # After commit, so the pipeline's counter lock is not held while older builds are canceled
        # (and a rollback cancels nothing). robust: a failure here must not fail the create.
        transaction.on_commit(lambda: cancel_superseded_builds(build=build), robust=True)
    if error is not None:
        raise BuildPlanRejected(build, f"Build #{build.number} failed: the pipeline definition was rejected "
                                       f"({error.code}): {error.message}")
    return build


@transaction.atomic
def _insert_build(*, pipeline: Pipeline, build_id: uuid.UUID, request: BuildRequest, document: Any,
                  plan: ir.Plan | None, error: ir.PlanError | None, archive_name: str | None,
                  created_by: User | None, fork: bool, secret_access: str, held: bool,
                  rebuild_of: int | None, discovers_pipelines: bool, now: datetime) -> Build:
    # The counter row's lock is held until commit, so concurrent creates on one
    # pipeline queue here and take consecutive numbers; a rollback returns the number.
    Pipeline.objects.filter(pk=pipeline.pk).update(build_counter=F("build_counter") + 1)
    number, limit = Pipeline.objects.filter(pk=pipeline.pk).values_list("build_counter", "max_concurrent_builds").get()
    # Under that same lock, so two creates can't both see the last free slot. A held build waits
    # for a person already and a rejected one never runs: neither waits for a slot.
    waiting_reason = None
    if limit is not None and error is None and not held:
        waiting_reason = concurrency.waiting_reason_at_create(pipeline_id=pipeline.pk, limit=limit)
    hits: list[caches.Hit] = []
    if plan is not None:
        jobs = job_rows(build_id=build_id, org_id=pipeline.organization_id, plan=plan, now=now, held=held, fork=fork)
        hits = caches.reuse_cached_jobs(jobs, pipeline_id=pipeline.pk, branch=request.branch,
                                        default_branch=pipeline.default_branch, secret_access=secret_access,
                                        fork=fork, now=now)
    elif error is None:
        jobs = [_render_job(build_id=build_id, pipeline=pipeline, env=request.env, now=now, held=held)]
    else:
        jobs = []
    if waiting_reason is not None:
        # No agent sees a pending job; admission schedules these roots (concurrency.admit_waiting_builds).
        for job in jobs:
            if job.state == JobState.SCHEDULED:
                job.state, job.scheduled_at = JobState.PENDING, None
    job_states = [job.state for job in jobs]
    state = states.roll_up(job_states, build_error=error is not None)
    source_url = request.source_url
    if archive_name:
        source_url = f"{settings.PUBLIC_URL}/api/v0/internal/builds/{build_id}/source.tar.gz"
    build = Build.objects.create(
        id=build_id, pipeline=pipeline, number=number, state=state, branch=request.branch,
        commit=request.commit, message=request.message, source=request.source, env=request.env,
        pipeline_ir=document, timeout_seconds=plan.timeout_seconds if plan else None,
        source_archive=archive_name, source_url=source_url, source_sha256=request.source_sha256,
        error_code=error.code if error else None, error_message=error.message if error else None,
        created_by=created_by, fork=fork, secret_access=secret_access, rebuild_of=rebuild_of,
        discovers_pipelines=discovers_pipelines, waiting_reason=waiting_reason, reuses_jobs=bool(hits),
        created_at=now, scheduled_at=now,
        finished_at=now if state in states.TERMINAL_BUILD_STATES else None,
    )
    if jobs:
        Job.objects.bulk_create(jobs)
        create_concurrency_slots(jobs)
        if plan is not None:
            JobDependency.objects.bulk_create(edge_rows(jobs, plan))
        caches.record_hits(hits, now=now)
    notifications.record_build_event(build_id=build_id, event=WebhookEvent.BUILD_CREATED, now=now)
    if build.finished_at is not None:  # nothing to run, or a rejected plan: it ends as it begins
        notifications.record_build_event(build_id=build_id, event=WebhookEvent.BUILD_FINISHED, now=now)
    if hits:
        # Cached jobs whose prerequisites are met pass now, and what waited for them follows.
        states.settle_build(build_id=build_id, now=now, locked=build)
    build.pipeline = pipeline
    return build


def create_concurrency_slots(jobs: list[Job]) -> None:
    """The slot rows the claim takes for the jobs' concurrency groups (those that exist already stay).

    Slots are made with the jobs rather than at the claim, so the claim stays
    one statement that only updates rows. Indexes 0..n-1 for the largest
    `concurrency` any of the jobs gives its group; a job takes only a slot
    below its own.
    """
    wanted: dict[tuple[int, str], int] = {}
    for job in jobs:
        if job.concurrency_group is not None:
            key = (job.organization_id, job.concurrency_group)
            wanted[key] = max(wanted.get(key, 0), job.concurrency or 1)
    if wanted:
        ConcurrencySlot.objects.bulk_create(
            [ConcurrencySlot(organization_id=org_id, group=group, index=index)
             for (org_id, group), count in wanted.items() for index in range(count)],
            ignore_conflicts=True)


def _render_job(*, build_id: uuid.UUID, pipeline: Pipeline, env: dict[str, str], now: datetime,
                held: bool = False) -> Job:
    return Job(
        id=uuid.uuid4(), build_id=build_id, organization_id=pipeline.organization_id, position=0,
        step_key=RENDER_STEP_KEY, kind=JobKind.RENDER, name=f"Render pipeline {pipeline.source_slug}",
        command=f"render pipeline {pipeline.source_slug!r} from .hm/*.py",
        env={**ir.BASE_JOB_ENV, **env}, timeout_seconds=settings.RENDER_TIMEOUT_SECONDS,
        agents=render_agents(pipeline),
        state=JobState.HELD if held else JobState.SCHEDULED, scheduled_at=None if held else now, created_at=now,
    )


def render_agents(pipeline: Pipeline) -> dict[str, str]:
    """The render job's selector: the pipeline's default (a malformed stored one counts as none)."""
    try:
        default = agent_tags.read_selector(pipeline.default_agents)
    except agent_tags.SelectorError:
        default = None  # the planner reports it once the render job's IR is planned
    return agent_tags.effective_selector(None, default=default, runner=None)


def job_rows(*, build_id: uuid.UUID, org_id: int, plan: ir.Plan, now: datetime,
             after: Job | None = None, held: bool = False, fork: bool = False) -> list[Job]:
    """Unsaved jobs for a plan. `after`: every job comes after that one (the render job).

    `held`: the root jobs wait for an approval (`held`) instead of an agent.
    Cached steps get their cache keys, except in a fork's build, which neither
    reads nor writes caches.
    """
    offset = after.position + 1 if after is not None else 0
    rows = []
    for planned in plan.jobs:
        # Jobs of a rendered plan wait for their render job to pass, so its failure skips them.
        root = not planned.depends_on and after is None
        rows.append(Job(
            id=uuid.uuid4(), build_id=build_id, organization_id=org_id, position=offset + planned.index,
            step_key=planned.key, name=planned.label or planned.key, command=planned.command,
            image=planned.image, env=planned.env,
            timeout_seconds=planned.timeout_seconds or settings.DEFAULT_JOB_TIMEOUT_SECONDS,
            cache=planned.cache, runner=planned.runner, runner_args=planned.runner_args,
            segment=planned.segment, after_segment=planned.after_segment,
            retry_policy=planned.retry_policy, soft_fail_policy=planned.soft_fail_policy, agents=planned.agents,
            concurrency_group=planned.concurrency_group, concurrency=planned.concurrency,
            state=(JobState.HELD if held else JobState.SCHEDULED) if root else JobState.PENDING,
            scheduled_at=now if root and not held else None, created_at=now,
        ))
    if not fork:
        caches.assign_cache_keys(rows, plan, now=now)
    return rows


def edge_rows(jobs: list[Job], plan: ir.Plan, *, after: Job | None = None) -> list[JobDependency]:
    """The dependency rows of a plan's jobs; with `after`, its root jobs also wait for that job (the render job).

    A job's prerequisites through a wait are its `after_segment` (no row each);
    only a `builds_in` parent among them keeps its row, which agents look up.
    """
    segments: dict[int, set[int]] = {}
    for planned in plan.jobs:
        if planned.segment is not None:
            segments.setdefault(planned.segment, set()).add(planned.index)
    edges = []
    for planned, job in zip(plan.jobs, jobs):
        through_wait = segments.get(planned.after_segment, set()) if planned.after_segment is not None else set()
        for prereq in planned.depends_on:
            if prereq in through_wait and prereq != planned.builds_in:
                continue
            kind = EdgeKind.BUILDS_IN if prereq == planned.builds_in else EdgeKind.DEPENDS_ON
            edges.append(JobDependency(job=job, prerequisite=jobs[prereq], kind=kind))
        if after is not None and not planned.depends_on:
            edges.append(JobDependency(job=job, prerequisite=after, kind=EdgeKind.DEPENDS_ON))
    return edges


# Most to least: a rebuild never gets more than its original had.
_ACCESS_ORDER = (SecretAccess.NONE, SecretAccess.UNPROTECTED, SecretAccess.ALL)


def rebuild_secret_access(*, original: Build, creator_role: str | None) -> str:
    """Which secrets a rebuild of `original` gets: never more than the original's.

    An admin's or owner's rebuild gets every secret, as their own build would
    (a fork's: none). A member's keeps the original's access when the server
    itself started the original (a webhook or a schedule: the organization's
    own commands at a commit its branch named), else it gets at most the
    unprotected secrets: whatever role let the original's person have all of
    them is not the member's.
    """
    if original.fork:
        return SecretAccess.NONE
    if creator_role in (Role.ADMIN, Role.OWNER):
        return SecretAccess.ALL
    if original.source not in MANUAL_SOURCES:
        return original.secret_access
    return min(original.secret_access, SecretAccess.UNPROTECTED, key=_ACCESS_ORDER.index)


def rebuild_build(*, build: Build, created_by: User, creator_role: str | None, source: str = BuildSource.API,
                  now: datetime | None = None) -> Build:
    """A new build of the same pipeline with `build`'s branch, commit, message, env, IR and uploaded source.

    The stored upload is shared, not copied (a file is deleted with the last
    build naming it). The IR is the one `build` ran: for a build rendered from
    its repository, the rendered one, so the rebuild runs what the original
    did; a build that never got one (its render failed) renders again. The
    pipeline's `allow_manual` does not apply: a rebuild runs what already ran,
    not code a client sends. A fork's build stays a fork's, held again for an
    approval unless an admin or owner rebuilds it. Numbered like every build;
    `rebuild_of` is the original's number.
    """
    original = Build.objects.select_related("pipeline").get(pk=build.pk)
    pipeline = original.pipeline
    document = original.pipeline_ir
    if isinstance(document, dict) and set(document) == {"raw"}:
        document = document["raw"]  # kept as sent because it was no JSON: plan it again as such
    request = BuildRequest(
        branch=original.branch, commit=original.commit, message=original.message, source=source,
        env=dict(original.env or {}), pipeline_ir=document, source_archive=None,
        source_url=None if original.source_archive else original.source_url,
        source_sha256=original.source_sha256,
    )
    held = (original.fork and pipeline.fork_pull_requests == ForkPullRequests.REQUIRE_APPROVAL
            and creator_role not in (Role.ADMIN, Role.OWNER))
    return create_build(pipeline=pipeline, request=request, created_by=created_by, creator_role=creator_role,
                        fork=original.fork, held=held, rebuild_of=original, now=now)


def cancel_build(*, build: Build, now: datetime | None = None, error_code: str | None = None,
                 error_message: str | None = None) -> Build:
    """Cancel a build: waiting jobs end `canceled`, running ones go `canceling`.

    Idempotent for a build already canceled; 409 for one that already finished.
    `error_code`/`error_message` record why, when the server cancels it
    (`superseded`); a repeated cancel keeps the first reason.
    """
    now = now or timezone.now()
    with transaction.atomic():
        locked = states.lock_build(build.pk)
        if locked.cancel_requested_at is None:
            if locked.state in states.TERMINAL_BUILD_STATES:
                raise ApiError("build_already_finished",
                               f"Build #{locked.number} already {locked.state}; there is nothing to cancel.")
            reason = {"error_code": error_code, "error_message": error_message} if error_code else {}
            # A canceled build waits for no slot any more.
            Build.objects.filter(pk=locked.pk).update(cancel_requested_at=now, waiting_reason=None, **reason)
            locked.waiting_reason = None
            waiting = Job.objects.filter(build_id=locked.pk, state__in=states.WAITING_JOB_STATES)
            states.transition_jobs(waiting.values_list("id", flat=True), to=JobState.CANCELED, now=now,
                                   build_id=locked.pk)
            active = Job.objects.filter(build_id=locked.pk, state__in=(JobState.ASSIGNED, JobState.RUNNING))
            states.transition_jobs(active.values_list("id", flat=True), to=JobState.CANCELING, now=now)
        settled = states.settle_build(build_id=locked.pk, now=now)
    settled.pipeline = build.pipeline
    return settled


# Auto-cancel takes only builds still waiting or running; a held build waits for a person's decision.
SUPERSEDABLE_STATES = (BuildState.SCHEDULED, BuildState.RUNNING)


def supersedes_on_branch(pipeline: Pipeline, branch: str) -> bool:
    """Whether a new build on `branch` cancels the branch's older ones (the pipeline has the feature on).

    `cancel_intermediate_builds_branch_filter`: null is every branch except the
    default one (Buildkite's default); else fnmatch patterns, case-sensitive like
    git refs, `!pattern` excluding. A branch qualifies when no `!` pattern matches
    it and some other pattern does (or the list has only `!` patterns, or none).
    """
    patterns = pipeline.cancel_intermediate_builds_branch_filter
    if patterns is None:
        return branch != pipeline.default_branch
    include = [p for p in patterns if isinstance(p, str) and not p.startswith("!")]
    exclude = [p[1:] for p in patterns if isinstance(p, str) and p.startswith("!")]
    if any(fnmatch.fnmatchcase(branch, p) for p in exclude):
        return False
    return not include or any(fnmatch.fnmatchcase(branch, p) for p in include)


def cancel_superseded_builds(*, build: Build, now: datetime | None = None) -> list[int]:
    """Cancel the older `scheduled`/`running` builds of `build`'s pipeline and branch; their numbers.

    Each goes through `cancel_build` (running jobs go `canceling` until their
    agents stop them) with `error_code: superseded` naming the newer build. A
    build that finished (or was canceled) meanwhile is left as it is.
    """
    now = now or timezone.now()
    older = (Build.objects.filter(pipeline_id=build.pipeline_id, branch=build.branch, number__lt=build.number,
                                  state__in=SUPERSEDABLE_STATES, cancel_requested_at__isnull=True)
             .order_by("number").only("id", "number"))
    canceled = []
    for old in older:
        old.pipeline = build.pipeline
        try:
            cancel_build(build=old, now=now, error_code="superseded",
                         error_message=f"Superseded by build #{build.number} on branch {build.branch}.")
        except ApiError as exc:
            if exc.code != "build_already_finished":
                raise
            continue  # it ended between the read and its lock: nothing to cancel
        canceled.append(old.number)
    return canceled


def approve_build(*, build: Build, approved_by: User, now: datetime | None = None) -> Build:
    """Let agents take a held build's jobs: `held` → `scheduled`, and who approved it is recorded.

    409 `build_not_held` when the build holds no job (approved already, canceled,
    or never held). Under the build's lock, so of an approval racing a cancel or
    a second approval exactly one finds held jobs. When the pipeline's
    `max_concurrent_builds` has no free slot, the approved build waits for one
    like a new build would (its held jobs go `pending`, `waiting_reason` set).
    """
    now = now or timezone.now()
    with transaction.atomic():
        # The pipeline's row first, then the build's (admission's lock order): counting the slots
        # under it keeps an approval from racing a create or an admission for the last one. NO KEY,
        # as in concurrency.admit_waiting_builds: a cancel's foreign key check shares the row.
        limit = (Pipeline.objects.select_for_update(no_key=True).filter(pk=build.pipeline_id)
                 .values_list("max_concurrent_builds", flat=True).get())
        locked = states.lock_build(build.pk)
        held = list(Job.objects.filter(build_id=locked.pk, state=JobState.HELD).values_list("id", flat=True))
        if locked.cancel_requested_at is not None or not held:
            raise ApiError("build_not_held", f"Build #{locked.number} is {locked.state}; it holds no job waiting "
                                             "for approval.")
        waiting_reason = None
        if limit is not None:
            waiting_reason = concurrency.waiting_reason_at_create(pipeline_id=locked.pipeline_id, limit=limit)
        # Pending, and the settle below schedules them (unless the build waits for a slot), or passes
        # those that are step cache hits.
        states.transition_jobs(held, to=JobState.PENDING, now=now, only_from=(JobState.HELD,))
        Build.objects.filter(pk=locked.pk).update(approved_by=approved_by, approved_at=now,
                                                  waiting_reason=waiting_reason)
        locked.approved_by, locked.approved_at, locked.waiting_reason = approved_by, now, waiting_reason
        settled = states.settle_build(build_id=locked.pk, now=now, locked=locked)
    settled.pipeline = build.pipeline
    return settled
