from django.urls import path

from pipelines import api

urlpatterns = [
    path("organizations/<str:org>/pipelines", api.PipelineListView.as_view(), name="pipeline-list"),
    path("organizations/<str:org>/pipelines/<str:pipeline>", api.PipelineDetailView.as_view(),
         name="pipeline-detail"),
]
