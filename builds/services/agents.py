"""Writes for agents: registering, disconnecting, being seen."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from builds.models import Agent
from harmont.auth import AGENT_SESSION_PREFIX, hash_secret, new_prefixed_secret
from organizations.models import AgentToken


@dataclass(frozen=True)
class Registration:
    agent: Agent
    session: str  # raw session credential; only its hash is stored


@transaction.atomic
def register_agent(*, token: AgentToken, name: str, hostname: str = "", version: str = "", os: str = "",
                   now: datetime | None = None) -> Registration:
    """A new agent process of the token's organization, with the session it claims jobs with."""
    now = now or timezone.now()
    session = new_prefixed_secret(AGENT_SESSION_PREFIX)
    agent = Agent.objects.create(organization_id=token.organization_id, token=token, name=name,
                                 hostname=hostname, version=version, os=os, session_hash=hash_secret(session),
                                 created_at=now, last_seen_at=now)
    AgentToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return Registration(agent, session)


def disconnect_agent(*, agent: Agent, now: datetime | None = None) -> None:
    """The agent exits cleanly: it is listed as stopped and its session no longer works."""
    Agent.objects.filter(pk=agent.pk, stopped_at__isnull=True).update(stopped_at=now or timezone.now())


def agent_seen(*, agent: Agent, now: datetime | None = None) -> None:
    Agent.objects.filter(pk=agent.pk).update(last_seen_at=now or timezone.now())
