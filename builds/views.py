"""HTML pages for builds: an organization's pipelines with their latest builds, a pipeline's
build history and its "New build" form, the build page, its live status, logs, cancel and
approve; the agents page.

The build page is server-rendered; a little JavaScript (static/harmont/build.js)
keeps it current. It polls `status.json` (session-authenticated, constant
query count) for states, and follows a job's log on the SSE stream
`/v0/jobs/<id>/logs` with a build-scoped log token from `log-token.json`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, QueryDict
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from builds import graphs, services, trends
from builds.filters import BuildFilter
from builds.models import Artifact, Build, BuildSource, BuildState, Job
from builds.responses import artifact_response, raw_log_response
from builds.selectors import build_jobs, find_artifact, recent_agents, scoped_build, with_waiting_reasons
from builds.test_results import build_test_results, pipeline_test_failures
from builds.services.builds import BuildPlanRejected
from builds.services.retries import retryable_by_hand
from builds.states import TERMINAL_BUILD_STATES, TERMINAL_JOB_STATES
from builds.templatetags.harmont_pages import duration_seconds, format_duration
from builds.viewers import Viewer, members_or_public, members_or_public_json, viewed_build, viewed_pipeline
from harmont.errors import ApiError
from harmont.labels import with_emoji
from harmont.logtokens import mint_log_token
from harmont.pagination import decode_cursor, encode_cursor
from organizations import services as org_services
from organizations.models import AgentToken
from organizations.views import OrgPage, admin_org_page, org_page
from pipelines import schedules as schedule_services
from pipelines.models import Pipeline

# What the build page reads of its jobs: a job's env can be large and is never shown.
JOB_FIELDS = ("id", "build_id", "position", "step_key", "name", "command", "image", "state", "exit_code",
              "error_code", "error_message", "signal", "scheduled_at", "started_at", "finished_at", "log_bytes",
              "log_truncated",
              "kind", "attempt", "retried", "retry_policy", "soft_failed", "agents", "concurrency_group",
              "concurrency", "reused_job")
# The 2-second poll redraws states (and whether Retry is offered, and why a job waits) and the
# timeline's bars, whose critical path needs each job's prerequisites.
STATUS_JOB_FIELDS = ("id", "build_id", "position", "step_key", "name", "state", "exit_code", "error_code", "error_message",
                     "scheduled_at", "started_at", "finished_at", "kind", "attempt", "retried", "retry_policy",
                     "soft_failed", "agents", "concurrency_group", "concurrency")
# The build page lists this many artifacts (oldest first); the API lists them all.
ARTIFACTS_ON_PAGE = 100
HISTORY_PAGE_SIZE = 25
MAX_PAGE_SIZE = 100
# Everything a history row shows; the IR and env of a build can be large and are not shown.
HISTORY_FIELDS = ("id", "pipeline", "number", "state", "branch", "commit", "message", "source", "error_code",
                  "created_by__email", "created_at", "started_at", "finished_at")


# ---------------------------------------------------------------- resolving a build


def build_url(build: Build) -> str:
    """The build page; `build.pipeline.organization` must be loaded (callers attach it)."""
    return reverse("builds_ui:build", args=[build.pipeline.organization.slug, build.pipeline.slug, build.number])


def page_build(page: OrgPage, pipeline: str, number: int) -> Build:
    """The build, in one query, through the caller's organization: anything else is a 404."""
    build = scoped_build(org_slug=page.org.slug, pipeline_slug=pipeline, number=number,
                         user=page.membership.user, for_page=True)
    if build is None:
        raise Http404(f"No build {number} in pipeline {pipeline!r}.")
    build.pipeline.organization = page.org
    return build


def job_rows(build: Build, *, can_act: bool = True) -> list[Job]:
    """The build's jobs in dependency order, older attempts of a step before its latest, each with
    `after` (its prerequisites' keys), `retryable` (the page offers Retry) and `waiting_reason`."""
    jobs = with_waiting_reasons(build_jobs(build, fields=JOB_FIELDS, include_retried=True),
                                organization_id=build.pipeline.organization_id)
    keys = {job.pk: job.step_key for job in jobs}
    for job in jobs:
        job.after = [keys[pk] for pk in job.prerequisite_ids if pk in keys]
        job.retryable = can_act and retryable_by_hand(job, build)
    return jobs


def job_facts(jobs: list[Job]) -> list[graphs.JobFacts]:
    """The latest attempt of each step as the graph and the timeline take it (`jobs` from build_jobs)."""
    keys = {job.pk: job.step_key for job in jobs}  # older attempts too: an edge may still name one
    return [
        graphs.JobFacts(
            id=str(job.pk), key=job.step_key, label=with_emoji(job.name or job.step_key),
            state=job.state, position=job.position,
            edges={keys[edge.prerequisite_id]: edge.kind for edge in job.prerequisite_edges.all()
                   if edge.prerequisite_id in keys},
            prerequisites=tuple(keys[pk] for pk in job.prerequisite_ids if pk in keys),
            segment=job.segment, after_segment=job.after_segment,
            scheduled_at=job.scheduled_at, started_at=job.started_at, finished_at=job.finished_at)
        for job in jobs if not job.retried
    ]


def build_status(build: Build, jobs: list[Job], now: datetime, *, can_act: bool = True) -> dict[str, Any]:
    """What the page's poll needs to redraw states: the build, each job and the timeline's bars, no log content.

    `can_act`: a member looks (a visitor of a public pipeline is offered no Cancel or Retry).
    """
    return {
        "timeline": graphs.timeline_geometry(graphs.timeline(job_facts(jobs), now)),
        "build": {
            "number": build.number, "state": build.state, "error_code": build.error_code,
            "error_message": build.error_message, "waiting_reason": build.waiting_reason,
            "duration": format_duration(duration_seconds(build, now)),
            "finished": build.finished_at is not None,
            "cancelable": can_act and build.state not in TERMINAL_BUILD_STATES,
        },
        "jobs": [
            {"id": str(job.pk), "state": job.state, "exit_code": job.exit_code, "error_code": job.error_code,
             "error_message": job.error_message, "duration": format_duration(duration_seconds(job, now)),
             "finished": job.state in TERMINAL_JOB_STATES, "attempt": job.attempt, "retried": job.retried,
             "soft_failed": job.soft_failed, "retryable": can_act and retryable_by_hand(job, build),
             "waiting_reason": job.waiting_reason}
            for job in jobs
        ],
    }


# ---------------------------------------------------------------- the pipeline list and build history


@login_required
def pipeline_list(request: HttpRequest, org: str) -> HttpResponse:
    """The organization's pipelines, each with its latest build, in two queries however many there are."""
    page = org_page(request, org)
    latest = Build.objects.filter(pipeline=OuterRef("pk")).order_by("-number").values("id")[:1]
    pipelines = list(
        Pipeline.objects.for_org(page.org).defer("definition", "triggers")
        .annotate(latest_build_id=Subquery(latest)).order_by("name", "id")
    )
    # The subquery walks the unique (pipeline, number) index backwards: one row per pipeline.
    ids = [p.latest_build_id for p in pipelines if p.latest_build_id]
    builds = Build.objects.only("id", "number", "state", "branch", "created_at", "started_at",
                                "finished_at").in_bulk(ids) if ids else {}
    for pipeline in pipelines:
        pipeline.latest_build = builds.get(pipeline.latest_build_id)
    return render(request, "builds/pipelines.html", page.context(pipelines=pipelines))


class NewBuildForm(forms.Form):
    branch = forms.CharField(max_length=255)
    commit = forms.CharField(max_length=255, help_text="A commit SHA, or HEAD for the branch's tip.")
    message = forms.CharField(max_length=1000, required=False)


@dataclass(frozen=True)
class HistoryPage:
    builds: list[Build]
    older_query: str | None  # query string of the next (older) page, filters kept
    newest_query: str | None  # query string of the first page, when this is not the first


def _page_size(params: QueryDict) -> int:
    raw = params.get("limit", "")
    if raw.isdigit() and 1 <= int(raw) <= MAX_PAGE_SIZE:
        return int(raw)
    return HISTORY_PAGE_SIZE


def history_page(params: QueryDict, builds: QuerySet[Build]) -> HistoryPage:
    """One keyset page, newest first, as `harmont.pagination` does for the API (never OFFSET).

    The cursor is the last build number shown; the next page is `number < cursor`,
    answered by the (pipeline, number) index (or the branch/state indexes when
    filtered), so page 400 costs what page 1 costs. Raises ApiError(invalid_cursor).
    """
    size = _page_size(params)
    cursor = params.get("cursor")
    if cursor:
        builds = builds.filter(number__lt=decode_cursor(cursor))
    rows = list(builds.order_by("-number")[: size + 1])
    older = None
    if len(rows) > size:
        rows = rows[:size]
        following = params.copy()
        following["cursor"] = encode_cursor(rows[-1].number)
        older = following.urlencode()
    newest = None
    if cursor:
        first = params.copy()
        del first["cursor"]
        newest = first.urlencode()
    return HistoryPage(rows, older, newest)


@members_or_public
def pipeline_history(request: HttpRequest, org: str, pipeline: str) -> HttpResponse:
    """Build history (GET; a public pipeline's for anyone) and the "New build" form (POST, members → the
    same service as the API)."""
    viewer, pipe = viewed_pipeline(request, org, pipeline)
    form = NewBuildForm(initial={"branch": pipe.default_branch, "commit": "HEAD"})
    status = 200
    if request.method == "POST":
        page = viewer.page
        if page is None:  # a visitor of a public pipeline
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            raise PermissionDenied("Only members of the organization start builds.")
        form = NewBuildForm(request.POST)
        if form.is_valid():
            try:
                build = services.create_build(
                    pipeline=pipe, created_by=request.user,  # type: ignore[arg-type]
                    creator_role=page.membership.role,
                    request=services.validate_build_request(
                        branch=form.cleaned_data["branch"], commit=form.cleaned_data["commit"],
                        message=form.cleaned_data["message"] or None, source=BuildSource.UI))
                return redirect(build_url(build))
            except ApiError as exc:
                if isinstance(exc, BuildPlanRejected):
                    # The service recorded the attempt as a failed build; show it like any other.
                    return redirect(build_url(exc.build))
                form.add_error(None, exc.message)
                for name, errors in (exc.fields or {}).items():
                    form.add_error(name if name in form.fields else None, errors)
                status = exc.status
        else:
            status = 422
    return _history_response(request, viewer, pipe, form=form, status=status)


def _history_response(request: HttpRequest, viewer: Viewer, pipe: Pipeline, *, form: NewBuildForm,
                      schedule_form: "ScheduleForm | None" = None, status: int = 200) -> HttpResponse:
    history = _history(request, pipe)
    if history["invalid_filter"] and status == 200:
        status = 400
    # A visitor of a public pipeline sees its builds, not how it is run.
    schedules = list(schedule_services.list_schedules(pipeline=pipe)) if viewer.is_member else []
    schedule_form = schedule_form or ScheduleForm(initial={"branch": pipe.default_branch, "commit": "HEAD",
                                                           "timezone": "UTC"})
    return render(request, "builds/history.html", viewer.context(
        pipeline=pipe, form=form, schedules=schedules, schedule_form=schedule_form,
        trends=trends.pipeline_trends(pipe), test_failures=pipeline_test_failures(pipe), **history), status=status)


# ---------------------------------------------------------------- schedules (the pipeline page's section)


class ScheduleForm(forms.Form):
    cron = forms.CharField(max_length=100, help_text="5 fields: minute hour day-of-month month day-of-week.")
    timezone = forms.CharField(max_length=64, initial="UTC", help_text="IANA name, e.g. Europe/Berlin.")
    branch = forms.CharField(max_length=255)
    commit = forms.CharField(max_length=255, initial="HEAD")
    message = forms.CharField(max_length=1000, required=False)


def _schedule_page(request: HttpRequest, org: str, pipeline: str) -> tuple[OrgPage, Pipeline]:
    """The pipeline of a schedule form: admins and owners only, as in the API."""
    page = org_page(request, org)
    pipe = Pipeline.objects.for_org(page.org).filter(slug=pipeline).first()
    if pipe is None:
        raise Http404(f"No pipeline {pipeline!r}.")
    if not page.is_admin:
        raise PermissionDenied(f"Only admins and owners of {page.org.name} manage schedules; your role is "
                               f"{page.membership.role}.")
    pipe.organization = page.org
    return page, pipe


@login_required
@require_POST
def schedule_create(request: HttpRequest, org: str, pipeline: str) -> HttpResponse:
    """The pipeline page's "New schedule" form; bad fields re-render the page (422) with their errors."""
    page, pipe = _schedule_page(request, org, pipeline)
    form = ScheduleForm(request.POST)
    if form.is_valid():
        data = form.cleaned_data
        try:
            schedule_services.create_schedule(pipeline=pipe, cron=data["cron"], timezone_name=data["timezone"],
                                              branch=data["branch"], commit=data["commit"],
                                              message=data["message"] or None,
                                              created_by=request.user)  # type: ignore[arg-type]
        except ApiError as exc:
            for name, errors in (exc.fields or {}).items():
                form.add_error(name if name in form.fields else None, errors)
        else:
            messages.success(request, f"Schedule “{data['cron']}” ({data['timezone']}) created.")
            return redirect("pipelines_ui:history", org=page.org.slug, pipeline=pipe.slug)
    return _history_response(request, Viewer(page.org, page), pipe,
                             form=NewBuildForm(initial={"branch": pipe.default_branch, "commit": "HEAD"}),
                             schedule_form=form, status=422)


def _page_schedule(pipe: Pipeline, schedule_id: uuid.UUID) -> Any:
    try:
        return schedule_services.get_schedule(pipeline=pipe, schedule_id=schedule_id)
    except ApiError as exc:  # schedule_not_found: a page's 404
        raise Http404(exc.message) from None


@login_required
@require_POST
def schedule_toggle(request: HttpRequest, org: str, pipeline: str, schedule_id: uuid.UUID) -> HttpResponse:
    """Enable a disabled schedule (its next run counted from now) or disable an enabled one."""
    page, pipe = _schedule_page(request, org, pipeline)
    schedule = _page_schedule(pipe, schedule_id)
    schedule_services.update_schedule(schedule=schedule, changes={"enabled": not schedule.enabled})
    messages.success(request, f"Schedule “{schedule.cron}” {'enabled' if schedule.enabled else 'disabled'}.")
    return redirect("pipelines_ui:history", org=page.org.slug, pipeline=pipe.slug)


@login_required
@require_POST
def schedule_delete(request: HttpRequest, org: str, pipeline: str, schedule_id: uuid.UUID) -> HttpResponse:
    page, pipe = _schedule_page(request, org, pipeline)
    schedule = _page_schedule(pipe, schedule_id)
    schedule_services.delete_schedule(schedule=schedule)
    messages.success(request, f"Schedule “{schedule.cron}” deleted; the builds it made stay.")
    return redirect("pipelines_ui:history", org=page.org.slug, pipeline=pipe.slug)


def _history(request: HttpRequest, pipe: Pipeline) -> dict[str, Any]:
    filtered = BuildFilter(request.GET, queryset=Build.objects.filter(pipeline=pipe))
    context: dict[str, Any] = {
        "states": BuildState.values,
        "branch": request.GET.get("branch", ""),
        "state": request.GET.get("state", ""),
        "filtered": any(request.GET.get(name) for name in BuildFilter.base_filters),
        "history": HistoryPage([], None, None),
        "filter_error": None,
        "invalid_filter": False,
    }
    if not filtered.is_valid():
        context["invalid_filter"] = True
        context["filter_error"] = "; ".join(f"{name}: {' '.join(msgs)}" for name, msgs in filtered.errors.items())
        return context
    try:
        history = history_page(request.GET, filtered.qs.select_related("created_by").only(*HISTORY_FIELDS))
    except ApiError:
        context["filter_error"] = "This page link is no longer valid; showing the newest builds."
        history = history_page(QueryDict(), filtered.qs.select_related("created_by").only(*HISTORY_FIELDS))
    for build in history.builds:
        build.pipeline = pipe  # known already: saves a join per row
    context["history"] = history
    return context


# ---------------------------------------------------------------- the build page


@require_GET
def build_link(request: HttpRequest, org: str, pipeline: str, number: int) -> HttpResponse:
    """`/{org}/pipelines/{pipeline}/builds/{n}`, the link the hm CLI prints, is the build page.

    Only the path is rewritten (no query), so the build page alone decides who may see
    it: signed-out people sign in there and come back.
    """
    return redirect(reverse("builds_ui:build", args=[org, pipeline, number]))


@members_or_public
@require_GET
def build_detail(request: HttpRequest, org: str, pipeline: str, number: int) -> HttpResponse:
    """The build page: a member's, with its controls, or a public pipeline's, read-only, for anyone."""
    viewer, build = viewed_build(request, org, pipeline, number)
    jobs = job_rows(build, can_act=viewer.is_member)
    base = build_url(build)
    artifacts = list(Artifact.objects.filter(build=build).only("id", "job_id", "path", "size")
                     .order_by("created_at", "id")[:ARTIFACTS_ON_PAGE + 1])
    step_keys = {job.pk: job.step_key for job in jobs}
    for artifact in artifacts:
        artifact.step_key = step_keys.get(artifact.job_id, "")
    facts = job_facts(jobs)
    return render(request, "builds/build.html", viewer.context(
        pipeline=build.pipeline, build=build, jobs=jobs,
        test_results=build_test_results(build, jobs=jobs, has_artifacts=bool(artifacts)),
        graph=graphs.job_graph(facts), timeline=graphs.timeline(facts, timezone.now()),
        artifacts=artifacts[:ARTIFACTS_ON_PAGE], more_artifacts=len(artifacts) > ARTIFACTS_ON_PAGE,
        cancelable=viewer.is_member and build.state not in TERMINAL_BUILD_STATES,
        approvable=build.state == BuildState.HELD and viewer.page is not None and viewer.page.is_admin,
        page_config={
            "statusUrl": f"{base}/status.json", "logTokenUrl": f"{base}/log-token.json",
            # The SSE route lives outside /api (EventSource can't send headers); see harmont/urls.py.
            "streamUrl": "/v0/jobs/{job_id}/logs",
            "finished": build.finished_at is not None,
        },
    ))


@members_or_public_json
@require_GET
@never_cache
def build_status_json(request: HttpRequest, org: str, pipeline: str, number: int) -> JsonResponse:
    """Polled by the build page every ~2 s: membership, build, jobs, their edges; four queries however many
    jobs (two more, for the waiting reasons, while some job is scheduled; a visitor's, one fewer)."""
    viewer, build = viewed_build(request, org, pipeline, number)
    jobs = with_waiting_reasons(build_jobs(build, fields=STATUS_JOB_FIELDS, include_retried=True),
                                organization_id=build.pipeline.organization_id)
    return JsonResponse(build_status(build, jobs, timezone.now(), can_act=viewer.is_member))


@members_or_public_json
@require_GET
@never_cache
def build_log_token_json(request: HttpRequest, org: str, pipeline: str, number: int) -> JsonResponse:
    """A log token for the build's streams (what `GET .../log-token` gives API clients); a public
    pipeline's for anyone, as its logs are."""
    _, build = viewed_build(request, org, pipeline, number)
    minted = mint_log_token(build_id=build.id)
    return JsonResponse({"token": minted.token, "expires_at": minted.expires_at.isoformat().replace("+00:00", "Z")})


@login_required
@require_POST
def build_cancel(request: HttpRequest, org: str, pipeline: str, number: int) -> HttpResponse:
    """The Cancel button: any member may cancel, as in the API (`PUT .../cancel`)."""
    page = org_page(request, org)
    build = page_build(page, pipeline, number)
    try:
        services.cancel_build(build=build)
    except ApiError as exc:  # already finished (409): say so on the page
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Build #{build.number} canceled.")
    return redirect(build_url(build))


@login_required
@require_POST
def build_approve(request: HttpRequest, org: str, pipeline: str, number: int) -> HttpResponse:
    """The Approve button of a held build: admins and owners, as in the API (`POST .../approve`)."""
    page = org_page(request, org)
    if not page.is_admin:
        raise PermissionDenied(f"Only admins and owners of {page.org.name} approve builds; your role is "
                               f"{page.membership.role}.")
    build = page_build(page, pipeline, number)
    try:
        services.approve_build(build=build, approved_by=request.user)  # type: ignore[arg-type]
    except ApiError as exc:  # nothing held any more (409): say so on the page
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Build #{build.number} approved; agents may now run its jobs.")
    return redirect(build_url(build))


@login_required
@require_POST
def build_rebuild(request: HttpRequest, org: str, pipeline: str, number: int) -> HttpResponse:
    """The Rebuild button: any member, as in the API (`POST .../rebuild`); opens the new build."""
    page = org_page(request, org)
    build = page_build(page, pipeline, number)
    try:
        rebuilt = services.rebuild_build(build=build, created_by=request.user,  # type: ignore[arg-type]
                                         creator_role=page.membership.role, source=BuildSource.UI)
    except ApiError as exc:  # its plan was rejected again: the new build exists, failed; say why there
        messages.error(request, exc.message)
        return redirect(build_url(exc.build if isinstance(exc, BuildPlanRejected) else build))
    messages.success(request, f"Build #{rebuilt.number} rebuilds #{build.number}.")
    return redirect(build_url(rebuilt))


@login_required
@require_POST
def job_retry(request: HttpRequest, org: str, pipeline: str, number: int, job_id: uuid.UUID) -> HttpResponse:
    """A job's Retry button: any member may retry, as in the API (`POST .../jobs/<id>/retry`)."""
    page = org_page(request, org)
    build = page_build(page, pipeline, number)
    job = Job.objects.filter(build=build, pk=job_id).only("id", "build_id", "step_key").first()
    if job is None:
        raise Http404(f"No job {job_id} in build #{build.number}.")
    try:
        new = services.retry_job(job=job)
    except ApiError as exc:  # not retryable (409): say so on the page
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Retrying {job.step_key}: attempt {new.attempt}.")
    return redirect(build_url(build))


@members_or_public
@require_GET
def job_raw_log(request: HttpRequest, org: str, pipeline: str, number: int, job_id: uuid.UUID) -> HttpResponse:
    """The whole log as text/plain, like `GET /api/v0/.../jobs/<id>/log` but for a browser (a member's,
    or anyone's for a public pipeline)."""
    _, build = viewed_build(request, org, pipeline, number)
    job = Job.objects.filter(build=build, pk=job_id).only("id", "log_bytes").first()
    if job is None:
        raise Http404(f"No job {job_id} in build #{build.number}.")
    return raw_log_response(job, request.headers.get("Range"))


@members_or_public
@require_GET
def artifact_download(request: HttpRequest, org: str, pipeline: str, number: int,
                      artifact_id: uuid.UUID) -> HttpResponse:
    """An artifact's bytes, like `GET /api/v0/.../artifacts/<id>/download` but for a browser (a member's,
    or anyone's for a public pipeline)."""
    _, build = viewed_build(request, org, pipeline, number)
    artifact = find_artifact(build=build, artifact_id=artifact_id)
    if artifact is None:
        raise Http404(f"No artifact {artifact_id} in build #{build.number}.")
    return artifact_response(artifact)


# ---------------------------------------------------------------- agents and agent tokens (admins)


class AgentTokenForm(forms.Form):
    description = forms.CharField(max_length=255, required=False,
                                  help_text="Where the agents using this token run, e.g. “build box 1”.")


def _agents_page(request: HttpRequest, page: OrgPage, *, form: AgentTokenForm,
                 created: org_services.IssuedAgentToken | None = None, status: int = 200) -> HttpResponse:
    agents = recent_agents(page.org, now=timezone.now())
    tokens = AgentToken.objects.filter(organization=page.org, revoked_at__isnull=True).select_related(
        "created_by").order_by("-created_at")
    return render(request, "builds/agents.html", page.context(agents=agents, tokens=tokens, form=form,
                                                              created=created), status=status)


@login_required
def agents(request: HttpRequest, org: str) -> HttpResponse:
    """Agents seen in the last day and the organization's agent tokens; POST creates a token (shown once)."""
    page = admin_org_page(request, org, action="manage agents")
    if request.method != "POST":
        return _agents_page(request, page, form=AgentTokenForm())
    form = AgentTokenForm(request.POST)
    if not form.is_valid():
        return _agents_page(request, page, form=form, status=422)
    issued = org_services.create_agent_token(organization=page.org, created_by=request.user,  # type: ignore[arg-type]
                                             description=form.cleaned_data["description"])
    return _agents_page(request, page, form=AgentTokenForm(), created=issued)


@login_required
@require_POST
def revoke_agent_token(request: HttpRequest, org: str, token_id: uuid.UUID) -> HttpResponse:
    page = admin_org_page(request, org, action="manage agents")
    token = AgentToken.objects.filter(organization=page.org, pk=token_id).first()
    if token is None:
        raise Http404("No such agent token.")
    org_services.revoke_agent_token(token=token)
    messages.success(request, f"Revoked the agent token “{token.description or token.pk}”; its agents stop at "
                              "their next request.")
    return redirect("builds_ui:agents", org=page.org.slug)

