"""Every write to builds and jobs. Callers use `from builds import services`."""

from builds.services.agents import Registration, agent_seen, disconnect_agent, register_agent
from builds.services.builds import (
    BuildRequest,
    cancel_build,
    create_build,
    find_pipeline_by_repo,
    validate_build_request,
)
from builds.services.render import accept_rendered_pipeline, fail_render
from builds.services.jobs import (
    ChunkIn,
    Claim,
    ReapReport,
    append_log,
    claim_job,
    finish_job,
    heartbeat,
    move_job,
    reap,
    report_finish,
    start_job,
    store_workspace,
)
from builds.services.webhooks import DeliveryResult, RefusedBuild, handle_webhook_delivery, verified_repositories

__all__ = [
    "Registration", "agent_seen", "disconnect_agent", "register_agent",
    "BuildRequest", "ChunkIn", "Claim", "ReapReport", "append_log", "cancel_build", "claim_job", "create_build",
    "find_pipeline_by_repo", "finish_job", "heartbeat", "move_job", "reap", "report_finish", "start_job",
    "store_workspace", "validate_build_request", "accept_rendered_pipeline", "fail_render",
    "DeliveryResult", "RefusedBuild", "handle_webhook_delivery", "verified_repositories",
]
