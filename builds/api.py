"""Build and job endpoints (the seed's Builds API and the Jobs API)."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from functools import cached_property
from typing import Any

from django.conf import settings
from django.db.models import F, Prefetch
from django.http import HttpResponse
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from builds import services
from builds.filters import BuildFilter
from builds.logs import raw_log_head, raw_log_response
from builds.models import Agent, Build, Job, JobDependency
from builds.services.jobs import ACTIVE_STATES
from builds.serializers import (
    AgentListSerializer,
    AgentStatusSerializer,
    BuildListSerializer,
    BuildSerializer,
    CreateBuildRequestSerializer,
    CreateRepoBuildRequestSerializer,
    JobListSerializer,
    JobSerializer,
    LogTokenResponseSerializer,
)
from harmont.errors import ApiError
from harmont.logtokens import mint_log_token
from harmont.pagination import paginate
from harmont.serializers import ErrorSerializer, json_object
from organizations.access import ORG_PERMISSIONS, OrgScopedMixin, membership_for
from organizations.models import Membership
from pipelines.api import PAGE_PARAMS, get_pipeline

# Leading zeros are dropped before the (at most 10) significant digits reach int().
BUILD_NUMBER = re.compile(r"\+?0*([0-9]{1,10})")
# What the Build serializer shows (plus what cancel and the log routes use).
BUILD_FIELDS = ("id", "number", "state", "branch", "commit", "message", "source", "error_code", "error_message",
                "created_at", "scheduled_at", "started_at", "finished_at", "cancel_requested_at", "pipeline_id")
BUILD_REQUEST_FIELDS = ("branch", "commit", "message", "source", "env", "pipeline_ir", "source_b64",
                        "source_url", "source_sha256")
AGENT_LIST_WINDOW = timedelta(days=1)
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


class BuildScopedMixin(OrgScopedMixin):
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
        if number is not None and number < 2**31:
            build = (
                # Only the columns a build-scoped route reads: compiling and loading every
                # column of three tables was most of this request's time.
                Build.objects.select_related("pipeline__organization")
                .only(*BUILD_FIELDS, "pipeline__slug", "pipeline__organization__slug")
                .filter(pipeline__organization__slug=self.kwargs["org"],
                        pipeline__organization__memberships__user=self.request.user,
                        pipeline__slug=self.kwargs["pipeline"], pipeline__archived_at__isnull=True, number=number)
                .annotate(caller_role=F("pipeline__organization__memberships__role"))
                .first()
            )
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


class PipelineBuildsView(OrgScopedMixin, APIView):
    permission_classes = ORG_PERMISSIONS

    @extend_schema(operation_id="listBuilds", tags=["builds"], parameters=PAGE_PARAMS + FILTER_PARAMS,
                   responses={200: BuildListSerializer, 400: ErrorSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str, pipeline: str) -> Response:
        pipe = get_pipeline(self.org, pipeline)
        filtered = BuildFilter(request.query_params, queryset=Build.objects.for_display().filter(pipeline=pipe))
        if not filtered.is_valid():
            fields = {name: [str(m) for m in msgs] for name, msgs in filtered.errors.items()}
            raise ApiError("invalid_filter", f"Invalid filter: {', '.join(sorted(fields))}.", fields=fields)
        page = paginate(request, filtered.qs, key="number", descending=True)
        for build in page.items:
            build.pipeline = pipe  # already known; saves a join
        return Response({"data": BuildSerializer(page.items, many=True).data, "next_cursor": page.next_cursor})

    @extend_schema(operation_id="createBuild", tags=["builds"], request=CreateBuildRequestSerializer,
                   responses={201: BuildSerializer, 403: ErrorSerializer, 404: ErrorSerializer,
                              422: ErrorSerializer})
    def post(self, request: Request, org: str, pipeline: str) -> Response:
        pipe = get_pipeline(self.org, pipeline)
        build = services.create_build(pipeline=pipe, request=build_request_from(json_object(request)),
                                      created_by=request.user)
        return Response(BuildSerializer(build).data, status=status.HTTP_201_CREATED)


class RepoBuildsView(OrgScopedMixin, APIView):
    permission_classes = ORG_PERMISSIONS

    @extend_schema(operation_id="createBuildBySource", tags=["builds"], request=CreateRepoBuildRequestSerializer,
                   responses={201: BuildSerializer, 403: ErrorSerializer, 404: ErrorSerializer,
                              422: ErrorSerializer})
    def post(self, request: Request, org: str) -> Response:
        body = json_object(request)
        build_request = build_request_from(body, also_required=("repo_name", "source_slug"))
        pipe = services.find_pipeline_by_repo(org=self.org, repo_name=body["repo_name"],
                                              source_slug=body["source_slug"])
        build = services.create_build(pipeline=pipe, request=build_request, created_by=request.user)
        return Response(BuildSerializer(build).data, status=status.HTTP_201_CREATED)


class BuildDetailView(BuildScopedMixin, APIView):
    permission_classes = ORG_PERMISSIONS

    @extend_schema(operation_id="getBuild", tags=["builds"], responses={200: BuildSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str, pipeline: str, number: str) -> Response:
        return Response(BuildSerializer(self.build).data)


class BuildCancelView(BuildScopedMixin, APIView):
    permission_classes = ORG_PERMISSIONS

    @extend_schema(operation_id="cancelBuild", tags=["builds"], request=None,
                   responses={200: BuildSerializer, 404: ErrorSerializer, 409: ErrorSerializer})
    def put(self, request: Request, org: str, pipeline: str, number: str) -> Response:
        return Response(BuildSerializer(services.cancel_build(build=self.build)).data)


class BuildLogTokenView(BuildScopedMixin, APIView):
    permission_classes = ORG_PERMISSIONS

    @extend_schema(operation_id="getBuildLogToken", tags=["builds"],
                   responses={200: LogTokenResponseSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str, pipeline: str, number: str) -> Response:
        minted = mint_log_token(build_id=self.build.id)
        return Response(LogTokenResponseSerializer({"token": minted.token, "expires_at": minted.expires_at}).data)


def jobs_of(build: Build):  # noqa: ANN201 (QuerySet[Job])
    edges = JobDependency.objects.order_by("prerequisite__position").only("job_id", "prerequisite_id")
    return Job.objects.filter(build=build).prefetch_related(Prefetch("prerequisite_edges", queryset=edges))


class JobListView(BuildScopedMixin, APIView):
    permission_classes = ORG_PERMISSIONS

    @extend_schema(operation_id="listJobs", tags=["jobs"], responses={200: JobListSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str, pipeline: str, number: str) -> Response:
        jobs = jobs_of(self.build).order_by("position")
        return Response({"data": JobSerializer(jobs, many=True).data})


class JobDetailView(BuildScopedMixin, APIView):
    permission_classes = ORG_PERMISSIONS

    @extend_schema(operation_id="getJob", tags=["jobs"], responses={200: JobSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str, pipeline: str, number: str, job_id: str) -> Response:
        try:
            job_uuid = uuid.UUID(job_id)
        except ValueError:
            job_uuid = None
        job = jobs_of(self.build).filter(pk=job_uuid).first() if job_uuid else None
        if job is None:
            raise ApiError("job_not_found", f"No job {job_id} in build #{self.build.number}.")
        return Response(JobSerializer(job).data)



class PlainTextRenderer(BaseRenderer):
    media_type = "text/plain"
    format = "txt"
    charset = "utf-8"

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: dict | None = None) -> Any:
        return data


class JobLogView(BuildScopedMixin, APIView):
    """The whole stored log of a job as plain text (all streams, in order)."""

    permission_classes = ORG_PERMISSIONS
    # Errors still leave as the JSON envelope; a successful answer is text.
    renderer_classes = [JSONRenderer, PlainTextRenderer]

    def job(self, job_id: str) -> Job:
        try:
            job_uuid = uuid.UUID(job_id)
        except ValueError:
            job_uuid = None
        job = Job.objects.filter(build=self.build, pk=job_uuid).only("id", "log_bytes").first() if job_uuid else None
        if job is None:
            raise ApiError("job_not_found", f"No job {job_id} in build #{self.build.number}.")
        return job

    @extend_schema(operation_id="getJobLog", tags=["jobs"],
                   parameters=[OpenApiParameter("Range", str, OpenApiParameter.HEADER,
                                                description="`bytes=-N`: only the last N bytes (206).")],
                   responses={(200, "text/plain"): str, (206, "text/plain"): str, 404: ErrorSerializer})
    def get(self, request: Request, org: str, pipeline: str, number: str, job_id: str) -> HttpResponse:
        return raw_log_response(self.job(job_id), request.headers.get("Range"))

    @extend_schema(exclude=True)
    def head(self, request: Request, org: str, pipeline: str, number: str, job_id: str) -> HttpResponse:
        return raw_log_head(self.job(job_id))


class AgentListView(OrgScopedMixin, APIView):
    permission_classes = ORG_PERMISSIONS

    @extend_schema(operation_id="listAgents", tags=["agents"],
                   responses={200: AgentListSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str) -> Response:
        """Agents seen in the last day, most recently seen first, with what each is running."""
        now = timezone.now()
        active = Job.objects.filter(state__in=ACTIVE_STATES).select_related("build", "build__pipeline")
        agents = (
            Agent.objects.filter(organization=self.org, last_seen_at__gte=now - AGENT_LIST_WINDOW)
            .order_by("-last_seen_at")
            .prefetch_related(Prefetch("jobs", queryset=active, to_attr="active_jobs"))
        )
        context = {"now": now, "lost_after": settings.AGENT_HEARTBEAT_TIMEOUT_SECONDS}
        return Response({"data": AgentStatusSerializer(agents, many=True, context=context).data})
