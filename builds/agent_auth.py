"""Authentication for the agent API (/api/v0/agent/ and the internal source download).

Three credentials, none of which works anywhere else:
- the organization's agent token (`hma_...`) only registers an agent;
- the agent's session (`hms_...`, from register) claims jobs;
- the job credential (`hmj_...`, from claim) reports on that one job and
  downloads its inputs.
REST bearer tokens are refused here and these are refused by the REST API,
because each authentication class looks only in its own table.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from builds.models import Agent, Job
from builds.selectors import agent_for_session, job_for_credential
from harmont.tokens import (
    AGENT_SESSION_PREFIX,
    AGENT_TOKEN_PREFIX,
    JOB_CREDENTIAL_PREFIX,
    MalformedCredential,
    bearer_credential,
    hash_secret,
)
from organizations.models import AgentToken


class AgentPrincipal:
    """`request.user` for agent requests: authenticated, but no person."""

    is_authenticated = True
    is_anonymous = False
    is_staff = False

    def __init__(self, label: str) -> None:
        self.label = label

    def __str__(self) -> str:
        return self.label


def _agent_credential(request: Request, prefix: str) -> str | None:
    try:
        return bearer_credential(request.META.get("HTTP_AUTHORIZATION", ""), prefix=prefix)
    except MalformedCredential:
        raise exceptions.AuthenticationFailed("This route takes an agent credential.") from None


class AgentTokenAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[AgentPrincipal, AgentToken] | None:
        raw = _agent_credential(request, AGENT_TOKEN_PREFIX)
        if raw is None:
            return None
        token = AgentToken.objects.select_related("organization").filter(token_hash=hash_secret(raw)).first()
        if token is None or token.revoked_at is not None:
            raise exceptions.AuthenticationFailed("Unknown or revoked agent token.")
        return AgentPrincipal(f"agent token {token.pk}"), token

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="agent"'


class AgentSessionAuthentication(AgentTokenAuthentication):
    def authenticate(self, request: Request) -> tuple[AgentPrincipal, Agent] | None:
        raw = _agent_credential(request, AGENT_SESSION_PREFIX)
        if raw is None:
            return None
        # Revoking the organization's token stops its agents at their next request. The
        # checks are in the query (one answer for all three cases); every idle poll pays it.
        agent = agent_for_session(raw)
        if agent is None:
            raise exceptions.AuthenticationFailed("Unknown agent session, or its agent token was revoked.")
        return AgentPrincipal(agent.name), agent


class JobCredentialAuthentication(AgentTokenAuthentication):
    def authenticate(self, request: Request) -> tuple[AgentPrincipal, Job] | None:
        raw = _agent_credential(request, JOB_CREDENTIAL_PREFIX)
        if raw is None:
            return None
        job = job_for_credential(raw)  # None also when the job's agent token was revoked
        if job is None:
            raise exceptions.AuthenticationFailed("Unknown job credential, its job ended, or its agent token was revoked.")
        return AgentPrincipal(f"job {job.pk}"), job


class Authenticated(BasePermission):
    def has_permission(self, request: Request, view: Any) -> bool:
        if request.auth is None:
            raise exceptions.NotAuthenticated("Send the agent credential as `Authorization: Bearer ...`.")
        return True


for _cls, _name in ((AgentTokenAuthentication, "agentToken"), (AgentSessionAuthentication, "agentSession"),
                    (JobCredentialAuthentication, "jobCredential")):
    type(f"{_cls.__name__}Scheme", (OpenApiAuthenticationExtension,), {
        "target_class": _cls, "name": _name,
        "get_security_definition": lambda self, auto_schema: {"type": "http", "scheme": "bearer"},
    })
