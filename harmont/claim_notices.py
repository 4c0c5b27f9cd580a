"""The channel that wakes long-polling agent claims (builds.claim_waits), and how services post to it.

Jobs that become claimable are posted by database triggers (builds.sql); what
only the services know, that an agent token was revoked or an agent
disconnected, is posted from here, so its waiting claims answer 401 at once
instead of when their wait ends. PostgreSQL only: on SQLite the waiting side
polls the same facts.
"""

from __future__ import annotations

from django.db import connection

CHANNEL = "harmont_claims"


def notify(payload: str) -> None:
    """Post `payload` (`o <organization id>`, `a <agent id>`) when the current transaction commits."""
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, payload])


def credentials_changed(*, organization_id: int | None = None, agent_id: object = None) -> None:
    """The organization's (or one agent's) waiting claims check their credentials again."""
    if organization_id is not None:
        notify(f"o {organization_id}")
    if agent_id is not None:
        notify(f"a {agent_id}")
