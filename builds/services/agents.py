"""Writes for agents: registering, disconnecting, being seen."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from builds.models import Agent, Job
from builds.selectors import AGENT_LIST_WINDOW, AGENT_SEEN_RESOLUTION
from harmont import claim_notices
from harmont.tokens import AGENT_SESSION_PREFIX, hash_secret, new_prefixed_secret
from organizations.models import AgentToken

# Agents pruned by one reaper pass at most: the reaper runs every few seconds, so a backlog
# (a fleet that restarted in a loop) goes in a few passes without one long delete.
PRUNE_BATCH = 1000


@dataclass(frozen=True)
class Registration:
    agent: Agent
    session: str  # raw session credential; only its hash is stored


@transaction.atomic
def register_agent(*, token: AgentToken, name: str, hostname: str = "", version: str = "", os: str = "",
                   tags: dict[str, str] | None = None, now: datetime | None = None) -> Registration:
    """A new agent process of the token's organization, with the session it claims jobs with.

    `tags` (checked by the caller: pipelines.agent_tags.tag_problems) decide
    which jobs it may claim; they are stored as given, without the implied
    `queue=default`.
    """
    now = now or timezone.now()
    session = new_prefixed_secret(AGENT_SESSION_PREFIX)
    agent = Agent.objects.create(organization_id=token.organization_id, token=token, name=name,
                                 hostname=hostname, version=version, os=os, tags=dict(tags or {}),
                                 session_hash=hash_secret(session), created_at=now, last_seen_at=now)
    AgentToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return Registration(agent, session)


def disconnect_agent(*, agent: Agent, now: datetime | None = None) -> None:
    """The agent exits cleanly: it is listed as stopped and its session no longer works."""
    with transaction.atomic():
        if Agent.objects.filter(pk=agent.pk, stopped_at__isnull=True).update(stopped_at=now or timezone.now()):
            claim_notices.credentials_changed(agent_id=agent.pk)


def agent_seen(*, agent: Agent, now: datetime | None = None) -> None:
    """A request from `agent`: its last-seen time, unless it was refreshed within AGENT_SEEN_RESOLUTION."""
    now = now or timezone.now()
    if agent.last_seen_at is not None and now - agent.last_seen_at < AGENT_SEEN_RESOLUTION:
        return
    Agent.objects.filter(pk=agent.pk).update(last_seen_at=now)
    agent.last_seen_at = now


def mark_agents_seen(*, agent_ids: list[uuid.UUID], now: datetime | None = None) -> int:
    """Claims of these agents began without an attempt (builds.claim_resumes): their last-seen time, as each
    attempt would have written it, in one statement; how many were written (a stopped agent is not)."""
    return Agent.objects.filter(pk__in=agent_ids, stopped_at__isnull=True).update(last_seen_at=now or timezone.now())


def agent_seen_by(*, job: Job, now: datetime) -> None:
    """A request about `job` from its agent: the agent's last-seen time, at most every AGENT_SEEN_RESOLUTION."""
    if not job.agent_id:
        return
    if hasattr(job, "agent_seen_recently"):  # read with the job by selectors.job_for_credential
        recently = bool(job.agent_seen_recently)
    else:  # a claim's job has its agent; others load it here
        last_seen = job.agent.last_seen_at
        recently = bool(last_seen and now - last_seen < AGENT_SEEN_RESOLUTION)
    if recently:
        return
    Agent.objects.filter(pk=job.agent_id).update(last_seen_at=now)
    job.agent_seen_recently = True  # once per request is enough


def touch_job(*, job: Job, now: datetime) -> None:
    """A sign of life from the job's agent: the job's heartbeat and the agent's last-seen time."""
    Job.objects.filter(pk=job.pk).update(last_heartbeat_at=now)
    agent_seen_by(job=job, now=now)


def prune_agents(*, now: datetime | None = None, batch: int = PRUNE_BATCH) -> int:
    """Delete up to `batch` agents not seen for more than AGENT_LIST_WINDOW (a day); how many went.

    Every agent process registers a row, so without this the table grows by one per
    start for ever. A pruned agent is listed nowhere; the jobs it ran keep their history
    with no agent (SET_NULL). Its session would be refused, but an agent silent for a day
    has long lost its jobs and is gone. The delete re-checks the time, so an agent seen
    again between the two statements stays.
    """
    cutoff = (now or timezone.now()) - AGENT_LIST_WINDOW
    stale = list(Agent.objects.filter(last_seen_at__lt=cutoff).values_list("pk", flat=True)[:batch])
    if not stale:
        return 0
    with transaction.atomic():
        _, deleted = Agent.objects.filter(pk__in=stale, last_seen_at__lt=cutoff).delete()
    return deleted.get(Agent._meta.label, 0)
