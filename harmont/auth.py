"""Bearer-token authentication for `/api/v0`.

Tokens are random and stored only as their SHA-256; a request is authenticated
by hashing what it presents and looking the hash up. Because the lookup key is a
hash, a timing side channel on the index lookup reveals nothing about any valid
token; the final `compare_digest` makes the equality itself constant-time too.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

from django.db import connection
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from harmont.rows import Columns, first_row
from organizations.models import ApiToken, User

PERSONAL_TOKEN_PREFIX = "hm_"
# Agent credentials (see builds/agent_api.py); each prefix has its own table.
AGENT_TOKEN_PREFIX = "hma_"
AGENT_SESSION_PREFIX = "hms_"
JOB_CREDENTIAL_PREFIX = "hmj_"
# Writing last_used_at on every request would turn every read into a write;
# once every few minutes is precise enough for "last used".
LAST_USED_RESOLUTION = timedelta(minutes=5)

# Every API request runs this lookup, so it is written out as SQL: the ORM spent
# several times longer compiling it than PostgreSQL spends answering it. It loads
# what `ApiToken.objects.select_related("user")` loads: every column of both rows.
# Deliberately no cache in front of it: a revoked token stops working at once, in
# every process.
TOKEN_COLUMNS = Columns(ApiToken)
USER_COLUMNS = Columns(User)
TOKEN_WITH_USER_SQL = (
    f"SELECT {TOKEN_COLUMNS.select('t')}, {USER_COLUMNS.select('u')} "
    f"FROM {ApiToken._meta.db_table} t JOIN {User._meta.db_table} u ON u.id = t.user_id "
    "WHERE t.token_hash = %s"
)


def hash_secret(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def new_session_secret() -> str:
    """43 url-safe characters (256 bits), no prefix."""
    return secrets.token_urlsafe(32)


def new_personal_secret() -> str:
    return PERSONAL_TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_prefixed_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def token_with_user(digest: str) -> ApiToken | None:
    """The token whose hash is `digest`, its user loaded too; None if there is none."""
    cells = first_row(TOKEN_WITH_USER_SQL, [digest])
    if cells is None:
        return None
    token = TOKEN_COLUMNS.load(cells, connection)
    token.user = USER_COLUMNS.load(cells, connection)
    return token


def _is_plausible_token(raw: str) -> bool:
    return 16 <= len(raw) <= 256 and raw.isascii() and raw.isprintable() and " " not in raw


class BearerTokenAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer <session or personal API token>`."""

    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[User, ApiToken] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        scheme, _, raw = header.partition(" ")
        raw = raw.strip()
        if scheme.lower() != "bearer" or not raw or not _is_plausible_token(raw):
            raise exceptions.AuthenticationFailed("Malformed Authorization header; expected 'Bearer <token>'.")
        digest = hash_secret(raw)
        token = token_with_user(digest)
        now = timezone.now()
        if token is None or not hmac.compare_digest(token.token_hash, digest):
            raise exceptions.AuthenticationFailed("Unknown token.")
        if not token.is_usable(now) or not token.user.is_active:
            raise exceptions.AuthenticationFailed("This token has been revoked or has expired.")
        if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
            token.last_used_at = now
        return token.user, token

    def authenticate_header(self, request: Request) -> str:
        # A non-empty value makes DRF answer 401 (not 403) when credentials are missing.
        return 'Bearer realm="api"'


class BearerTokenScheme(OpenApiAuthenticationExtension):
    """Names the bearer scheme in /api/v0/openapi.json as the reference does."""

    target_class = BearerTokenAuthentication
    name = "bearer"

    def get_security_definition(self, auto_schema):  # noqa: ANN001, ANN201 (drf-spectacular hook)
        return {"type": "http", "scheme": "bearer", "description": "A session token or a personal API token (hm_...)."}
