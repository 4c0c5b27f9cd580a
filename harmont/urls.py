"""Top-level routes. Everything under /api/v0 ends in the envelope, even unknown paths."""

from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularSwaggerView

from builds.stream import job_log_stream
from builds.webhook_views import github_webhook
from harmont import views
from harmont.errors import route_not_found

api_v0 = [
    path("ping", views.ping, name="ping"),
    path("openapi.json", SpectacularJSONAPIView.as_view(), name="openapi"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="openapi"), name="api-docs"),
    path("", include("organizations.urls")),
    path("", include("pipelines.urls")),
    path("", include("builds.urls")),
]

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    # Outside /api/v0: EventSource can't send headers, so the token is in the query.
    path("v0/jobs/<str:job_id>/logs", job_log_stream, name="job-log-stream"),
    path("docs/errors/", views.error_index, name="error-index"),
    path("docs/errors/<str:code>", views.error_doc, name="error-doc"),
    path("admin/", admin.site.urls),
    # Signed with the repository's webhook secret; no session, no bearer token.
    path("webhooks/github", github_webhook, name="github-webhook"),
    path("api/v0/", include(api_v0)),
    re_path(r"^api/v0(?:/.*)?$", route_not_found),
    # The server-rendered pages (session sign-in); none of their paths start with a prefix above.
    path("", include("organizations.page_urls")),
    path("", include("builds.page_urls")),
]
