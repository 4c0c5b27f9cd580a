"""Users, their tokens, organizations, memberships, invites and CLI-login grants."""

from __future__ import annotations

import uuid

from django.contrib.auth.base_user import AbstractBaseUser, BaseUserManager
from django.contrib.auth.models import PermissionsMixin
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone


class UserManager(BaseUserManager["User"]):
    use_in_migrations = True

    def create_user(self, email: str, password: str | None = None, **extra: object) -> "User":
        user = self.model(email=self.normalize_email(email).lower(), **extra)
        if password:
            user.set_password(password)
        else:
            user.set_unusable_password()
        user.save(using=self._db)
        return user

    def create_superuser(self, email: str, password: str | None = None, **extra: object) -> "User":
        extra.setdefault("is_staff", True)
        extra.setdefault("is_superuser", True)
        return self.create_user(email, password, **extra)


class User(AbstractBaseUser, PermissionsMixin):
    """A person. Signs in with email + password; the API uses bearer tokens."""

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    email = models.EmailField(unique=True)
    name = models.CharField(max_length=255, blank=True, default="")
    is_staff = models.BooleanField(default=False)
    is_active = models.BooleanField(default=True)
    date_joined = models.DateTimeField(default=timezone.now)
    # Created at /signup: whoever registered chose the email and nobody confirmed it, so
    # operators' commands don't hand such an account an organization without being told to.
    self_registered = models.BooleanField(default=False)

    objects = UserManager()

    USERNAME_FIELD = "email"
    EMAIL_FIELD = "email"
    REQUIRED_FIELDS: list[str] = []

    def __str__(self) -> str:
        return self.email


class Role(models.TextChoices):
    OWNER = "owner"
    ADMIN = "admin"
    MEMBER = "member"


ROLE_RANK = {Role.MEMBER: 1, Role.ADMIN: 2, Role.OWNER: 3}


class OrganizationQuerySet(models.QuerySet["Organization"]):
    def for_user(self, user: User) -> "OrganizationQuerySet":
        return self.filter(memberships__user=user)


class Organization(models.Model):
    slug = models.SlugField(max_length=100, unique=True)
    name = models.CharField(max_length=255)
    url = models.CharField(max_length=500, blank=True, null=True)
    # Set on the organization created for a user at sign-up.
    personal_for = models.OneToOneField(
        User, null=True, blank=True, on_delete=models.CASCADE, related_name="personal_org"
    )
    created_at = models.DateTimeField(default=timezone.now)

    objects = OrganizationQuerySet.as_manager()

    def __str__(self) -> str:
        return self.slug


class Membership(models.Model):
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["organization", "user"], name="membership_unique")]
        indexes = [
            models.Index(fields=["user", "organization"], name="membership_by_user"),
            # The members list, keyset-paginated by (created_at, id).
            models.Index(fields=["organization", "created_at", "id"], name="membership_by_org"),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.organization} ({self.role})"

    def has_role(self, role: str) -> bool:
        return ROLE_RANK[Role(self.role)] >= ROLE_RANK[Role(role)]


class TokenKind(models.TextChoices):
    SESSION = "session"
    PERSONAL = "personal"


class ApiToken(models.Model):
    """A bearer token. Only the SHA-256 of the raw value is stored."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_tokens")
    kind = models.CharField(max_length=10, choices=TokenKind.choices)
    token_hash = models.CharField(max_length=64, unique=True)
    description = models.CharField(max_length=255, blank=True, null=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["user", "kind", "created_at"], name="apitoken_by_user")]

    def __str__(self) -> str:
        return f"{self.kind} token {self.id} of {self.user_id}"

    def is_usable(self, now=None) -> bool:
        now = now or timezone.now()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


class Invite(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="invites")
    email = models.EmailField()
    role = models.CharField(max_length=10, choices=[(Role.ADMIN, "admin"), (Role.MEMBER, "member")])
    token_hash = models.CharField(max_length=64, unique=True)
    invited_by = models.ForeignKey(User, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["organization", "created_at"], name="invite_by_org")]
        constraints = [
            # One open invite per address and organization; re-inviting replaces it.
            models.UniqueConstraint(
                Lower("email"), "organization",
                condition=models.Q(accepted_at__isnull=True, revoked_at__isnull=True),
                name="invite_one_open_per_email",
            )
        ]

    def __str__(self) -> str:
        return f"invite {self.email} to {self.organization_id}"


class CliGrantKind(models.TextChoices):
    TRANSFER = "transfer"  # loopback hand-off: the CLI claims with its nonce
    CODE = "code"  # paste code typed into the CLI


class CliLoginGrant(models.Model):
    """A signed-in user's permission for one CLI to obtain a session token.

    Keyed by the SHA-256 of the nonce or code. The session token itself is minted
    at claim/redeem time, so no usable token ever sits in this table.
    """

    secret_hash = models.CharField(max_length=64, unique=True)
    kind = models.CharField(max_length=10, choices=CliGrantKind.choices)
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"cli {self.kind} grant for {self.user_id}"


class AgentToken(models.Model):
    """An organization's token for its agents. Only the SHA-256 of the raw value is stored."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="agent_tokens")
    description = models.CharField(max_length=255, blank=True, default="")
    token_hash = models.CharField(max_length=64, unique=True)
    created_by = models.ForeignKey(User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["organization", "created_at"], name="agenttoken_by_org")]

    def __str__(self) -> str:
        return f"agent token {self.description or self.id} of {self.organization_id}"


class IdempotencyState(models.TextChoices):
    IN_PROGRESS = "in_progress"
    COMPLETE = "complete"


class IdempotencyKey(models.Model):
    """The first answer to a request sent with an `Idempotency-Key`, so that a retry gets it again.

    One row per caller, route and key; see organizations.idempotency.
    """

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="+")
    # SHA-256 of the method, route name and URL kwargs: URL segments are unbounded, the unique index is not.
    route = models.CharField(max_length=64)
    key = models.CharField(max_length=255)
    path = models.TextField()  # the first request's path, for operators
    # Keyed with the secret key: the bodies it stands for may hold secrets' values.
    request_hash = models.CharField(max_length=64)
    state = models.CharField(max_length=12, choices=IdempotencyState.choices, default=IdempotencyState.IN_PROGRESS)
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    # The body as first sent, byte for byte (jsonb would reorder its keys).
    response_body = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "route", "key"], name="idempotency_key_unique")]
        indexes = [models.Index(fields=["expires_at"], name="idempotency_key_expiry")]

    def __str__(self) -> str:
        return f"idempotency key {self.key!r} of {self.user_id}"
