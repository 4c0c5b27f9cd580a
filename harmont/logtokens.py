"""Build-scoped log tokens: short-lived JWTs for the SSE log stream.

`EventSource` cannot send an Authorization header, so the browser puts this
token in the query string. It is deliberately weak: it names one build, has
its own secret and audience, and expires within the hour. It is not a bearer
token; the API's bearer authentication never accepts it (it is not in the token table).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import jwt
from django.conf import settings
from django.utils import timezone

AUDIENCE = "logs"
ISSUER = "harmont"
ALGORITHM = "HS256"


class LogTokenInvalid(Exception):
    """The token is missing, malformed, expired, or signed with another secret."""


@dataclass(frozen=True)
class LogToken:
    token: str
    expires_at: datetime


def mint_log_token(*, build_id: uuid.UUID, now: datetime | None = None,
                   ttl_seconds: int | None = None) -> LogToken:
    now = now or timezone.now()
    expires_at = now + timedelta(seconds=ttl_seconds or settings.LOG_TOKEN_TTL_SECONDS)
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": str(build_id),
        "iat": int(now.timestamp()),
        "exp": int(expires_at.timestamp()),
    }
    token = jwt.encode(claims, settings.LOG_TOKEN_SECRET, algorithm=ALGORITHM)
    return LogToken(token=token, expires_at=expires_at.replace(microsecond=0))


def verify_log_token(token: str | None) -> uuid.UUID:
    """Return the build id the token opens, or raise LogTokenInvalid."""
    if not token:
        raise LogTokenInvalid("missing log token")
    options = {"require": ["exp", "sub", "aud", "iss"]}
    try:
        claims = jwt.decode(token, settings.LOG_TOKEN_SECRET, algorithms=[ALGORITHM], audience=AUDIENCE,
                            issuer=ISSUER, options=options)
        return uuid.UUID(claims["sub"])
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise LogTokenInvalid(str(exc)) from None


def log_token_opens_build(token: str | None, build_id: uuid.UUID) -> bool:
    try:
        return verify_log_token(token) == build_id
    except LogTokenInvalid:
        return False
