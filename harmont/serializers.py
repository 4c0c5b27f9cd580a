"""Request input and response shapes shared by every app: JSON bodies, ids, filters, the error envelope."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from django_filters import FilterSet
from django.db.models import QuerySet

from rest_framework import serializers
from rest_framework.request import Request

from harmont.errors import ApiError, flatten_detail, validation_error


def json_object(request: Request) -> dict[str, Any]:
    """The request body, which must be a JSON object (an array or a scalar is a 400)."""
    data = request.data
    if not isinstance(data, dict):
        raise ApiError("invalid_request", "The request body must be a JSON object.")
    return data


def validated(serializer_class: type[serializers.Serializer], request: Request, *,
              code: str = "validation_failed", field_codes: Mapping[str, str] | None = None,
              partial: bool = False) -> dict[str, Any]:
    """The request's JSON object, validated by `serializer_class`; if it is not, 422 with `fields`.

    The error's code is `code` (the endpoint's own, such as `organization_invalid`,
    which clients switch on), unless `field_codes` names a code for one of the bad
    fields: the first of those that is bad wins (an invite's role → `invalid_role`).
    `partial`: a PATCH body, whose absent fields are left out (no defaults applied).
    """
    body = serializer_class(data=json_object(request), partial=partial)
    if not body.is_valid():
        fields = flatten_detail(body.errors)
        code = next((field_code for field, field_code in (field_codes or {}).items() if field in fields), code)
        raise validation_error(fields, code=code)
    return body.validated_data


def parse_uuid(raw: str | uuid.UUID) -> uuid.UUID | None:
    """A path id as a UUID, or None; malformed ids are the resource's 404, never a 500."""
    if isinstance(raw, uuid.UUID):
        return raw
    try:
        return uuid.UUID(raw)
    except ValueError:
        return None


def filtered(filterset: FilterSet) -> QuerySet:
    """The FilterSet's queryset; invalid query parameters are a 400 `invalid_filter` naming each."""
    if not filterset.is_valid():
        fields = {name: [str(m) for m in msgs] for name, msgs in filterset.errors.items()}
        raise ApiError("invalid_filter", f"Invalid filter: {', '.join(sorted(fields))}.", fields=fields)
    return filterset.qs


class ErrorBodySerializer(serializers.Serializer):
    type = serializers.CharField(help_text="Stable machine error type.")
    code = serializers.CharField(help_text="Catalog code; see doc_url.")
    message = serializers.CharField(help_text="Human-readable message.")
    doc_url = serializers.CharField(help_text="Page on this server explaining the code.")
    request_id = serializers.CharField(help_text="Also in the X-Request-Id header.")
    fields = serializers.DictField(child=serializers.ListField(child=serializers.CharField()), required=False,
                                   help_text="Per-field messages (validation errors only).")


class ErrorSerializer(serializers.Serializer):
    error = ErrorBodySerializer()


def page_serializer(name: str, item: type[serializers.Serializer]) -> type[serializers.Serializer]:
    """`{"data": [item], "next_cursor": str|null}` under the component name `name`."""
    return type(name + "Serializer", (serializers.Serializer,), {
        "data": item(many=True),
        "next_cursor": serializers.CharField(allow_null=True, help_text="Pass as `cursor` for the next page; null at the end."),
    })

