from django.urls import path

from builds import agent_api, api, cache_api, delivery_api, outbound_api, test_results_api

BUILD = "organizations/<str:org>/pipelines/<str:pipeline>/builds/<str:number>"

urlpatterns = [
    path("organizations/<str:org>/builds", api.RepoBuildsView.as_view(), name="repo-builds"),
    path("organizations/<str:org>/agents", api.AgentListView.as_view(), name="agent-list"),
    path("organizations/<str:org>/webhook-deliveries/<str:delivery_id>", delivery_api.WebhookDeliveryView.as_view(),
         name="webhook-delivery"),
    path("organizations/<str:org>/webhooks", outbound_api.WebhookEndpointListView.as_view(), name="webhook-list"),
    path("organizations/<str:org>/webhooks/<str:id>", outbound_api.WebhookEndpointDetailView.as_view(),
         name="webhook-detail"),
    path("organizations/<str:org>/webhooks/<str:id>/deliveries", outbound_api.WebhookEndpointDeliveriesView.as_view(),
         name="webhook-deliveries"),
    path("organizations/<str:org>/caches", cache_api.CacheEntryListView.as_view(), name="cache-list"),
    path("organizations/<str:org>/caches/<str:id>", cache_api.CacheEntryDetailView.as_view(), name="cache-detail"),
    path("organizations/<str:org>/pipelines/<str:pipeline>/caches", cache_api.PipelineCachesView.as_view(),
         name="pipeline-caches"),
    path("organizations/<str:org>/pipelines/<str:pipeline>/builds", api.PipelineBuildsView.as_view(),
         name="build-list"),
    path(BUILD, api.BuildDetailView.as_view(), name="build-detail"),
    path(f"{BUILD}/cancel", api.BuildCancelView.as_view(), name="build-cancel"),
    path(f"{BUILD}/approve", api.BuildApproveView.as_view(), name="build-approve"),
    path(f"{BUILD}/rebuild", api.BuildRebuildView.as_view(), name="build-rebuild"),
    path(f"{BUILD}/log-token", api.BuildLogTokenView.as_view(), name="build-log-token"),
    path(f"{BUILD}/jobs", api.JobListView.as_view(), name="job-list"),
    path(f"{BUILD}/jobs/<str:job_id>", api.JobDetailView.as_view(), name="job-detail"),
    path(f"{BUILD}/jobs/<str:job_id>/log", api.JobLogView.as_view(), name="job-log"),
    path(f"{BUILD}/jobs/<str:job_id>/retry", api.JobRetryView.as_view(), name="job-retry"),
    path(f"{BUILD}/artifacts", api.ArtifactListView.as_view(), name="artifact-list"),
    path(f"{BUILD}/test-results", test_results_api.BuildTestResultsView.as_view(), name="build-test-results"),
    path(f"{BUILD}/artifacts/<str:artifact_id>/download", api.ArtifactDownloadView.as_view(),
         name="artifact-download"),
]

urlpatterns += [
    path("internal/builds/<str:build_uuid>/source.tar.gz", agent_api.SourceArchiveView.as_view(),
         name="build-source"),
]
