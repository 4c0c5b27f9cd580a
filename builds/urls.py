from django.urls import path

from builds import api

BUILD = "organizations/<str:org>/pipelines/<str:pipeline>/builds/<str:number>"

urlpatterns = [
    path("organizations/<str:org>/builds", api.RepoBuildsView.as_view(), name="repo-builds"),
    path("organizations/<str:org>/pipelines/<str:pipeline>/builds", api.PipelineBuildsView.as_view(),
         name="build-list"),
    path(BUILD, api.BuildDetailView.as_view(), name="build-detail"),
    path(f"{BUILD}/cancel", api.BuildCancelView.as_view(), name="build-cancel"),
    path(f"{BUILD}/log-token", api.BuildLogTokenView.as_view(), name="build-log-token"),
    path(f"{BUILD}/jobs", api.JobListView.as_view(), name="job-list"),
    path(f"{BUILD}/jobs/<str:job_id>", api.JobDetailView.as_view(), name="job-detail"),
]
