"""Page routes for builds (the build page and its page-JSON helpers) and the agents page."""

from django.urls import path

from builds import views

app_name = "builds_ui"

BUILD = "orgs/<str:org>/pipelines/<str:pipeline>/builds/<int:number>"

urlpatterns = [
    path(BUILD, views.build_detail, name="build"),
    path(f"{BUILD}/status.json", views.build_status_json, name="build-status"),
    path(f"{BUILD}/log-token.json", views.build_log_token_json, name="build-log-token"),
    path(f"{BUILD}/cancel", views.build_cancel, name="build-cancel"),
    path(f"{BUILD}/jobs/<uuid:job_id>/log", views.job_raw_log, name="job-log"),
    path(f"{BUILD}/artifacts/<uuid:artifact_id>", views.artifact_download, name="artifact"),
    path("orgs/<str:org>/agents", views.agents, name="agents"),
    path("orgs/<str:org>/agents/tokens/<uuid:token_id>/revoke", views.revoke_agent_token, name="revoke-agent-token"),
]
