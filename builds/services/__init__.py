"""Every write to builds and jobs. Callers use `from builds import services`."""

from builds.services.artifacts import StoredArtifact, store_artifact
from builds.services.agents import Registration, agent_seen, disconnect_agent, mark_agents_seen, register_agent
from builds.services.builds import (
    BuildRequest,
    approve_build,
    cancel_build,
    cancel_superseded_builds,
    create_build,
    find_pipeline_by_repo,
    rebuild_build,
    validate_build_request,
)
from builds.services.claims import (
    Claim,
    FinishOutcome,
    claim_for_agent,
    claim_job,
    finish_and_claim_next,
    hand_back_claim,
)
from builds.services.job_specs import job_spec
from builds.services.jobs import StartedIn, finish_job, heartbeat, move_job, report_finish, start_job
from builds.services.logs import ChunkIn, append_log
from builds.services.reaping import ReapReport, reap
from builds.services.concurrency import admit_everywhere, admit_waiting_builds
from builds.services.retries import retry_job
from builds.services.render import accept_rendered_pipeline, fail_render, record_render_result
from builds.services.webhooks import (
    DeliveryResult,
    RefusedBuild,
    SkippedBuild,
    delivery_build_request,
    process_webhook_delivery,
    record_webhook_delivery,
    requeue_webhook_deliveries,
    verified_repositories,
)
from builds.services.notifications import record_checked_out_commit, retry_notifications, sweep_notifications
from builds.services.schedules import run_due_schedules
from builds.services.webhook_endpoints import (
    IssuedEndpoint,
    create_webhook_endpoint,
    delete_webhook_endpoint,
    get_webhook_endpoint,
    update_webhook_endpoint,
)
from builds.services.snapshots import store_snapshot
from builds.services.workspaces import store_workspace

__all__ = [
    "StoredArtifact", "store_artifact",
    "Registration", "agent_seen", "disconnect_agent", "mark_agents_seen", "register_agent",
    "BuildRequest", "approve_build", "cancel_build", "cancel_superseded_builds", "create_build",
    "find_pipeline_by_repo", "rebuild_build", "validate_build_request",
    "admit_everywhere", "admit_waiting_builds",
    "Claim", "FinishOutcome", "claim_for_agent", "claim_job", "finish_and_claim_next", "hand_back_claim",
    "job_spec",
    "finish_job", "heartbeat", "move_job", "report_finish", "start_job",
    "ChunkIn", "append_log", "StartedIn",
    "ReapReport", "reap",
    "retry_job",
    "accept_rendered_pipeline", "fail_render", "record_render_result",
    "DeliveryResult", "RefusedBuild", "SkippedBuild", "delivery_build_request", "process_webhook_delivery",
    "record_webhook_delivery", "requeue_webhook_deliveries", "verified_repositories",
    "record_checked_out_commit", "sweep_notifications",
    "run_due_schedules",
    "IssuedEndpoint", "create_webhook_endpoint", "delete_webhook_endpoint", "get_webhook_endpoint",
    "retry_notifications", "update_webhook_endpoint",
    "store_snapshot",
    "store_workspace",
]
