"""The agent API, under /api/v0/agent/: the first routes the URL resolver tries, as most requests are agents'."""

from django.urls import path

from builds import agent_api

JOB = "jobs/<str:job_id>"

urlpatterns = [
    path("register", agent_api.RegisterView.as_view(), name="agent-register"),
    path("disconnect", agent_api.DisconnectView.as_view(), name="agent-disconnect"),
    path("claim", agent_api.ClaimView.as_view(), name="agent-claim"),
    path(f"{JOB}/start", agent_api.StartView.as_view(), name="agent-job-start"),
    path(f"{JOB}/heartbeat", agent_api.HeartbeatView.as_view(), name="agent-job-heartbeat"),
    path(f"{JOB}/logs", agent_api.LogsView.as_view(), name="agent-job-logs"),
    path(f"{JOB}/finish", agent_api.FinishView.as_view(), name="agent-job-finish"),
    path(f"{JOB}/pipeline", agent_api.RenderResultView.as_view(), name="agent-job-pipeline"),
    path(f"{JOB}/workspace", agent_api.WorkspaceUploadView.as_view(), name="agent-job-workspace"),
    path(f"{JOB}/artifacts", agent_api.ArtifactUploadView.as_view(), name="agent-job-artifacts"),
    path(f"{JOB}/parent-workspace", agent_api.ParentWorkspaceView.as_view(), name="agent-parent-workspace"),
    path(f"{JOB}/snapshot", agent_api.SnapshotUploadView.as_view(), name="agent-job-snapshot"),
    path(f"{JOB}/parent-snapshot", agent_api.ParentSnapshotView.as_view(), name="agent-parent-snapshot"),
]
