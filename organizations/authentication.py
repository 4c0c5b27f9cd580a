"""Bearer-token authentication for `/api/v0`: session tokens and personal API tokens.

A request is authenticated by hashing what it presents and looking the hash up
(`harmont.tokens`); the final `compare_digest` makes the equality itself
constant-time too.
"""

from __future__ import annotations

import hmac
from datetime import datetime, timedelta

from django.db.models import Q
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from harmont.tokens import MalformedCredential, bearer_credential, hash_secret
from organizations.models import ApiToken, User
from organizations.sql import token_with_user

# Writing last_used_at on every request would turn every read into a write;
# once a minute is precise enough for "last used".
LAST_USED_RESOLUTION = timedelta(minutes=1)


def record_token_use(token: ApiToken, *, now: datetime) -> None:
    """Move the token's `last_used_at` to `now`, unless it moved less than LAST_USED_RESOLUTION ago.

    A compare-and-set on the stored time, so requests racing with one token
    write it once. (Here rather than in services.py: DRF imports this module
    while the services' own imports are still loading.)
    """
    if token.last_used_at is not None and now - token.last_used_at < LAST_USED_RESOLUTION:
        return
    stale = Q(last_used_at__isnull=True) | Q(last_used_at__lte=now - LAST_USED_RESOLUTION)
    if ApiToken.objects.filter(stale, pk=token.pk).update(last_used_at=now):
        token.last_used_at = now


class BearerTokenAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer <session or personal API token>`."""

    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[User, ApiToken] | None:
        try:
            raw = bearer_credential(request.META.get("HTTP_AUTHORIZATION", ""))
        except MalformedCredential:
            raise exceptions.AuthenticationFailed("Malformed Authorization header; expected 'Bearer <token>'.")
        if raw is None:
            return None
        digest = hash_secret(raw)
        token = token_with_user(digest)
        now = timezone.now()
        if token is None or not hmac.compare_digest(token.token_hash, digest):
            raise exceptions.AuthenticationFailed("Unknown token.")
        if not token.is_usable(now) or not token.user.is_active:
            raise exceptions.AuthenticationFailed("This token has been revoked or has expired.")
        record_token_use(token, now=now)
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
