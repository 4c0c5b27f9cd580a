"""Build and job endpoints (the seed's Builds API and the Jobs API)."""

from __future__ import annotations

import re
from functools import cached_property
from typing import Any

from django.conf import settings
from django.db.models import Subquery
from django.http import FileResponse, HttpResponse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings

from builds import selectors, services
from builds.filters import BUILD_FILTERS, ArtifactFilter, BuildFilter
from builds.models import Artifact, Build, Job
from builds.responses import (
    SEARCH_DEFAULT_LIMIT,
    SEARCH_MAX_LIMIT,
    SEARCH_QUERY_MAX_CHARS,
    artifact_response,
    log_search_response,
    parse_log_search,
    raw_log_head,
    raw_log_response,
)
from builds.serializers import (
    BUILD_COLUMNS,
    AgentListSerializer,
    AgentStatusSerializer,
    ArtifactListSerializer,
    ArtifactSerializer,
    BuildListSerializer,
    BuildSerializer,
    CreateBuildRequestSerializer,
    CreateRepoBuildRequestSerializer,
    JobListSerializer,
    JobLogMatchListSerializer,
    JobSerializer,
    LogTokenResponseSerializer,
    build_list_data,
    build_row_data,
)
from harmont.errors import ApiError
from harmont.logtokens import mint_log_token
from harmont.pagination import Page, page_of, page_window, paginate, paginate_by_creation, paginate_by_keys
from harmont.serializers import ErrorSerializer, filtered, json_object
from organizations.access import OrgScopedView, membership_for
from organizations.idempotency import IDEMPOTENCY_KEY_HEADER, IDEMPOTENCY_RESPONSES, idempotent
from organizations.models import Membership, Role
from pipelines.api import PAGE_PARAMS, get_pipeline
from pipelines.models import Pipeline

# Leading zeros are dropped before the (at most 10) significant digits reach int().
BUILD_NUMBER = re.compile(r"\+?0*([0-9]{1,10})")
BUILD_REQUEST_FIELDS = ("branch", "commit", "message", "source", "env", "pipeline_ir", "source_b64",
                        "source_url", "source_sha256")
FILTER_PARAMS = [
    OpenApiParameter("branch", str), OpenApiParameter("state", str), OpenApiParameter("commit", str),
    OpenApiParameter("source", str),
    OpenApiParameter("created_after", str, description="ISO-8601; builds created at or after."),
    OpenApiParameter("created_before", str, description="ISO-8601; builds created before."),
]


def build_request_from(body: dict[str, Any], *, also_required: tuple[str, ...] = ()) -> services.BuildRequest:
    return services.validate_build_request(
        **{name: body.get(name) for name in BUILD_REQUEST_FIELDS},
        also_required={name: body.get(name) for name in also_required},
    )


class BuildScopedView(OrgScopedView):
    """Resolves `self.build` and the caller's membership from org/pipeline/number in one query.

    The build is found through the caller's membership of its organization, so
    the hot path (GET build, its jobs, its log) costs one query after
    authentication. Only a miss pays for the lookups that say what was missing.
    """

    @cached_property
    def build(self) -> Build:
        number_raw: str = self.kwargs["number"]
        # ASCII digits only: str.isdigit() also accepts "²" (which int() refuses) and other
        # scripts' digits, and a looser strip let "++1" reach int(); both were 500s.
        match = BUILD_NUMBER.fullmatch(number_raw)
        number = int(match[1]) if match else None
        build = None
        if number is not None:
            build = selectors.scoped_build(org_slug=self.kwargs["org"], pipeline_slug=self.kwargs["pipeline"],
                                           number=number, user=self.request.user)
        if build is None:
            # Say what is missing, in order: the organization, the pipeline, the build.
            membership = membership_for(self.request.user, self.kwargs["org"])
            pipeline = get_pipeline(membership.organization, self.kwargs["pipeline"])
            raise ApiError("build_not_found", f"No build {number_raw} in pipeline {pipeline.slug}.")
        return build

    @cached_property
    def membership(self) -> Membership:
        build = self.build
        return Membership(organization=build.pipeline.organization, user=self.request.user,
                          role=build.caller_role)


class PipelineBuildsView(OrgScopedView):
    body_limit = "MAX_BUILD_REQUEST_BYTES"  # source_b64 rides in the create

    @extend_schema(operation_id="listBuilds", tags=["builds"], parameters=PAGE_PARAMS + FILTER_PARAMS,
                   responses={200: BuildListSerializer, 400: ErrorSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str, pipeline: str) -> Response:
        # The pipeline is found by the page's own query, and looked up alone only when the page is
        # empty, to tell "no such pipeline" from "no builds": one query less on every list.
        if BUILD_FILTERS.isdisjoint(request.query_params):
            page = self.unfiltered_page(request, pipeline)
        else:
            page = self.filtered_page(request, pipeline)
        if not page.items:
            get_pipeline(self.org, pipeline)  # raises pipeline_not_found
        return Response({"data": page.items, "next_cursor": page.next_cursor})

    def unfiltered_page(self, request: Request, pipeline: str) -> Page[dict[str, Any]]:
        # Raw SQL (builds.sql.pipeline_builds): the ORM's query building and its per-timestamp
        # conversions were most of this list's CPU. The current time zone is UTC (TIME_ZONE), the
        # zone the statement formats the times in.
        limit, after = page_window(request)
        read = selectors.pipeline_builds(org=self.org, pipeline_slug=pipeline, before=after, limit=limit + 1,
                                         columns=BUILD_COLUMNS, time_format=api_settings.DATETIME_FORMAT)
        return page_of(build_list_data(read, pipeline), limit=limit, key="number")

    def filtered_page(self, request: Request, pipeline: str) -> Page[dict[str, Any]]:
        # The FilterSet's queryset, over the same scalar subquery as the unfiltered page's SQL.
        pipeline_id = Pipeline.objects.for_org(self.org).filter(slug=pipeline).values("id")[:1]
        builds = filtered(BuildFilter(request.query_params, queryset=Build.objects.filter(
            pipeline_id=Subquery(pipeline_id))))
        page = paginate(request, builds.values(*BUILD_COLUMNS), key="number", descending=True)
        tz = timezone.get_current_timezone()
        return Page([build_row_data(row, pipeline, tz) for row in page.items], page.next_cursor)

    @extend_schema(operation_id="createBuild", tags=["builds"], request=CreateBuildRequestSerializer,
                   parameters=[IDEMPOTENCY_KEY_HEADER],
                   responses={201: BuildSerializer, 403: ErrorSerializer, 404: ErrorSerializer,
                              422: ErrorSerializer, **IDEMPOTENCY_RESPONSES})
    @idempotent
    def post(self, request: Request, org: str, pipeline: str) -> Response:
        pipe = get_pipeline(self.org, pipeline)
        build = services.create_build(pipeline=pipe, request=build_request_from(json_object(request)),
                                      created_by=request.user, creator_role=self.membership.role)
        return Response(BuildSerializer(build).data, status=status.HTTP_201_CREATED)


class RepoBuildsView(OrgScopedView):
    body_limit = "MAX_BUILD_REQUEST_BYTES"

    @extend_schema(operation_id="createBuildBySource", tags=["builds"], request=CreateRepoBuildRequestSerializer,
                   parameters=[IDEMPOTENCY_KEY_HEADER],
                   responses={201: BuildSerializer, 403: ErrorSerializer, 404: ErrorSerializer,
                              422: ErrorSerializer, **IDEMPOTENCY_RESPONSES})
    @idempotent
    def post(self, request: Request, org: str) -> Response:
        body = json_object(request)
        build_request = build_request_from(body, also_required=("repo_name", "source_slug"))
        pipe = services.find_pipeline_by_repo(org=self.org, repo_name=body["repo_name"],
                                              source_slug=body["source_slug"])
        build = services.create_build(pipeline=pipe, request=build_request, created_by=request.user,
                                      creator_role=self.membership.role)
        return Response(BuildSerializer(build).data, status=status.HTTP_201_CREATED)


class BuildDetailView(BuildScopedView):
    @extend_schema(operation_id="getBuild", tags=["builds"], responses={200: BuildSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str, pipeline: str, number: str) -> Response:
        return Response(BuildSerializer(self.build).data)


class BuildCancelView(BuildScopedView):
    @extend_schema(operation_id="cancelBuild", tags=["builds"], request=None,
                   responses={200: BuildSerializer, 404: ErrorSerializer, 409: ErrorSerializer})
    def put(self, request: Request, org: str, pipeline: str, number: str) -> Response:
        return Response(BuildSerializer(services.cancel_build(build=self.build)).data)


class BuildApproveView(BuildScopedView):
    required_role = {"POST": Role.ADMIN}
    role_action = "approve builds"

    @extend_schema(operation_id="approveBuild", tags=["builds"], request=None,
                   responses={200: BuildSerializer, 403: ErrorSerializer, 404: ErrorSerializer,
                              409: ErrorSerializer})
    def post(self, request: Request, org: str, pipeline: str, number: str) -> Response:
        """Let agents take a held build's jobs (a pull request from a fork, `fork_pull_requests: require_approval`)."""
        return Response(BuildSerializer(services.approve_build(build=self.build, approved_by=request.user)).data)


class BuildRebuildView(BuildScopedView):
    @extend_schema(operation_id="rebuildBuild", tags=["builds"], request=None, parameters=[IDEMPOTENCY_KEY_HEADER],
                   responses={201: BuildSerializer, 404: ErrorSerializer, 422: ErrorSerializer,
                              **IDEMPOTENCY_RESPONSES})
    @idempotent
    def post(self, request: Request, org: str, pipeline: str, number: str) -> Response:
        """A new build with this one's branch, commit, message, env, IR and uploaded source (`rebuild_of`: its number)."""
        build = services.rebuild_build(build=self.build, created_by=request.user, creator_role=self.membership.role)
        return Response(BuildSerializer(build).data, status=status.HTTP_201_CREATED)


class BuildLogTokenView(BuildScopedView):
    @extend_schema(operation_id="getBuildLogToken", tags=["builds"],
                   responses={200: LogTokenResponseSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str, pipeline: str, number: str) -> Response:
        minted = mint_log_token(build_id=self.build.id)
        return Response(LogTokenResponseSerializer({"token": minted.token, "expires_at": minted.expires_at}).data)


INCLUDE_RETRIED = OpenApiParameter(
    "include_retried", OpenApiTypes.BOOL,
    description="`true`: also the older attempts of retried steps, each just before the attempt that retried it.")


def include_retried(request: Request) -> bool:
    raw = request.query_params.get("include_retried")
    if raw in (None, "", "false", "0"):
        return False
    if raw in ("true", "1"):
        return True
    raise ApiError("invalid_filter", "Invalid filter: include_retried.",
                   fields={"include_retried": ["Must be true or false."]})


class JobListView(BuildScopedView):
    @extend_schema(operation_id="listJobs", tags=["jobs"], parameters=[INCLUDE_RETRIED],
                   responses={200: JobListSerializer, 400: ErrorSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str, pipeline: str, number: str) -> Response:
        """The latest attempt of each step, in dependency order."""
        jobs = selectors.with_waiting_reasons(selectors.build_jobs(self.build, include_retried=include_retried(request)),
                                              organization_id=self.build.pipeline.organization_id)
        return Response({"data": JobSerializer(jobs, many=True).data})


class JobDetailView(BuildScopedView):
    @extend_schema(operation_id="getJob", tags=["jobs"], responses={200: JobSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str, pipeline: str, number: str, job_id: str) -> Response:
        job = selectors.build_job(self.build, job_id)
        if job is None:
            raise ApiError("job_not_found", f"No job {job_id} in build #{self.build.number}.")
        selectors.with_waiting_reasons([job], organization_id=self.build.pipeline.organization_id)
        return Response(JobSerializer(job).data)



class JobRetryView(BuildScopedView):
    # Members may retry, as they may cancel.

    @extend_schema(operation_id="retryJob", tags=["jobs"], request=None,
                   responses={201: JobSerializer, 404: ErrorSerializer, 409: ErrorSerializer})
    def post(self, request: Request, org: str, pipeline: str, number: str, job_id: str) -> Response:
        """A new attempt of a failed, timed-out or canceled job's step; its skipped dependents wait for it again."""
        job = selectors.find_job(build=self.build, job_id=job_id, fields=("id", "build_id"))
        if job is None:
            raise ApiError("job_not_found", f"No job {job_id} in build #{self.build.number}.")
        new = selectors.build_job(self.build, services.retry_job(job=job).pk)
        return Response(JobSerializer(new).data, status=status.HTTP_201_CREATED)


class PlainTextRenderer(BaseRenderer):
    media_type = "text/plain"
    format = "txt"
    charset = "utf-8"

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: dict | None = None) -> Any:
        return data


class JobLogView(BuildScopedView):
    """The whole stored log of a job as plain text (all streams, in order), or the lines matching `q`."""

    # Errors still leave as the JSON envelope; a successful answer is text (or, for `q`, JSON).
    renderer_classes = [JSONRenderer, PlainTextRenderer]

    def job(self, job_id: str) -> Job:
        job = selectors.find_job(build=self.build, job_id=job_id, fields=("id", "log_bytes"))
        if job is None:
            raise ApiError("job_not_found", f"No job {job_id} in build #{self.build.number}.")
        return job

    @extend_schema(
        operation_id="getJobLog", tags=["jobs"],
        parameters=[
            OpenApiParameter("Range", str, OpenApiParameter.HEADER,
                             description="`bytes=-N`: only the last N bytes (206). Not together with `q` (422)."),
            OpenApiParameter("q", str, description=(
                "Search instead: the lines containing this plain substring (not a pattern), case-insensitive, "
                f"matched with ANSI escape sequences removed; 1 to {SEARCH_QUERY_MAX_CHARS} characters without a "
                "line break (else 422). The answer is then JSON.")),
            OpenApiParameter("limit", int, description=(
                f"With `q`: at most this many matching lines, 1 to {SEARCH_MAX_LIMIT} (default "
                f"{SEARCH_DEFAULT_LIMIT}; else 400 `invalid_limit`). Ignored without `q`.")),
        ],
        responses={(200, "text/plain"): str, (200, "application/json"): JobLogMatchListSerializer,
                   (206, "text/plain"): str, 400: ErrorSerializer, 404: ErrorSerializer, 422: ErrorSerializer})
    def get(self, request: Request, org: str, pipeline: str, number: str, job_id: str) -> HttpResponse:
        """The raw log (`text/plain`), its tail for `Range: bytes=-N` (206), or with `q` the lines containing `q`.

        A search answers `{"data": [{"line": 12, "text": "..."}], "truncated": false}`: the matching
        lines in order, each with its 1-based number and its text as stored (escape sequences kept,
        the line end dropped, cut to 4,096 characters); at most `limit` of them, `truncated` saying
        whether more follow. Lines end at a line feed, as `grep -n` counts them and the build page
        numbers them, so `line` is the page's `#job-<id>-L<line>`. One JSON object rather than JSON
        lines: it has the shape of this API's lists, any JSON client reads it in one call, and a
        connection cut midway leaves invalid JSON instead of what looks like a shorter complete
        answer. It is still written as the log is read, piece by piece (builds.responses), and the
        reading stops once the limit is passed.
        """
        job = self.job(job_id)
        search = parse_log_search(request.query_params, request.headers.get("Range"))
        if search is not None:
            return log_search_response(job, search)
        return raw_log_response(job, request.headers.get("Range"))

    @extend_schema(exclude=True)
    def head(self, request: Request, org: str, pipeline: str, number: str, job_id: str) -> HttpResponse:
        return raw_log_head(self.job(job_id))


class AgentListView(OrgScopedView):
    @extend_schema(operation_id="listAgents", tags=["agents"], parameters=PAGE_PARAMS,
                   responses={200: AgentListSerializer, 400: ErrorSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str) -> Response:
        """Agents seen in the last day, newest registered first, with what each is running."""
        now = timezone.now()
        # Paged by registration, which never changes: by last-seen time, which every heartbeat moves,
        # an agent seen between two pages would jump ahead of the cursor and be left out.
        page = paginate_by_keys(request, selectors.recent_agents_query(self.org, now=now),
                                keys=("created_at", "pk"), descending=True)
        return Response({"data": AgentStatusSerializer(selectors.with_status(page.items, now=now), many=True).data,
                         "next_cursor": page.next_cursor})


# ------------------------------------------------------------------ artifacts


def build_api_url(build: Build) -> str:
    """The build's absolute API URL (`build` loaded by BuildScopedView, with its pipeline and organization)."""
    return (f"{settings.PUBLIC_URL}/api/v0/organizations/{build.pipeline.organization.slug}/pipelines/"
            f"{build.pipeline.slug}/builds/{build.number}")


class ArtifactListView(BuildScopedView):
    @extend_schema(operation_id="listArtifacts", tags=["artifacts"],
                   parameters=PAGE_PARAMS + [OpenApiParameter("job_id", OpenApiTypes.UUID,
                                                              description="Only this job's artifacts.")],
                   responses={200: ArtifactListSerializer, 400: ErrorSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str, pipeline: str, number: str) -> Response:
        """The files the build's jobs stored, oldest first."""
        artifacts = filtered(ArtifactFilter(request.query_params, queryset=Artifact.objects.filter(build=self.build)))
        page = paginate_by_creation(request, artifacts)
        context = {"build_url": build_api_url(self.build)}
        return Response({"data": ArtifactSerializer(page.items, many=True, context=context).data,
                         "next_cursor": page.next_cursor})


class ArtifactDownloadView(BuildScopedView):
    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        # The answer is the file whatever the client accepts; errors are the JSON envelope.
        return super().perform_content_negotiation(request, force=True)

    @extend_schema(operation_id="downloadArtifact", tags=["artifacts"],
                   # Served as the type its name suggests (text/plain, image/png, ...), octet-stream if none.
                   responses={(200, "*/*"): OpenApiTypes.BINARY, 404: ErrorSerializer})
    def get(self, request: Request, org: str, pipeline: str, number: str, artifact_id: str) -> FileResponse:
        """The artifact's bytes, as an attachment named after the file."""
        artifact = selectors.find_artifact(build=self.build, artifact_id=artifact_id)
        if artifact is None:
            raise ApiError("artifact_not_found", f"No artifact {artifact_id} in build #{self.build.number}.")
        return artifact_response(artifact)
