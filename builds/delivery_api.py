"""`GET /organizations/{org}/webhook-deliveries/{delivery_id}`: what a webhook delivery did, for admins.

The webhook route only records a verified delivery and answers 202; a task acts
on it. This is where GitHub's sender (or the person debugging it) sees whether
it was processed and which builds it made.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.models import Q
from django.urls import reverse
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from builds.models import Build, DeliveryStatus, WebhookDelivery
from harmont.errors import ApiError
from harmont.serializers import ErrorSerializer
from organizations.access import OrgScopedView
from organizations.models import Role


class DeliveryBuildSerializer(serializers.Serializer):
    pipeline = serializers.CharField()
    number = serializers.IntegerField()
    state = serializers.CharField(allow_null=True, help_text="Its state now (null: the build was deleted since).")
    error_code = serializers.CharField(allow_null=True)
    url = serializers.CharField(help_text="The build's page.")


class DeliveryRefusalSerializer(serializers.Serializer):
    pipeline = serializers.CharField()
    code = serializers.CharField()
    message = serializers.CharField()


class DeliverySkipSerializer(serializers.Serializer):
    pipeline = serializers.CharField()
    reason = serializers.CharField()
    message = serializers.CharField()


class WebhookDeliverySerializer(serializers.Serializer):
    delivery_id = serializers.CharField(help_text="GitHub's X-GitHub-Delivery.")
    event = serializers.CharField()
    repository = serializers.CharField(help_text="`owner/name`, as registered.")
    status = serializers.ChoiceField(choices=DeliveryStatus.choices, help_text=(
        "`queued` until a task acted on it, then `processed`; `failed` after every attempt failed."))
    attempts = serializers.IntegerField()
    last_error = serializers.CharField(allow_null=True, help_text="Why the last attempt failed, if it did.")
    received_at = serializers.DateTimeField()
    processed_at = serializers.DateTimeField(allow_null=True)
    builds_created = serializers.IntegerField()
    builds = DeliveryBuildSerializer(many=True)
    refused = DeliveryRefusalSerializer(many=True, help_text="Matching pipelines whose build was refused.")
    skipped = DeliverySkipSerializer(many=True, help_text="Matching pipelines that build nothing for it by policy.")


def delivery_body(delivery: WebhookDelivery, org_slug: str) -> dict[str, Any]:
    """The delivery with its builds' current states: one query for all of them."""
    result = delivery.result or {}
    recorded = result.get("builds", [])
    states: dict[tuple[int, int], tuple[str, str | None]] = {}
    if recorded:
        match = Q()
        for entry in recorded:
            match |= Q(pipeline_id=entry["pipeline_id"], number=entry["number"])
        states = {(pipeline_id, number): (state, error_code) for pipeline_id, number, state, error_code in
                  Build.objects.filter(match).values_list("pipeline_id", "number", "state", "error_code")}
    builds = []
    for entry in recorded:
        state, error_code = states.get((entry["pipeline_id"], entry["number"]), (None, None))
        path = reverse("builds_ui:build", args=[org_slug, entry["pipeline"], entry["number"]])
        builds.append({"pipeline": entry["pipeline"], "number": entry["number"], "state": state,
                       "error_code": error_code, "url": f"{settings.APP_URL}{path}"})
    return WebhookDeliverySerializer({
        "delivery_id": delivery.delivery_id, "event": delivery.event, "repository": delivery.repository.repo_name,
        "status": delivery.status, "attempts": delivery.attempts, "last_error": delivery.last_error or None,
        "received_at": delivery.received_at, "processed_at": delivery.processed_at,
        "builds_created": delivery.builds_created, "builds": builds,
        "refused": result.get("refused", []), "skipped": result.get("skipped", []),
    }).data


class WebhookDeliveryView(OrgScopedView):
    required_role = {"GET": Role.ADMIN}
    role_action = "see webhook deliveries"

    @extend_schema(operation_id="getWebhookDelivery", tags=["webhooks"],
                   responses={200: WebhookDeliverySerializer, 403: ErrorSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str, delivery_id: str) -> Response:
        """What one GitHub delivery to this organization's repositories did (its X-GitHub-Delivery)."""
        delivery = (WebhookDelivery.objects.filter(repository__organization=self.org, delivery_id=delivery_id)
                    .select_related("repository").defer("payload").first())
        if delivery is None:
            raise ApiError("webhook_delivery_not_found",
                           f"No webhook delivery {delivery_id!r} for a repository of {self.org.slug}.")
        return Response(delivery_body(delivery, self.org.slug))
