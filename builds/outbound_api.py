"""`/organizations/{org}/webhooks`: the organization's outbound webhook endpoints and what was sent to each, for admins.

An endpoint is told about the organization's builds (builds.services.notifications
records and posts the messages, signed the Standard Webhooks way with the
endpoint's secret). Its secret is in the create answer only; the list of an
endpoint's deliveries is where its owner sees what was posted and what came back.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Prefetch
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from builds import services
from builds.models import Notification, NotificationAttempt, NotificationStatus, WebhookEndpoint, WebhookEvent
from builds.services.webhook_endpoints import DESCRIPTION_MAX_LENGTH, INVALID_CODE, URL_MAX_LENGTH
from harmont.pagination import paginate, paginate_by_keys
from harmont.serializers import ErrorSerializer, page_serializer, validated
from organizations import idempotency
from organizations.access import OrgScopedView
from organizations.models import Role
from pipelines.api import PAGE_PARAMS

ENDPOINT_ID = OpenApiParameter("id", str, OpenApiParameter.PATH, description="The webhook endpoint's id.")


@extend_schema_field({"type": "string", "enum": WebhookEvent.values}, component_name="WebhookEvent")
class WebhookEventField(serializers.CharField):
    """An event name. Checked by the service (one message for every caller), documented as the enum it is."""


@extend_schema_field({"type": "string", "enum": NotificationStatus.values},
                     component_name="WebhookEndpointDeliveryStatus")
class DeliveryStatusField(serializers.CharField):
    pass


class WebhookEndpointSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    url = serializers.CharField()
    events = serializers.ListField(child=WebhookEventField(), help_text="What it is told about, in this order.")
    description = serializers.CharField()
    created_at = serializers.DateTimeField()


WebhookEndpointListSerializer = page_serializer("WebhookEndpointList", WebhookEndpointSerializer)


class WebhookEndpointCreateRequestSerializer(serializers.Serializer):
    url = serializers.CharField(max_length=URL_MAX_LENGTH, help_text=(
        "Where the events are POSTed: http:// or https://, without a user name or password."))
    events = serializers.ListField(child=WebhookEventField(), help_text="At least one; duplicates are dropped.")
    description = serializers.CharField(max_length=DESCRIPTION_MAX_LENGTH, required=False, allow_blank=True,
                                        default="", help_text="What it is, for people.")


class WebhookEndpointCreateResponseSerializer(WebhookEndpointSerializer):
    secret = serializers.CharField(help_text=(
        "The signing secret (`whsec_` + base64), what `standardwebhooks.Webhook(secret).verify(body, headers)` "
        "takes. Shown only here, once."))


class WebhookEndpointDeliveryBuildSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    number = serializers.IntegerField()
    pipeline_slug = serializers.CharField()


class WebhookEndpointDeliveryAttemptSerializer(serializers.Serializer):
    at = serializers.DateTimeField()
    status_code = serializers.IntegerField(allow_null=True, help_text="The receiver's HTTP status; null: no answer.")
    response_excerpt = serializers.CharField(allow_blank=True, help_text="The start of the receiver's answer.")
    error = serializers.CharField(allow_blank=True, help_text="Why no answer came back (a timeout, a refused "
                                                              "connection), else empty.")
    duration_ms = serializers.IntegerField()


class WebhookEndpointDeliverySerializer(serializers.Serializer):
    id = serializers.CharField(help_text="The message's `webhook-id` header: the same on every attempt.")
    event = WebhookEventField()
    status = DeliveryStatusField(help_text=(
        "`queued` until it is delivered (a 2xx answer) or its day of attempts is over (`failed`)."))
    attempts = serializers.IntegerField()
    created_at = serializers.DateTimeField()
    delivered_at = serializers.DateTimeField(allow_null=True)
    next_attempt_at = serializers.DateTimeField(allow_null=True, help_text="When it is tried next while queued.")
    last_error = serializers.CharField(allow_null=True, help_text="Why the last attempt failed, if it did.")
    build = WebhookEndpointDeliveryBuildSerializer()
    job_id = serializers.UUIDField(allow_null=True, help_text="The job of a `job.finished`, else null.")
    payload = serializers.DictField(help_text="The body that is POSTed (serialized compactly, keys sorted).")
    attempts_made = WebhookEndpointDeliveryAttemptSerializer(many=True, help_text="Oldest first.")


WebhookEndpointDeliveryListSerializer = page_serializer("WebhookEndpointDeliveryList",
                                                        WebhookEndpointDeliverySerializer)


def endpoint_deliveries(endpoint: WebhookEndpoint) -> Any:
    """The endpoint's messages with what is shown of them: three queries for a page of any size."""
    attempts = NotificationAttempt.objects.order_by("at", "id")
    return (Notification.objects.filter(endpoint=endpoint).select_related("build__pipeline")
            .prefetch_related(Prefetch("attempts_made", queryset=attempts)))


def delivery_data(message: Notification) -> dict[str, Any]:
    build = message.build
    return {
        "id": message.message_id, "event": message.event, "status": message.status, "attempts": message.attempts,
        "created_at": message.created_at, "delivered_at": message.delivered_at,
        "next_attempt_at": message.due_at if message.status == NotificationStatus.QUEUED else None,
        "last_error": message.last_error or None,
        "build": {"id": build.pk, "number": build.number, "pipeline_slug": build.pipeline.slug},
        "job_id": message.job_id, "payload": message.payload,
        "attempts_made": list(message.attempts_made.all()),
    }


class WebhookEndpointListView(OrgScopedView):
    required_role = {"GET": Role.ADMIN, "POST": Role.ADMIN}
    role_action = "manage webhooks"

    @extend_schema(operation_id="listWebhooks", tags=["webhooks"], parameters=PAGE_PARAMS,
                   responses={200: WebhookEndpointListSerializer, 400: ErrorSerializer, 403: ErrorSerializer,
                              404: ErrorSerializer})
    def get(self, request: Request, org: str) -> Response:
        """The organization's outbound webhook endpoints, oldest first (never their secrets)."""
        page = paginate_by_keys(request, WebhookEndpoint.objects.filter(organization=self.org),
                                keys=("created_at", "pk"))
        return Response({"data": WebhookEndpointSerializer(page.items, many=True).data,
                         "next_cursor": page.next_cursor})

    @extend_schema(operation_id="createWebhook", tags=["webhooks"], request=WebhookEndpointCreateRequestSerializer,
                   parameters=[idempotency.IDEMPOTENCY_KEY_HEADER],
                   responses={201: WebhookEndpointCreateResponseSerializer, 403: ErrorSerializer,
                              404: ErrorSerializer, 422: ErrorSerializer, **idempotency.IDEMPOTENCY_RESPONSES})
    @idempotency.idempotent_sealed
    def post(self, request: Request, org: str) -> Response:
        """A new endpoint; its signing secret is in this answer only."""
        body = validated(WebhookEndpointCreateRequestSerializer, request, code=INVALID_CODE)
        issued = services.create_webhook_endpoint(organization=self.org, url=body["url"], events=body["events"],
                                                  description=body["description"], created_by=request.user)
        return Response({**WebhookEndpointSerializer(issued.endpoint).data, "secret": issued.secret},
                        status=status.HTTP_201_CREATED)


class WebhookEndpointDetailView(OrgScopedView):
    required_role = {"DELETE": Role.ADMIN}
    role_action = "manage webhooks"

    @extend_schema(operation_id="deleteWebhook", tags=["webhooks"], request=None, parameters=[ENDPOINT_ID],
                   responses={204: None, 403: ErrorSerializer, 404: ErrorSerializer})
    def delete(self, request: Request, org: str, id: str) -> Response:  # noqa: A002 (matches the other routes)
        """Delete the endpoint and what was recorded for it; nothing more is posted to it."""
        endpoint = services.get_webhook_endpoint(organization=self.org, endpoint_id=id)
        services.delete_webhook_endpoint(endpoint=endpoint)
        return Response(status=status.HTTP_204_NO_CONTENT)


class WebhookEndpointDeliveriesView(OrgScopedView):
    required_role = {"GET": Role.ADMIN}
    role_action = "manage webhooks"

    @extend_schema(operation_id="listWebhookDeliveries", tags=["webhooks"], parameters=[ENDPOINT_ID, *PAGE_PARAMS],
                   responses={200: WebhookEndpointDeliveryListSerializer, 400: ErrorSerializer,
                              403: ErrorSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str, id: str) -> Response:  # noqa: A002 (matches the other routes)
        """What was sent to the endpoint, newest first, each with every attempt and its answer."""
        endpoint = services.get_webhook_endpoint(organization=self.org, endpoint_id=id)
        page = paginate(request, endpoint_deliveries(endpoint), key="id", descending=True)
        return Response({"data": WebhookEndpointDeliverySerializer([delivery_data(m) for m in page.items],
                                                                   many=True).data,
                         "next_cursor": page.next_cursor})
