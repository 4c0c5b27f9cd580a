"""Cross-cutting endpoints: liveness, health and the error-code pages."""

from __future__ import annotations

from django.db import DatabaseError, connection
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.decorators import api_view, authentication_classes, permission_classes
from rest_framework.request import Request
from rest_framework.response import Response

from harmont.errors import CATALOG


@extend_schema(operation_id="ping", tags=["meta"], auth=[],
               responses={200: inline_serializer("Ping", {"status": serializers.CharField()})})
@api_view(["GET"])
@authentication_classes([])
@permission_classes([])
def ping(request: Request) -> Response:
    return Response({"status": "ok"})


def healthz(request: HttpRequest) -> HttpResponse:
    """200 `ok` while the database answers, 503 otherwise (for load balancers)."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except DatabaseError:
        return HttpResponse("database unavailable\n", status=503, content_type="text/plain")
    return HttpResponse("ok", content_type="text/plain")


def error_index(request: HttpRequest) -> HttpResponse:
    entries = sorted(CATALOG.values(), key=lambda e: (e.status, e.code))
    return render(request, "errors/index.html", {"entries": entries})


def error_doc(request: HttpRequest, code: str) -> HttpResponse:
    entry = CATALOG.get(code)
    if entry is None:
        raise Http404("unknown error code")
    return render(request, "errors/detail.html", {"entry": entry, "status": entry.status})
