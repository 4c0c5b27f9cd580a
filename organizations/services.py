"""Writes for users, tokens and organizations. Every state change goes through here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from harmont.auth import hash_secret, new_personal_secret, new_session_secret
from organizations.models import ApiToken, Membership, Organization, Role, TokenKind, User

_NON_SLUG = re.compile(r"[^a-z0-9]+")


def slugify_name(name: str, *, fallback: str = "org") -> str:
    """Lower-case; runs of anything but [a-z0-9] become '-'; trim '-'."""
    return _NON_SLUG.sub("-", name.lower()).strip("-") or fallback


@dataclass(frozen=True)
class IssuedToken:
    """A token row and its raw secret; the raw value exists only here, once."""

    token: ApiToken
    raw: str


def issue_session_token(*, user: User, now: datetime | None = None) -> IssuedToken:
    now = now or timezone.now()
    raw = new_session_secret()
    token = ApiToken.objects.create(
        user=user, kind=TokenKind.SESSION, token_hash=hash_secret(raw), created_at=now,
        expires_at=now + timedelta(days=settings.SESSION_TOKEN_TTL_DAYS),
    )
    return IssuedToken(token, raw)


def create_personal_token(*, user: User, description: str | None = None,
                          expires_at: datetime | None = None, now: datetime | None = None) -> IssuedToken:
    raw = new_personal_secret()
    token = ApiToken.objects.create(
        user=user, kind=TokenKind.PERSONAL, token_hash=hash_secret(raw), description=description,
        expires_at=expires_at, created_at=now or timezone.now(),
    )
    return IssuedToken(token, raw)


def _insert_org_with_unique_slug(*, name: str, url: str | None, personal_for: User | None,
                                 now: datetime) -> Organization:
    """Take the name's slug, else `-2`, `-3`, ... Races end in IntegrityError and retry."""
    base = slugify_name(name)
    taken = set(
        Organization.objects.filter(slug__regex=rf"^{re.escape(base)}(-[0-9]+)?$").values_list("slug", flat=True)
    )
    suffix = 1
    while True:
        slug = base if suffix == 1 else f"{base}-{suffix}"
        suffix += 1
        if slug in taken:
            continue
        try:
            with transaction.atomic():
                return Organization.objects.create(slug=slug, name=name, url=url, personal_for=personal_for,
                                                   created_at=now)
        except IntegrityError:
            taken.add(slug)


@transaction.atomic
def create_organization(*, name: str, owner: User, url: str | None = None,
                        now: datetime | None = None) -> Organization:
    """A new organization; its creator is its owner."""
    now = now or timezone.now()
    org = _insert_org_with_unique_slug(name=name, url=url, personal_for=None, now=now)
    Membership.objects.create(organization=org, user=owner, role=Role.OWNER, created_at=now)
    return org


@transaction.atomic
def create_user(*, email: str, password: str | None = None, name: str = "",
                is_staff: bool = False, now: datetime | None = None) -> User:
    """A user and their personal organization (named after them, they own it)."""
    now = now or timezone.now()
    user = User.objects.create_user(email, password, name=name, is_staff=is_staff, is_superuser=is_staff,
                                    date_joined=now)
    org_name = name or email.split("@")[0]
    org = _insert_org_with_unique_slug(name=org_name, url=None, personal_for=user, now=now)
    Membership.objects.create(organization=org, user=user, role=Role.OWNER, created_at=now)
    return user


def get_or_create_user(*, email: str, name: str = "") -> tuple[User, bool]:
    existing = User.objects.filter(email__iexact=email).first()
    if existing is not None:
        return existing, False
    return create_user(email=email, name=name), True
