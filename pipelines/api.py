"""Pipeline endpoints."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.urls import reverse
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response

from harmont.errors import ApiError
from harmont.pagination import paginate, paginate_by_keys
from harmont.serializers import ErrorSerializer, validated
from organizations.access import OrgScopedView
from organizations.idempotency import IDEMPOTENCY_KEY_HEADER, IDEMPOTENCY_RESPONSES, idempotent
from organizations.models import Role
from pipelines import secrets as secret_services
from pipelines import registration, services
from pipelines import schedules as schedule_services
from pipelines.models import Pipeline
from pipelines.serializers import SecretListSerializer, SecretSerializer, SetSecretRequestSerializer
from pipelines.serializers import CreatePipelineRequestSerializer, PipelineListSerializer, PipelineSerializer
from pipelines.serializers import UpdatePipelineRequestSerializer
from pipelines.serializers import RegisterPipelinesRequestSerializer, RegisterPipelinesResponseSerializer
from pipelines.serializers import CreateScheduleRequestSerializer, ScheduleListSerializer, ScheduleSerializer
from pipelines.serializers import UpdateScheduleRequestSerializer

PAGE_PARAMS = [
    OpenApiParameter("limit", int, description="Page size (1-100, default 50)."),
    OpenApiParameter("cursor", str, description="Opaque cursor from a previous page's next_cursor."),
]


def get_pipeline(org, slug: str) -> Pipeline:  # noqa: ANN001 (Organization)
    pipeline = Pipeline.objects.for_org(org).filter(slug=slug).first()
    if pipeline is None:
        raise ApiError("pipeline_not_found", f"No pipeline {slug!r} in organization {org.slug!r}.")
    return pipeline


class PipelineListView(OrgScopedView):
    required_role = {"POST": Role.ADMIN}
    role_action = "create pipelines"

    @extend_schema(operation_id="listPipelines", tags=["pipelines"], parameters=PAGE_PARAMS,
                   responses={200: PipelineListSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str) -> Response:
        page = paginate(request, Pipeline.objects.for_org(self.org), key="id")
        return Response({"data": PipelineSerializer(page.items, many=True, context=self.credentials_context()).data,
                         "next_cursor": page.next_cursor})

    @extend_schema(operation_id="createPipeline", tags=["pipelines"], request=CreatePipelineRequestSerializer,
                   parameters=[IDEMPOTENCY_KEY_HEADER],
                   responses={201: PipelineSerializer, 403: ErrorSerializer, 404: ErrorSerializer,
                              422: ErrorSerializer, **IDEMPOTENCY_RESPONSES})
    @idempotent
    def post(self, request: Request, org: str) -> Response:
        body = validated(CreatePipelineRequestSerializer, request, code="pipeline_invalid")
        pipeline = services.create_pipeline(org=self.org, **body)
        return Response(PipelineSerializer(pipeline, context=self.credentials_context()).data,
                        status=status.HTTP_201_CREATED)


class PipelineDetailView(OrgScopedView):
    required_role = {"PATCH": Role.ADMIN}
    role_action = "change pipeline settings"

    @extend_schema(operation_id="getPipeline", tags=["pipelines"],
                   responses={200: PipelineSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str, pipeline: str) -> Response:
        return Response(PipelineSerializer(get_pipeline(self.org, pipeline), context=self.credentials_context()).data)

    @extend_schema(operation_id="updatePipeline", tags=["pipelines"], request=UpdatePipelineRequestSerializer,
                   responses={200: PipelineSerializer, 403: ErrorSerializer, 404: ErrorSerializer,
                              422: ErrorSerializer})
    def patch(self, request: Request, org: str, pipeline: str) -> Response:
        found = get_pipeline(self.org, pipeline)
        changes = validated(UpdatePipelineRequestSerializer, request, code="pipeline_invalid", partial=True)
        updated = services.update_pipeline(pipeline=found, changes=dict(changes))
        return Response(PipelineSerializer(updated, context=self.credentials_context()).data)


class PipelineRegisterView(OrgScopedView):
    required_role = {"POST": Role.ADMIN}
    role_action = "register pipelines"

    @extend_schema(operation_id="registerPipelines", tags=["pipelines"], request=RegisterPipelinesRequestSerializer,
                   parameters=[IDEMPOTENCY_KEY_HEADER],
                   responses={200: RegisterPipelinesResponseSerializer, 403: ErrorSerializer, 404: ErrorSerializer,
                              422: ErrorSerializer, **IDEMPOTENCY_RESPONSES})
    @idempotent
    def post(self, request: Request, org: str) -> Response:
        """Create or update a repository's pipelines from its pipeline envelope (idempotent).

        Pipelines registered earlier from the same repository whose entry is gone are
        archived: hidden from lists, their builds kept.
        """
        done = registration.register_pipelines(org=self.org, **validated(RegisterPipelinesRequestSerializer, request))
        return Response({
            "repository": {"repo_name": done.repository.repo_name, "url": done.repository.url,
                           "webhook_secret_set": bool(done.repository.webhook_secret_encrypted),
                           "github_token_set": bool(done.repository.github_token_encrypted),
                           "webhook_url": settings.PUBLIC_URL + reverse("github-webhook",
                                                                        args=[done.repository.repo_name])},
            "pipelines": PipelineSerializer(done.pipelines, many=True, context=self.credentials_context()).data,
            "archived": done.archived,
        })

    @extend_schema(exclude=True)
    def get(self, request: Request, org: str) -> Response:
        # The route shadows a pipeline whose slug is "register"; reading it still works.
        return PipelineDetailView.as_view()(request._request, org=org, pipeline="register")


# ---------------------------------------------------------------- secrets


class SecretScopeView(OrgScopedView):
    """Secrets of the organization, or of one pipeline when the URL names it. Admins only, reads included:
    even the names say what a pipeline deploys to."""

    required_role = {"GET": Role.ADMIN, "HEAD": Role.ADMIN, "POST": Role.ADMIN, "DELETE": Role.ADMIN}
    role_action = "manage secrets"

    def scope(self) -> dict[str, Any]:
        slug = self.kwargs.get("pipeline")
        return {"organization": self.org, "pipeline": get_pipeline(self.org, slug) if slug is not None else None}

    def list_secrets(self) -> Response:
        # Names are unique within a scope, so the name alone is the page key.
        page = paginate_by_keys(self.request, secret_services.list_secrets(**self.scope()), keys=("name",))
        return Response({"secrets": SecretSerializer(page.items, many=True).data, "next_cursor": page.next_cursor})

    def set_secret(self, request: Request) -> Response:
        body = validated(SetSecretRequestSerializer, request)
        secret, created = secret_services.set_secret(**self.scope(), name=body["name"], value=body["value"],
                                                     protected=body.get("protected"))
        # 201 when the name is new, 200 when an existing secret's value was replaced.
        return Response(SecretSerializer(secret).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)

    def delete_secret(self, name: str) -> Response:
        secret_services.delete_secret(**self.scope(), name=name)
        return Response(status=status.HTTP_204_NO_CONTENT)


SECRET_NAME_PARAM = OpenApiParameter("name", str, OpenApiParameter.PATH, description="The secret's name.")
SET_SECRET_RESPONSES = {200: SecretSerializer, 201: SecretSerializer, 403: ErrorSerializer, 404: ErrorSerializer,
                        422: ErrorSerializer, **IDEMPOTENCY_RESPONSES}


class OrgSecretListView(SecretScopeView):
    @extend_schema(operation_id="listOrgSecrets", tags=["secrets"], parameters=PAGE_PARAMS,
                   responses={200: SecretListSerializer, 400: ErrorSerializer, 403: ErrorSerializer,
                              404: ErrorSerializer})
    def get(self, request: Request, org: str) -> Response:
        """The organization's secrets (every pipeline gets them), by name; never their values."""
        return self.list_secrets()

    @extend_schema(operation_id="setOrgSecret", tags=["secrets"], request=SetSecretRequestSerializer,
                   parameters=[IDEMPOTENCY_KEY_HEADER], responses=SET_SECRET_RESPONSES)
    @idempotent
    def post(self, request: Request, org: str) -> Response:
        """Create a secret (201) or replace the value of the one with this name (200)."""
        return self.set_secret(request)


class OrgSecretDetailView(SecretScopeView):
    @extend_schema(operation_id="deleteOrgSecret", tags=["secrets"], request=None, parameters=[SECRET_NAME_PARAM],
                   responses={204: None, 403: ErrorSerializer, 404: ErrorSerializer})
    def delete(self, request: Request, org: str, name: str) -> Response:
        return self.delete_secret(name)


class PipelineSecretListView(SecretScopeView):
    @extend_schema(operation_id="listPipelineSecrets", tags=["secrets"], parameters=PAGE_PARAMS,
                   responses={200: SecretListSerializer, 400: ErrorSerializer, 403: ErrorSerializer,
                              404: ErrorSerializer})
    def get(self, request: Request, org: str, pipeline: str) -> Response:
        """The pipeline's own secrets (they win over the organization's of the same name); never their values."""
        return self.list_secrets()

    @extend_schema(operation_id="setPipelineSecret", tags=["secrets"], request=SetSecretRequestSerializer,
                   parameters=[IDEMPOTENCY_KEY_HEADER], responses=SET_SECRET_RESPONSES)
    @idempotent
    def post(self, request: Request, org: str, pipeline: str) -> Response:
        """Create a pipeline secret (201) or replace the value of the one with this name (200)."""
        return self.set_secret(request)


class PipelineSecretDetailView(SecretScopeView):
    @extend_schema(operation_id="deletePipelineSecret", tags=["secrets"], request=None,
                   parameters=[SECRET_NAME_PARAM], responses={204: None, 403: ErrorSerializer, 404: ErrorSerializer})
    def delete(self, request: Request, org: str, pipeline: str, name: str) -> Response:
        return self.delete_secret(name)


# ---------------------------------------------------------------- schedules


class ScheduleScopeView(OrgScopedView):
    """A pipeline's schedules: members read them, admins and owners create, change and delete them
    (a schedule builds with the server's own source, so it can build `allow_manual: false` pipelines)."""

    required_role = {"POST": Role.ADMIN, "PATCH": Role.ADMIN, "DELETE": Role.ADMIN}
    role_action = "manage schedules"

    def pipeline(self) -> Pipeline:
        return get_pipeline(self.org, self.kwargs["pipeline"])


SCHEDULE_ID_PARAM = OpenApiParameter("schedule_id", str, OpenApiParameter.PATH, description="The schedule's id.")


class PipelineScheduleListView(ScheduleScopeView):
    @extend_schema(operation_id="listPipelineSchedules", tags=["schedules"], parameters=PAGE_PARAMS,
                   responses={200: ScheduleListSerializer, 400: ErrorSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str, pipeline: str) -> Response:
        """The pipeline's schedules, oldest first."""
        page = paginate_by_keys(request, schedule_services.list_schedules(pipeline=self.pipeline()),
                                keys=("created_at", "pk"))
        return Response({"data": ScheduleSerializer(page.items, many=True).data, "next_cursor": page.next_cursor})

    @extend_schema(operation_id="createPipelineSchedule", tags=["schedules"], request=CreateScheduleRequestSerializer,
                   parameters=[IDEMPOTENCY_KEY_HEADER],
                   responses={201: ScheduleSerializer, 403: ErrorSerializer, 404: ErrorSerializer,
                              422: ErrorSerializer, **IDEMPOTENCY_RESPONSES})
    @idempotent
    def post(self, request: Request, org: str, pipeline: str) -> Response:
        """Create a schedule; its first build is due at the first time its cron expression names after now."""
        pipe = self.pipeline()
        body = validated(CreateScheduleRequestSerializer, request)
        schedule = schedule_services.create_schedule(
            pipeline=pipe, created_by=request.user, timezone_name=body.pop("timezone"), **body)
        return Response(ScheduleSerializer(schedule).data, status=status.HTTP_201_CREATED)


class PipelineScheduleDetailView(ScheduleScopeView):
    @extend_schema(operation_id="updatePipelineSchedule", tags=["schedules"], request=UpdateScheduleRequestSerializer,
                   parameters=[SCHEDULE_ID_PARAM],
                   responses={200: ScheduleSerializer, 403: ErrorSerializer, 404: ErrorSerializer,
                              422: ErrorSerializer})
    def patch(self, request: Request, org: str, pipeline: str, schedule_id: str) -> Response:
        """Change some of a schedule's fields; the next run is recomputed from now (no catch-up)."""
        schedule = schedule_services.get_schedule(pipeline=self.pipeline(), schedule_id=schedule_id)
        changes = validated(UpdateScheduleRequestSerializer, request)
        schedule = schedule_services.update_schedule(schedule=schedule, changes=changes)
        return Response(ScheduleSerializer(schedule).data)

    @extend_schema(operation_id="deletePipelineSchedule", tags=["schedules"], request=None,
                   parameters=[SCHEDULE_ID_PARAM], responses={204: None, 403: ErrorSerializer, 404: ErrorSerializer})
    def delete(self, request: Request, org: str, pipeline: str, schedule_id: str) -> Response:
        schedule = schedule_services.get_schedule(pipeline=self.pipeline(), schedule_id=schedule_id)
        schedule_services.delete_schedule(schedule=schedule)
        return Response(status=status.HTTP_204_NO_CONTENT)
