from django.urls import path

from pipelines import api

urlpatterns = [
    path("organizations/<str:org>/pipelines", api.PipelineListView.as_view(), name="pipeline-list"),
    path("organizations/<str:org>/pipelines/register", api.PipelineRegisterView.as_view(), name="pipeline-register"),
    path("organizations/<str:org>/pipelines/<str:pipeline>", api.PipelineDetailView.as_view(),
         name="pipeline-detail"),
    path("organizations/<str:org>/secrets", api.OrgSecretListView.as_view(), name="org-secret-list"),
    path("organizations/<str:org>/secrets/<str:name>", api.OrgSecretDetailView.as_view(), name="org-secret-detail"),
    path("organizations/<str:org>/pipelines/<str:pipeline>/secrets", api.PipelineSecretListView.as_view(),
         name="pipeline-secret-list"),
    path("organizations/<str:org>/pipelines/<str:pipeline>/secrets/<str:name>", api.PipelineSecretDetailView.as_view(),
         name="pipeline-secret-detail"),
    path("organizations/<str:org>/pipelines/<str:pipeline>/schedules", api.PipelineScheduleListView.as_view(),
         name="pipeline-schedule-list"),
    path("organizations/<str:org>/pipelines/<str:pipeline>/schedules/<str:schedule_id>",
         api.PipelineScheduleDetailView.as_view(), name="pipeline-schedule-detail"),
]
