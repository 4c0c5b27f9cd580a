"""Pipeline endpoints."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from harmont.errors import ApiError
from harmont.pagination import paginate
from harmont.serializers import ErrorSerializer, validated
from organizations.access import ORG_PERMISSIONS, OrgScopedMixin
from organizations.models import Role
from pipelines import services
from pipelines.models import Pipeline
from pipelines.serializers import CreatePipelineRequestSerializer, PipelineListSerializer, PipelineSerializer

PAGE_PARAMS = [
    OpenApiParameter("limit", int, description="Page size (1-100, default 50)."),
    OpenApiParameter("cursor", str, description="Opaque cursor from a previous page's next_cursor."),
]


def get_pipeline(org, slug: str) -> Pipeline:  # noqa: ANN001 (Organization)
    pipeline = Pipeline.objects.for_org(org).filter(slug=slug).first()
    if pipeline is None:
        raise ApiError("pipeline_not_found", f"No pipeline {slug!r} in organization {org.slug!r}.")
    return pipeline


class PipelineListView(OrgScopedMixin, APIView):
    permission_classes = ORG_PERMISSIONS
    required_role = {"POST": Role.ADMIN}
    role_action = "create pipelines"

    @extend_schema(operation_id="listPipelines", tags=["pipelines"], parameters=PAGE_PARAMS,
                   responses={200: PipelineListSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str) -> Response:
        page = paginate(request, Pipeline.objects.for_org(self.org), key="id")
        return Response({"data": PipelineSerializer(page.items, many=True).data, "next_cursor": page.next_cursor})

    @extend_schema(operation_id="createPipeline", tags=["pipelines"], request=CreatePipelineRequestSerializer,
                   responses={201: PipelineSerializer, 403: ErrorSerializer, 404: ErrorSerializer,
                              422: ErrorSerializer})
    def post(self, request: Request, org: str) -> Response:
        pipeline = services.create_pipeline(org=self.org, **validated(CreatePipelineRequestSerializer, request))
        return Response(PipelineSerializer(pipeline).data, status=status.HTTP_201_CREATED)


class PipelineDetailView(OrgScopedMixin, APIView):
    permission_classes = ORG_PERMISSIONS

    @extend_schema(operation_id="getPipeline", tags=["pipelines"],
                   responses={200: PipelineSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str, pipeline: str) -> Response:
        return Response(PipelineSerializer(get_pipeline(self.org, pipeline)).data)
