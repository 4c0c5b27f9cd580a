"""Serializers shared by every app: the error envelope (for the schema) and list wrappers."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers
from rest_framework.request import Request

from harmont.errors import ApiError


def json_object(request: Request) -> dict[str, Any]:
    """The request body, which must be a JSON object (an array or a scalar is a 400)."""
    data = request.data
    if not isinstance(data, dict):
        raise ApiError("invalid_request", "The request body must be a JSON object.")
    return data


def validated(serializer_class: type[serializers.Serializer], request: Request) -> dict[str, Any]:
    """The request's JSON object, validated by `serializer_class` (422 with `fields` if not)."""
    body = serializer_class(data=json_object(request))
    body.is_valid(raise_exception=True)
    return body.validated_data


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

