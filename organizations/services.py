"""Writes for users, tokens and organizations. Every state change goes through here."""

from __future__ import annotations

import re
import secrets
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from harmont import claim_notices
from harmont.tokens import (
    AGENT_TOKEN_PREFIX,
    hash_secret,
    new_personal_secret,
    new_prefixed_secret,
    new_session_secret,
)
from harmont.errors import ApiError, validation_error
from organizations.access import require_role
from organizations.models import (
    AgentToken,
    ApiToken,
    CliGrantKind,
    CliLoginGrant,
    Invite,
    Membership,
    Organization,
    Role,
    TokenKind,
    User,
)

_NON_SLUG = re.compile(r"[^a-z0-9]+")
ORG_SLUG_BASE_LENGTH = Organization._meta.get_field("slug").max_length - 10
ORG_NAME_MAX_LENGTH = Organization._meta.get_field("name").max_length
USER_NAME_MAX_LENGTH = User._meta.get_field("name").max_length


def slugify_name(name: str, *, fallback: str = "org") -> str:
    """Lower-case; runs of anything but [a-z0-9] become '-'; trim '-'."""
    return _NON_SLUG.sub("-", name.lower()).strip("-") or fallback


def organization_name_errors(name: str) -> list[str]:
    """What is wrong with `name` as an organization's name ([] if nothing); the API, admin and createorg share it.

    A name must yield a slug: one made of nothing (`!!!`, or only letters
    outside a-z) would silently become the fallback `org`, which names nothing.
    """
    if not name.strip():
        return ["This field may not be blank."]
    if len(name) > ORG_NAME_MAX_LENGTH:
        return [f"Ensure this field has no more than {ORG_NAME_MAX_LENGTH} characters."]
    if not slugify_name(name, fallback=""):
        return ["Must contain a letter a-z or a digit 0-9: the organization's slug is made of them."]
    return []


def user_name_errors(name: str) -> list[str]:
    """What is wrong with `name` as a user's display name ([] if nothing); the API, sign-up and admin share it.

    Names appear beside emails in member lists and on every page; a newline or
    an escape character in one would garble them.
    """
    stripped = name.strip()
    if not stripped:
        return ["This field may not be blank."]
    if len(stripped) > USER_NAME_MAX_LENGTH:
        return [f"Ensure this field has no more than {USER_NAME_MAX_LENGTH} characters."]
    if any(unicodedata.category(c) == "Cc" for c in stripped):
        return ["Must not contain control characters such as a newline or a tab."]
    return []


@dataclass(frozen=True)
class IssuedToken:
    """A token row and its raw secret; the raw value exists only here, once."""

    token: ApiToken
    raw: str


def issue_session_token(*, user: User, now: datetime | None = None) -> IssuedToken:
    """A new session token for `user` (what sign-in and the CLI login hand out), expiring after SESSION_TOKEN_TTL_DAYS."""
    now = now or timezone.now()
    raw = new_session_secret()
    token = ApiToken.objects.create(
        user=user, kind=TokenKind.SESSION, token_hash=hash_secret(raw), created_at=now,
        expires_at=now + timedelta(days=settings.SESSION_TOKEN_TTL_DAYS),
    )
    return IssuedToken(token, raw)


def create_personal_token(*, user: User, description: str | None = None,
                          expires_at: datetime | None = None, now: datetime | None = None) -> IssuedToken:
    """A new personal API token (`hm_...`) for `user`; the raw value is returned once, only its hash is kept."""
    raw = new_personal_secret()
    token = ApiToken.objects.create(
        user=user, kind=TokenKind.PERSONAL, token_hash=hash_secret(raw), description=description,
        expires_at=expires_at, created_at=now or timezone.now(),
    )
    return IssuedToken(token, raw)


def _insert_org_with_unique_slug(*, name: str, url: str | None, personal_for: User | None,
                                 now: datetime) -> Organization:
    """Take the name's slug, else `-2`, `-3`, ... Races end in IntegrityError and retry."""
    # Names may be up to 255 characters, the slug column holds 100: cut the base
    # so that it and any `-N` suffix fit (PostgreSQL would refuse the INSERT).
    base = slugify_name(name)[:ORG_SLUG_BASE_LENGTH].rstrip("-")
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
    """A new organization; its creator is its owner. A name without a slug is 422 `organization_invalid`."""
    errors = organization_name_errors(name)
    if errors:
        raise validation_error({"name": errors}, code="organization_invalid")
    now = now or timezone.now()
    org = _insert_org_with_unique_slug(name=name, url=url, personal_for=None, now=now)
    Membership.objects.create(organization=org, user=owner, role=Role.OWNER, created_at=now)
    return org


@transaction.atomic
def create_user(*, email: str, password: str | None = None, name: str = "",
                is_staff: bool = False, self_registered: bool = False, now: datetime | None = None) -> User:
    """A user and their personal organization (named after them, they own it).

    `name` may be empty (no name yet); otherwise it follows `user_name_errors`
    (422 `user_name_invalid`).
    """
    errors = user_name_errors(name) if name else []
    if errors:
        raise validation_error({"name": errors}, code="user_name_invalid")
    name = name.strip()
    now = now or timezone.now()
    user = User.objects.create_user(email, password, name=name, is_staff=is_staff, is_superuser=is_staff,
                                    self_registered=self_registered, date_joined=now)
    org_name = name or email.split("@")[0]
    org = _insert_org_with_unique_slug(name=org_name, url=None, personal_for=user, now=now)
    Membership.objects.create(organization=org, user=user, role=Role.OWNER, created_at=now)
    return user


def existing_account_error(user: User, *, option: str = "--existing-user") -> str | None:
    """Why an operator's command should not give `user` an organization unasked, or None.

    An account that signed itself up at /signup was registered by whoever chose the email;
    giving it an organization the operator meant for the email's owner would hand it over.
    """
    if not user.self_registered:
        return None
    return (f"{user.email} signed itself up at /signup, so nobody has confirmed that it belongs to that "
            f"address's owner; pass {option} if you know it does.")


def get_or_create_user(*, email: str, name: str = "") -> tuple[User, bool]:
    """The user with this email (compared case-insensitively), created if there is none; and whether it was."""
    existing = User.objects.filter(email__iexact=email).first()
    if existing is not None:
        return existing, False
    return create_user(email=email, name=name), True


# ---------------------------------------------------------------- accounts and tokens

def update_user(*, user: User, name: str) -> User:
    """Change the display name (surrounding whitespace trimmed); a bad one is 422 `user_name_invalid`."""
    errors = user_name_errors(name)
    if errors:
        raise validation_error({"name": errors}, code="user_name_invalid")
    user.name = name.strip()
    user.save(update_fields=["name"])
    return user


@transaction.atomic
def delete_user(*, user: User) -> None:
    """Delete the account: its tokens, memberships, CLI grants and personal organization.

    Decided: an organization must never be left without an owner while people
    are still in it, so if the user is the last owner of any (non-personal)
    organization that has other members, nothing is deleted and the answer is
    409 `last_owner` naming those organizations; the user has to hand over
    ownership first. An organization the user owns *alone* (no other members)
    is deleted with the account: nobody could ever reach it again. The personal
    organization always goes with its user (`personal_for` cascades), whoever
    else was invited into it.
    """
    # Lock the owned organizations in id order: role changes and removals take
    # the same lock (`_lock_org`), so nobody can demote the other owners while
    # we count them, and two deletions can't deadlock on the order.
    owned_ids = list(
        Organization.objects.select_for_update(of=("self",))
        .filter(memberships__user=user, memberships__role=Role.OWNER)
        .exclude(personal_for=user)
        .order_by("id")
        .values_list("id", flat=True)
    )
    # Other owners per owned organization that has anyone else in it at all.
    other_owners = dict(
        Membership.objects.filter(organization_id__in=owned_ids).exclude(user=user)
        .values("organization_id").order_by()
        .annotate(owners=Count("id", filter=Q(role=Role.OWNER)))
        .values_list("organization_id", "owners")
    )
    stranded = [org_id for org_id, owners in other_owners.items() if owners == 0]
    if stranded:
        slugs = ", ".join(Organization.objects.filter(id__in=stranded).order_by("slug").values_list("slug", flat=True))
        raise ApiError("last_owner", f"You are the last owner of {slugs}, where other members remain. Make one of "
                                     "them owner (or remove them) before deleting your account.")
    Organization.objects.filter(id__in=[org_id for org_id in owned_ids if org_id not in other_owners]).delete()
    user.delete()


def revoke_personal_token(*, user: User, token_id: uuid.UUID, now: datetime | None = None) -> None:
    """Revoke one of `user`'s personal API tokens; 404 `api_token_not_found` unless it exists and is not revoked.

    One compare-and-set UPDATE: of two racing revocations one is 204 and the
    other 404, and the first revocation time stays.
    """
    now = now or timezone.now()
    if not ApiToken.objects.filter(user=user, kind=TokenKind.PERSONAL, pk=token_id,
                                   revoked_at__isnull=True).update(revoked_at=now):
        raise ApiError("api_token_not_found", f"You have no API token {token_id} that is not revoked.")


def revoke_api_token(*, token: ApiToken, now: datetime | None = None) -> ApiToken:
    """Revoke one token (personal or session). Idempotent: the first revocation time stays."""
    now = now or timezone.now()
    if ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=now):
        token.revoked_at = now
    return token


@dataclass(frozen=True)
class IssuedAgentToken:
    token: AgentToken
    raw: str


def create_agent_token(*, organization: Organization, created_by: User | None = None, description: str = "",
                       now: datetime | None = None) -> IssuedAgentToken:
    """A token the organization's agents register with; the raw value exists only in the result."""
    raw = new_prefixed_secret(AGENT_TOKEN_PREFIX)
    token = AgentToken.objects.create(organization=organization, description=description, created_by=created_by,
                                      token_hash=hash_secret(raw), created_at=now or timezone.now())
    return IssuedAgentToken(token, raw)


def revoke_agent_token(*, token: AgentToken, now: datetime | None = None) -> AgentToken:
    """Revoke an agent token: its agents are refused at their next request. Idempotent."""
    now = now or timezone.now()
    with transaction.atomic():
        if AgentToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=now):
            token.revoked_at = now
            claim_notices.credentials_changed(organization_id=token.organization_id)
    return token


def revoke_api_tokens(*, tokens: QuerySet[ApiToken], now: datetime | None = None) -> int:
    """Revoke every not yet revoked token of `tokens` (the admin action); returns how many."""
    return tokens.filter(revoked_at__isnull=True).update(revoked_at=now or timezone.now())


# ---------------------------------------------------------------- CLI login

CLI_TRANSFER_TTL = timedelta(seconds=60)
CLI_CODE_TTL = timedelta(seconds=300)
# Crockford's base32: no I, L, O, U, so a code read aloud or retyped survives.
CLI_CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CLI_CODE_LENGTH = 16  # 80 random bits
CLI_NONCE_MAX_LENGTH = 512
# Used and expired grants are worthless; they are swept when new ones are made.
CLI_GRANT_RETENTION = timedelta(days=1)
_CODE_LOOKALIKES = str.maketrans({"O": "0", "I": "1", "L": "1"})


def _purge_cli_grants(*, now: datetime) -> None:
    CliLoginGrant.objects.filter(expires_at__lt=now - CLI_GRANT_RETENTION).delete()


def park_cli_transfer(*, user: User, nonce: str, now: datetime | None = None) -> CliLoginGrant:
    """Let the CLI holding `nonce` claim a session token for `user` within 60 s.

    Only sha256(nonce) is stored and no token is minted yet (that happens at
    claim), so this table never holds a usable credential. A nonce can be parked
    once: a second park would let whoever parked first choose whose account the
    CLI ends up in, so it is refused (400 `invalid_request`).
    """
    now = now or timezone.now()
    if not isinstance(nonce, str) or not nonce.strip() or len(nonce) > CLI_NONCE_MAX_LENGTH:
        raise ApiError("invalid_request", f"`nonce` must be a non-empty string of at most {CLI_NONCE_MAX_LENGTH} "
                                          "characters, as generated by the CLI.")
    _purge_cli_grants(now=now)
    try:
        with transaction.atomic():
            return CliLoginGrant.objects.create(secret_hash=hash_secret(nonce), kind=CliGrantKind.TRANSFER,
                                                user=user, created_at=now, expires_at=now + CLI_TRANSFER_TTL)
    except IntegrityError:
        raise ApiError("invalid_request", "This nonce has already been used for a CLI login; "
                                          "start the login again from the CLI.") from None


def create_cli_code(*, user: User, now: datetime | None = None) -> str:
    """A 16-character paste code that the CLI can redeem for a session token within 300 s."""
    now = now or timezone.now()
    _purge_cli_grants(now=now)
    for _ in range(5):
        code = "".join(secrets.choice(CLI_CODE_ALPHABET) for _ in range(CLI_CODE_LENGTH))
        try:
            with transaction.atomic():
                CliLoginGrant.objects.create(secret_hash=hash_secret(code), kind=CliGrantKind.CODE, user=user,
                                             created_at=now, expires_at=now + CLI_CODE_TTL)
            return code
        except IntegrityError:  # 80 random bits: a collision is all but impossible, but cheap to handle
            continue
    raise RuntimeError("could not find an unused CLI code")


def normalize_cli_code(raw: str) -> str:
    """What the user typed → the canonical code: case, spaces, dashes and look-alikes forgiven."""
    return "".join(raw.split()).replace("-", "").upper().translate(_CODE_LOOKALIKES)


def _consume_cli_grant(*, secret: str, kind: str, now: datetime) -> IssuedToken | None:
    digest = hash_secret(secret)
    with transaction.atomic():
        # Compare-and-set: of two racing claims exactly one UPDATE matches
        # `used_at IS NULL`. Expired grants are consumed as well, so a late
        # (possibly leaked) secret can't be retried.
        consumed = CliLoginGrant.objects.filter(secret_hash=digest, kind=kind, used_at__isnull=True).update(used_at=now)
        if not consumed:
            return None
        grant = CliLoginGrant.objects.select_related("user").get(secret_hash=digest)
        if grant.expires_at <= now or not grant.user.is_active:
            return None  # returning (not raising) keeps the consumption committed
        return issue_session_token(user=grant.user, now=now)


def claim_cli_transfer(*, nonce: str, now: datetime | None = None) -> IssuedToken:
    """The CLI's side of the loopback login: single use, 400 `cli_code_invalid` otherwise."""
    issued = None
    if isinstance(nonce, str) and nonce and len(nonce) <= CLI_NONCE_MAX_LENGTH:
        issued = _consume_cli_grant(secret=nonce, kind=CliGrantKind.TRANSFER, now=now or timezone.now())
    if issued is None:
        raise ApiError("cli_code_invalid", "No CLI login is waiting for this nonce: it was never authorized in "
                                           "the browser, has expired, or was already claimed.")
    return issued


def redeem_cli_code(*, code: str, now: datetime | None = None) -> IssuedToken:
    """The CLI's side of the paste-code login: single use, 400 `cli_code_invalid` otherwise."""
    issued = None
    if isinstance(code, str):
        canonical = normalize_cli_code(code)
        if len(canonical) == CLI_CODE_LENGTH:
            issued = _consume_cli_grant(secret=canonical, kind=CliGrantKind.CODE, now=now or timezone.now())
    if issued is None:
        raise ApiError("cli_code_invalid", "This code is not valid: it is mistyped, expired, or already used.")
    return issued


# ---------------------------------------------------------------- members

def _lock_org(organization: Organization) -> bool:
    """Take the organization's row lock; False if the organization is gone.

    Every write that can change who owns an organization, or who is in it,
    takes this lock first. Checks such as "is this the last owner?" are then
    made against a count nobody else can change until we commit: two
    concurrent demotions of the last two owners can't both pass. (SQLite has no
    row locks, but its IMMEDIATE transactions serialize writers anyway.)
    """
    return bool(list(Organization.objects.select_for_update().filter(pk=organization.pk).values_list("pk", flat=True)))


def _locked_memberships(organization: Organization, actor: User, user: User) -> tuple[Membership, Membership]:
    """Re-read the actor's and the target's memberships under the organization lock."""
    if not _lock_org(organization):
        raise ApiError("organization_not_found", f"No organization {organization.slug!r}.")
    rows = {m.user_id: m for m in Membership.objects.select_related("user")
            .filter(organization=organization, user_id__in={actor.pk, user.pk})}
    if actor.pk not in rows:  # removed while this request was on its way
        raise ApiError("organization_not_found", f"No organization {organization.slug!r}.")
    if user.pk not in rows:
        raise ApiError("member_not_found", f"No member {user.uuid} in organization {organization.slug!r}.")
    return rows[actor.pk], rows[user.pk]


def _check_may_stop_owning(organization: Organization, membership: Membership) -> None:
    """Refuse demoting or removing the last owner, and the personal organization's own user."""
    if membership.role == Role.OWNER and \
            Membership.objects.filter(organization=organization, role=Role.OWNER).count() <= 1:
        raise ApiError("last_owner", f"{membership.user.email} is the last owner of {organization.slug!r}; "
                                     "make someone else owner first.")
    if organization.personal_for_id is not None and organization.personal_for_id == membership.user_id:
        raise ApiError("personal_org_owner", f"{organization.slug!r} is the personal organization of "
                                             f"{membership.user.email}; they stay its owner.")


@transaction.atomic
def change_member_role(*, organization: Organization, actor: User, user: User, role: str) -> Membership:
    """Set `user`'s role in `organization`, on behalf of `actor`.

    Admins and owners manage roles; only owners grant the owner role or take
    it away (403 `insufficient_org_role`); the last owner stays (409).
    Setting the role a member already has is a no-op.
    """
    if role not in Role.values:
        raise validation_error({"role": [f"must be one of {', '.join(Role.values)}"]}, code="invalid_role")
    actor_membership, target = _locked_memberships(organization, actor, user)
    require_role(actor_membership, Role.ADMIN, action="change member roles")
    if Role.OWNER in (target.role, role):
        require_role(actor_membership, Role.OWNER, action="grant or remove the owner role")
    if target.role == role:
        return target
    if target.role == Role.OWNER:
        _check_may_stop_owning(organization, target)
    target.role = role
    target.save(update_fields=["role"])
    return target


@transaction.atomic
def remove_member(*, organization: Organization, actor: User, user: User) -> None:
    """Remove `user` from `organization`; `actor == user` is leaving, which any member may do.

    Removing someone else needs admin, and removing an owner needs owner. The
    last owner can't leave or be removed (409 `last_owner`).
    """
    actor_membership, target = _locked_memberships(organization, actor, user)
    if target.pk != actor_membership.pk:
        require_role(actor_membership, Role.ADMIN, action="remove members")
        if target.role == Role.OWNER:
            require_role(actor_membership, Role.OWNER, action="remove owners")
    _check_may_stop_owning(organization, target)
    target.delete()


@transaction.atomic
def set_membership(*, organization: Organization, user: User, role: str | None = None) -> Membership:
    """Operator path (`manage.py createtoken --org`): add `user`, or change their role.

    No actor and no role rules: whoever runs manage.py owns the server. The
    organization still keeps an owner. A new member gets `role` or `member`;
    an existing one keeps their role unless `role` is given.
    """
    if role is not None and role not in Role.values:
        raise validation_error({"role": [f"must be one of {', '.join(Role.values)}"]}, code="invalid_role")
    if not _lock_org(organization):
        raise ApiError("organization_not_found", f"No organization {organization.slug!r}.")
    membership = Membership.objects.select_related("user").filter(organization=organization, user=user).first()
    if membership is None:
        return Membership.objects.create(organization=organization, user=user, role=role or Role.MEMBER)
    if role is None or membership.role == role:
        return membership
    if membership.role == Role.OWNER:
        _check_may_stop_owning(organization, membership)
    membership.role = role
    membership.save(update_fields=["role"])
    return membership


# ---------------------------------------------------------------- invites

INVITE_TTL = timedelta(days=7)
INVITE_ROLES = (Role.ADMIN, Role.MEMBER)


@dataclass(frozen=True)
class IssuedInvite:
    """An invite row and its raw token; the raw value exists only here, once."""

    invite: Invite
    raw: str


@transaction.atomic
def create_invite(*, organization: Organization, invited_by: User | None, email: str, role: str,
                  now: datetime | None = None) -> IssuedInvite:
    """Invite `email` as `role` (admin or member; owners are made by promotion, never by invite).

    Re-inviting an address that has an open invite revokes the old one (its
    link stops working) and issues a new one. Only sha256 of the token is stored.
    """
    now = now or timezone.now()
    if role not in INVITE_ROLES:
        raise validation_error({"role": [f"must be one of {', '.join(INVITE_ROLES)}; "
                                         "owners are made by promoting a member"]}, code="invalid_role")
    # Stored lower-case like users' emails, so matching is plain equality.
    email = email.strip().lower()
    # Serializes invites to one organization: two concurrent re-invites of one
    # address would otherwise both revoke-then-insert and one would hit the
    # one-open-invite-per-address index.
    if not _lock_org(organization):
        raise ApiError("organization_not_found", f"No organization {organization.slug!r}.")
    if Membership.objects.filter(organization=organization, user__email__iexact=email).exists():
        raise ApiError("already_member", f"{email} is already a member of {organization.slug!r}.")
    # "Open" for the unique index means not accepted and not revoked, expired or not.
    Invite.objects.filter(organization=organization, email__iexact=email, accepted_at__isnull=True,
                          revoked_at__isnull=True).update(revoked_at=now)
    raw = secrets.token_urlsafe(32)
    invite = Invite.objects.create(organization=organization, email=email, role=role, token_hash=hash_secret(raw),
                                   invited_by=invited_by, created_at=now, expires_at=now + INVITE_TTL)
    return IssuedInvite(invite, raw)


def open_invites(*, organization: Organization, now: datetime | None = None) -> QuerySet[Invite]:
    """Invites that can still be accepted: not accepted, not revoked, not expired."""
    return Invite.objects.filter(organization=organization, accepted_at__isnull=True, revoked_at__isnull=True,
                                 expires_at__gt=now or timezone.now())


def revoke_invite(*, organization: Organization, invite_id: uuid.UUID, now: datetime | None = None) -> None:
    """Revoke an open invite of `organization`; anything else is 404 `invite_not_found`."""
    now = now or timezone.now()
    # One compare-and-set UPDATE: an invite accepted a moment ago is not revoked after the fact.
    if not open_invites(organization=organization, now=now).filter(pk=invite_id).update(revoked_at=now):
        raise ApiError("invite_not_found", f"No open invite {invite_id} in organization {organization.slug!r}.")


@transaction.atomic
def accept_invite(*, user: User, token: str, now: datetime | None = None) -> Organization:
    """Join the organization of the open invite `token`, which must be addressed to `user`.

    Every refusal is 422 `invite_unacceptable` and changes nothing: a token
    that is unknown, revoked, expired or already accepted (also by this same
    user: a second accept is 422), an invite addressed to another email, and a
    caller who is already a member (they joined some other way after being
    invited; the invite stays open, and an invite never changes a role).
    """
    now = now or timezone.now()
    invite = (Invite.objects.select_related("organization").filter(token_hash=hash_secret(token)).first()
              if isinstance(token, str) and token else None)
    if invite is None:
        raise _unacceptable("No invite has this token.")
    if invite.email.lower() != user.email.lower():
        raise _unacceptable("This invite was sent to a different email address than your account's.")
    if not _lock_org(invite.organization):
        raise _unacceptable("The organization of this invite no longer exists.")
    # Compare-and-set on accepted_at: of two racing accepts exactly one wins.
    accepted = open_invites(organization=invite.organization, now=now).filter(pk=invite.pk).update(
        accepted_at=now, accepted_by=user)
    if not accepted:
        raise _unacceptable("This invite has already been accepted, was revoked, or has expired.")
    _, joined = Membership.objects.get_or_create(organization=invite.organization, user=user,
                                                 defaults={"role": invite.role, "created_at": now})
    if not joined:
        # Raised inside the transaction, so the acceptance above is rolled back with it.
        raise _unacceptable(f"You are already a member of {invite.organization.slug!r}.")
    return invite.organization


def _unacceptable(message: str) -> ApiError:
    return ApiError("invite_unacceptable", message)
