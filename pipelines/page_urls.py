"""Page routes for pipelines: an organization's pipelines and a pipeline's build history."""

from django.urls import path

from pipelines import views

app_name = "pipelines_ui"

urlpatterns = [
    path("orgs/<str:org>/", views.pipeline_list, name="pipelines"),
    path("orgs/<str:org>/pipelines/<str:pipeline>/", views.pipeline_history, name="history"),
]
