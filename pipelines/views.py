"""HTML pages for pipelines: an organization's pipelines, and one pipeline's build history."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django import forms
from django.contrib.auth.decorators import login_required
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import Http404, HttpRequest, HttpResponse, QueryDict
from django.shortcuts import redirect, render

from builds import services as build_services
from builds.filters import BuildFilter
from builds.models import Build, BuildSource, BuildState
from builds.views import build_url
from harmont.errors import ApiError
from harmont.pagination import decode_cursor, encode_cursor
from organizations.views import org_page
from pipelines.models import Pipeline

HISTORY_PAGE_SIZE = 25
MAX_PAGE_SIZE = 100
# Everything a history row shows; the IR and env of a build can be large and are not shown.
HISTORY_FIELDS = ("id", "pipeline", "number", "state", "branch", "commit", "message", "source", "error_code",
                  "created_by__email", "created_at", "started_at", "finished_at")


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
    return render(request, "pipelines/list.html", page.context(pipelines=pipelines))


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


@login_required
def pipeline_history(request: HttpRequest, org: str, pipeline: str) -> HttpResponse:
    """Build history (GET) and the "New build" form (POST → the same service as the API)."""
    page = org_page(request, org)
    pipe = Pipeline.objects.for_org(page.org).filter(slug=pipeline).first()
    if pipe is None:
        raise Http404(f"No pipeline {pipeline!r}.")
    pipe.organization = page.org
    form = NewBuildForm(initial={"branch": pipe.default_branch, "commit": "HEAD"})
    status = 200
    if request.method == "POST":
        form = NewBuildForm(request.POST)
        if form.is_valid():
            try:
                build = build_services.create_build(
                    pipeline=pipe, created_by=request.user,  # type: ignore[arg-type]
                    request=build_services.validate_build_request(
                        branch=form.cleaned_data["branch"], commit=form.cleaned_data["commit"],
                        message=form.cleaned_data["message"] or None, source=BuildSource.UI))
                return redirect(build_url(build))
            except ApiError as exc:
                if exc.code == "build_plan_rejected":
                    # The service recorded the attempt as a failed build; show it like any other.
                    failed = Build.objects.filter(pipeline=pipe, created_by=request.user,
                                                  source=BuildSource.UI).order_by("-number").first()
                    if failed is not None:
                        failed.pipeline = pipe
                        return redirect(build_url(failed))
                form.add_error(None, exc.message)
                for name, messages in (exc.fields or {}).items():
                    form.add_error(name if name in form.fields else None, messages)
                status = exc.status
        else:
            status = 422
    history = _history(request, pipe)
    if history["invalid_filter"] and status == 200:
        status = 400
    return render(request, "pipelines/history.html", page.context(pipeline=pipe, form=form, **history), status=status)


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
