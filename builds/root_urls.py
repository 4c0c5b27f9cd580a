"""The builds app's routes outside /api/v0 and the pages (included at the site's root by harmont/urls.py)."""

from django.urls import path

from builds.stream import job_log_stream
from builds.webhook_views import github_webhook

urlpatterns = [
    # Outside /api/v0: EventSource can't send headers, so the token is in the query.
    path("v0/jobs/<str:job_id>/logs", job_log_stream, name="job-log-stream"),
    # Signed with the repository's webhook secret; no session, no bearer token.
    path("webhooks/github/<path:repo_name>", github_webhook, name="github-webhook"),
    # The old payload URL, without the repository: answered with where deliveries go now.
    path("webhooks/github", github_webhook),
]
