"""Credentials as strings: their prefixes, how they are made and hashed, how a request presents them.

Model-free, so every app (and the agent API's three credentials) can use it
without importing the tables the credentials live in. Tokens are random and
stored only as their SHA-256: a lookup hashes what the caller presents and
looks the hash up, so a timing side channel on the index reveals nothing about
any valid token.
"""

from __future__ import annotations

import hashlib
import secrets

PERSONAL_TOKEN_PREFIX = "hm_"
# Agent credentials (see builds/agent_auth.py); each prefix has its own table.
AGENT_TOKEN_PREFIX = "hma_"
AGENT_SESSION_PREFIX = "hms_"
JOB_CREDENTIAL_PREFIX = "hmj_"
# Longer than any credential this server issues; a longer header is refused before hashing.
MAX_CREDENTIAL_LENGTH = 256


def hash_secret(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def new_session_secret() -> str:
    """43 url-safe characters (256 bits), no prefix."""
    return secrets.token_urlsafe(32)


def new_personal_secret() -> str:
    return new_prefixed_secret(PERSONAL_TOKEN_PREFIX)


def new_prefixed_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


class MalformedCredential(ValueError):
    """The Authorization header is there but is not `Bearer <credential>` of the expected kind."""


def bearer_credential(header: str, *, prefix: str = "") -> str | None:
    """The credential of an `Authorization: Bearer <credential>` header; None when there is no header.

    Raises MalformedCredential for another scheme, an empty or implausible
    credential, or one without `prefix` (each credential kind has its own).
    """
    if not header:
        return None
    scheme, _, raw = header.partition(" ")
    raw = raw.strip()
    if scheme.lower() != "bearer" or not _is_plausible(raw) or not raw.startswith(prefix):
        raise MalformedCredential(header)
    return raw


def _is_plausible(raw: str) -> bool:
    return 16 <= len(raw) <= MAX_CREDENTIAL_LENGTH and raw.isascii() and raw.isprintable() and " " not in raw
