"""`/organizations/{org}/caches`: the organization's step cache entries, for admins to see and delete.

An entry is a passed job of a cached step that later builds with the same key
reuse instead of running it (builds.services.caches). Deleting one makes the
next build run its step again; the job's stored snapshot and workspace go with
it once nothing still needs them.
"""

from __future__ import annotations

import django_filters
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from builds.models import CacheEntry, SecretAccess
from builds.services import caches
from harmont.pagination import paginate_by_keys
from harmont.serializers import ErrorSerializer, filtered, page_serializer
from organizations.access import OrgScopedView
from organizations.models import Role
from pipelines.api import PAGE_PARAMS, get_pipeline

ROLE_ACTION = "manage step caches"


class CacheEntrySerializer(serializers.Serializer):
    id = serializers.UUIDField()
    pipeline_slug = serializers.CharField(source="pipeline.slug")
    step_key = serializers.CharField()
    key = serializers.CharField(help_text="The cache key: sha256 of the step's policy, command, image, env and "
                                          "`builds_in` parent's key.")
    branch = serializers.CharField(help_text="The branch of the build that wrote it; builds of this branch and, "
                                             "when it is the pipeline's default branch, of every branch read it.")
    secret_access = serializers.ChoiceField(choices=SecretAccess.choices, help_text=(
        "The secret access of the build that wrote it; only builds with the same access read it."))
    job_id = serializers.UUIDField(help_text="The passed job that later builds reuse.")
    build_number = serializers.IntegerField(source="job.build.number")
    size_bytes = serializers.IntegerField(help_text="Its stored snapshot and workspace, counted against "
                                                    "HARMONT_CACHE_MAX_BYTES.")
    hits = serializers.IntegerField(help_text="How many jobs reused it.")
    created_at = serializers.DateTimeField()
    last_used_at = serializers.DateTimeField(help_text="The least recently used entries are evicted first.")


CacheEntryListSerializer = page_serializer("CacheEntryList", CacheEntrySerializer)


class CacheEntryFilter(django_filters.FilterSet):
    pipeline = django_filters.CharFilter(field_name="pipeline__slug")
    step_key = django_filters.CharFilter()
    branch = django_filters.CharFilter()

    class Meta:
        model = CacheEntry
        fields = ["pipeline", "step_key", "branch"]


ENTRY_ID = OpenApiParameter("id", str, OpenApiParameter.PATH, description="The cache entry's id.")
STEP_KEY = OpenApiParameter("step_key", str, description="Only the entries of this step.")
BRANCH = OpenApiParameter("branch", str, description="Only the entries written by builds of this branch.")


class CacheDeleteResultSerializer(serializers.Serializer):
    deleted = serializers.IntegerField(help_text="How many entries went.")


class CacheEntryListView(OrgScopedView):
    required_role = {"GET": Role.ADMIN}
    role_action = ROLE_ACTION

    @extend_schema(operation_id="listCaches", tags=["caches"],
                   parameters=[OpenApiParameter("pipeline", str, description="Only this pipeline's (its slug)."),
                               STEP_KEY, BRANCH, *PAGE_PARAMS],
                   responses={200: CacheEntryListSerializer, 400: ErrorSerializer, 403: ErrorSerializer,
                              404: ErrorSerializer})
    def get(self, request: Request, org: str) -> Response:
        """The organization's step cache entries, newest first (three queries for a page of any size)."""
        entries = filtered(CacheEntryFilter(request.query_params,
                                            queryset=CacheEntry.objects.filter(organization=self.org)))
        page = paginate_by_keys(request, entries.select_related("pipeline", "job__build").only(*ENTRY_COLUMNS),
                                keys=("created_at", "pk"), descending=True)
        return Response({"data": CacheEntrySerializer(page.items, many=True).data, "next_cursor": page.next_cursor})


# What the list reads: the entry and the two names it shows from its pipeline and build.
ENTRY_COLUMNS = ("id", "pipeline__slug", "step_key", "key", "branch", "secret_access", "job_id",
                 "job__build__number", "size_bytes", "hits", "created_at", "last_used_at")


class CacheEntryDetailView(OrgScopedView):
    required_role = {"DELETE": Role.ADMIN}
    role_action = ROLE_ACTION

    @extend_schema(operation_id="deleteCache", tags=["caches"], request=None, parameters=[ENTRY_ID],
                   responses={204: None, 403: ErrorSerializer, 404: ErrorSerializer})
    def delete(self, request: Request, org: str, id: str) -> Response:  # noqa: A002 (matches the other routes)
        """Delete the entry: the next build with its key runs the step again."""
        caches.delete_entry(entry=caches.get_entry(organization=self.org, entry_id=id))
        return Response(status=status.HTTP_204_NO_CONTENT)


class PipelineCachesView(OrgScopedView):
    required_role = {"DELETE": Role.ADMIN}
    role_action = ROLE_ACTION

    @extend_schema(operation_id="deletePipelineCaches", tags=["caches"], request=None, parameters=[STEP_KEY, BRANCH],
                   responses={200: CacheDeleteResultSerializer, 400: ErrorSerializer, 403: ErrorSerializer,
                              404: ErrorSerializer})
    def delete(self, request: Request, org: str, pipeline: str) -> Response:
        """Delete the pipeline's entries (or one step's, or one branch's): its next builds run those steps again."""
        pipe = get_pipeline(self.org, pipeline)
        # Like the list's filters, an empty value filters nothing.
        deleted = caches.delete_pipeline_entries(pipeline=pipe, step_key=request.query_params.get("step_key") or None,
                                                 branch=request.query_params.get("branch") or None)
        return Response({"deleted": deleted})
