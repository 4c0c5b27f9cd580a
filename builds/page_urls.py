"""Page routes for builds: an organization's pipelines with their latest builds, a pipeline's build
history, the build page and its page-JSON helpers, the agents page and the webhooks page."""

from django.urls import include, path

from builds import badges, views, webhook_pages

BUILD = "orgs/<str:org>/pipelines/<str:pipeline>/builds/<int:number>"

# The pipeline list and the history are build listings, so their views live in this app; their
# routes keep the `pipelines_ui:` names the navigation, breadcrumbs and sign-in redirect reverse.
pipeline_pages = [
    path("orgs/<str:org>/", views.pipeline_list, name="pipelines"),
    path("orgs/<str:org>/pipelines/<str:pipeline>/", views.pipeline_history, name="history"),
    path("orgs/<str:org>/pipelines/<str:pipeline>/schedules", views.schedule_create, name="schedule-create"),
    path("orgs/<str:org>/pipelines/<str:pipeline>/schedules/<uuid:schedule_id>/toggle", views.schedule_toggle,
         name="schedule-toggle"),
    path("orgs/<str:org>/pipelines/<str:pipeline>/schedules/<uuid:schedule_id>/delete", views.schedule_delete,
         name="schedule-delete"),
]

build_pages = [
    path(BUILD, views.build_detail, name="build"),
    path(f"{BUILD}/status.json", views.build_status_json, name="build-status"),
    path(f"{BUILD}/log-token.json", views.build_log_token_json, name="build-log-token"),
    path(f"{BUILD}/cancel", views.build_cancel, name="build-cancel"),
    path(f"{BUILD}/approve", views.build_approve, name="build-approve"),
    path(f"{BUILD}/rebuild", views.build_rebuild, name="build-rebuild"),
    path(f"{BUILD}/jobs/<uuid:job_id>/log", views.job_raw_log, name="job-log"),
    path(f"{BUILD}/jobs/<uuid:job_id>/retry", views.job_retry, name="job-retry"),
    path(f"{BUILD}/artifacts/<uuid:artifact_id>", views.artifact_download, name="artifact"),
    path("orgs/<str:org>/pipelines/<str:pipeline>/badge.svg", badges.pipeline_badge, name="badge"),
    path("orgs/<str:org>/agents", views.agents, name="agents"),
    # The hosted service's build link (no `orgs/`), which the hm CLI prints after `hm run`.
    path("<str:org>/pipelines/<str:pipeline>/builds/<int:number>", views.build_link, name="build-link"),
    path("orgs/<str:org>/agents/tokens/<uuid:token_id>/revoke", views.revoke_agent_token, name="revoke-agent-token"),
    path("orgs/<str:org>/webhooks", webhook_pages.webhooks, name="webhooks"),
    path("orgs/<str:org>/webhooks/<uuid:endpoint_id>", webhook_pages.webhook_deliveries, name="webhook-deliveries"),
    path("orgs/<str:org>/webhooks/<uuid:endpoint_id>/delete", webhook_pages.delete_webhook, name="webhook-delete"),
]

urlpatterns = [
    path("", include((pipeline_pages, "pipelines_ui"))),
    path("", include((build_pages, "builds_ui"))),
]
