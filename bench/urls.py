"""The app's routes, with one benchmark-only route in front: the baseline.

The baseline is the cheapest honest DRF request against the same data: one
`Build` row by primary key, a few fields as JSON, no authentication and no
permission checks. Every other figure is reported as a ratio to it, so what the
ratio shows is the cost our own layers (token lookup, membership, scoping,
serializer) add on top of "DRF + one PostgreSQL round trip".
"""

from __future__ import annotations

import uuid

from django.http import Http404
from django.urls import path
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from builds.models import Build
from harmont.urls import urlpatterns as app_urlpatterns


class BaselineBuildView(APIView):
    authentication_classes: list = []
    permission_classes: list = []

    def get(self, request: Request, pk: uuid.UUID) -> Response:
        row = Build.objects.filter(pk=pk).values("id", "number", "state", "branch", "commit").first()
        if row is None:
            raise Http404("no such build")
        return Response({**row, "id": str(row["id"])})


urlpatterns = [
    path("bench/baseline/<uuid:pk>", BaselineBuildView.as_view(), name="bench-baseline"),
    *app_urlpatterns,
]
