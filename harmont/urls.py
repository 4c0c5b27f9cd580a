"""Top-level routes. Everything under /api/v0 ends in the envelope, even unknown paths."""

from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularSwaggerSplitView

from harmont import views
from harmont.errors import route_not_found
from harmont.metrics import metrics_view

# A database outage that surfaces in a middleware is a 503 envelope too, never Django's HTML page.
handler500 = "harmont.errors.server_error"

# Django tries routes in order, and every pattern it passes over costs a request CPU: the agent
# API (most requests by far) first, then the rest of the API, then everything else.
api_v0 = [
    path("agent/", include("builds.agent_urls")),
    path("ping", views.ping, name="ping"),
    path("openapi.json", SpectacularJSONAPIView.as_view(), name="openapi"),
    # The split view serves its start-up script as a file: the pages' CSP allows no inline script.
    path("docs/", SpectacularSwaggerSplitView.as_view(url_name="openapi"), name="api-docs"),
    path("", include("organizations.urls")),
    path("", include("pipelines.urls")),
    path("", include("builds.urls")),
]

urlpatterns = [
    path("api/v0/", include(api_v0)),
    path("healthz", views.healthz, name="healthz"),
    # Prometheus scrapes, with HARMONT_METRICS_TOKEN; a 404 without it.
    path("metrics", metrics_view, name="metrics"),
    # The live log stream (/v0/jobs/...) and the webhook receiver (/webhooks/...).
    path("", include("builds.root_urls")),
    path("docs/errors/", views.error_index, name="error-index"),
    path("docs/errors/<str:code>", views.error_doc, name="error-doc"),
    path("admin/", admin.site.urls),
    re_path(r"^api/v0(?:/.*)?$", route_not_found),
    # The server-rendered pages (session sign-in); none of their paths start with a prefix above.
    path("", include("organizations.page_urls")),
    path("", include("builds.page_urls")),
]
