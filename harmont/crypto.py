"""Encryption at rest for values the server must read back (secrets, webhook secrets).

Fernet (AES-128-CBC + HMAC-SHA256) from `cryptography`; the keys come from
settings.SECRETS_KEYS. The first key encrypts and every key decrypts, so a new
key can be put in front and old values re-encrypted at leisure.
"""

from __future__ import annotations

from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


@lru_cache(maxsize=4)
def _fernet(keys: tuple[str, ...]) -> MultiFernet:
    try:
        return MultiFernet([Fernet(key.encode()) for key in keys])
    except ValueError as exc:
        raise ImproperlyConfigured(
            "HARMONT_SECRETS_KEY must be Fernet keys (32 url-safe base64-encoded bytes), comma-separated"
        ) from exc


def _keys() -> MultiFernet:
    # Looked up per call (cached per key tuple) so tests that override the setting see it.
    return _fernet(tuple(settings.SECRETS_KEYS))


def encrypt_text(value: str) -> str:
    return _keys().encrypt(value.encode()).decode("ascii")


def decrypt_text(token: str) -> str:
    """The plain value. Raises ImproperlyConfigured when no configured key opens it (a lost key)."""
    try:
        return _keys().decrypt(token.encode("ascii")).decode()
    except InvalidToken as exc:
        raise ImproperlyConfigured("A stored secret can't be decrypted with HARMONT_SECRETS_KEY") from exc


def reencrypt_text(token: str) -> str | None:
    """`token` encrypted with the first key, or None when it already is.

    Raises ImproperlyConfigured when no configured key opens it.
    """
    keys = tuple(settings.SECRETS_KEYS)
    try:
        _fernet(keys[:1]).decrypt(token.encode("ascii"))
        return None
    except InvalidToken:
        pass
    try:
        return _fernet(keys).rotate(token.encode("ascii")).decode("ascii")
    except InvalidToken as exc:
        raise ImproperlyConfigured("A stored secret can't be decrypted with HARMONT_SECRETS_KEY") from exc
