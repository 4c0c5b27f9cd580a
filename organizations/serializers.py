"""Accounts and organizations JSON <-> Python. No queries here: views select what is shown.

Class names give the component names in /api/v0/openapi.json and follow the
reference (`CurrentUserResponse`, `ApiToken`, `Organization`, `OrgMember`, ...).
"""

from __future__ import annotations

from typing import Any

from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from harmont.serializers import page_serializer
from organizations.models import AgentToken, ApiToken, Invite, Membership, Organization, Role
from organizations.services import INVITE_ROLES


INVITE_ROLE_CHOICES = [(role.value, role.value) for role in INVITE_ROLES]


# Two different choice sets travel under the one field name `role` (members may be
# owners, invites may not). As named components they don't collide in the
# schema's enum naming (which would otherwise invent a name like `Role978Enum`).
@extend_schema_field({"type": "string", "enum": Role.values}, component_name="Role")
class RoleField(serializers.ChoiceField):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(choices=Role.choices, **kwargs)


@extend_schema_field({"type": "string", "enum": [value for value, _ in INVITE_ROLE_CHOICES]},
                     component_name="InviteRole")
class InviteRoleField(serializers.ChoiceField):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(choices=INVITE_ROLE_CHOICES, **kwargs)


# ---------------------------------------------------------------- user and tokens

class CurrentUserResponseSerializer(serializers.Serializer):
    """Rendered from a dict the view builds (the personal org slug is not a User attribute)."""

    uuid = serializers.UUIDField(help_text="Stable user id.")
    id = serializers.UUIDField(source="uuid", help_text="The same value as `uuid`.")
    email = serializers.EmailField()
    name = serializers.CharField(allow_null=True, help_text="Display name; null when not set.")
    personal_org_slug = serializers.CharField(allow_null=True, help_text="Slug of the user's personal organization.")


class UserUpdateRequestSerializer(serializers.Serializer):
    name = serializers.CharField(min_length=1, max_length=255, help_text="New display name (1-255 characters).")


class ApiTokenSerializer(serializers.ModelSerializer):
    class Meta:
        model = ApiToken
        fields = ["id", "description", "created_at", "expires_at", "last_used_at"]
        read_only_fields = fields


class ApiTokenListResponseSerializer(serializers.Serializer):
    api_tokens = ApiTokenSerializer(many=True)
    next_cursor = serializers.CharField(allow_null=True, help_text="Pass as `cursor` for the next page; null at the end.")


class ApiTokenCreateRequestSerializer(serializers.Serializer):
    description = serializers.CharField(max_length=255, allow_blank=True, help_text="Human label for the key.")
    expires_at = serializers.DateTimeField(required=False, allow_null=True,
                                           help_text="Optional expiry in the future; null or omitted: never.")

    def validate_expires_at(self, value: Any) -> Any:
        # The hosted service accepts a past expiry and hands out a dead key; we say so instead.
        if value is not None and value <= timezone.now():
            raise serializers.ValidationError("must be in the future")
        return value


class ApiTokenCreateResponseSerializer(serializers.Serializer):
    token = serializers.CharField(help_text="The raw key (hm_...). Shown only here, once.")
    api_token = ApiTokenSerializer()


# ---------------------------------------------------------------- CLI login (schema only: the
# views read these bodies by hand because their errors are 400s with their own codes, not 422s)

class CliTransferRequestSerializer(serializers.Serializer):
    nonce = serializers.CharField(help_text="The nonce the CLI generated and polls claim with.")


class CliClaimRequestSerializer(serializers.Serializer):
    nonce = serializers.CharField(help_text="The nonce this CLI generated.")


class CliRedeemRequestSerializer(serializers.Serializer):
    code = serializers.CharField(help_text="The paste code shown in the browser (case-insensitive).")


class CliCodeResponseSerializer(serializers.Serializer):
    code = serializers.CharField(help_text="16 characters of 0-9A-Z without I, L, O, U; single use, valid 5 minutes.")


class CliTokenResponseSerializer(serializers.Serializer):
    token = serializers.CharField(help_text="A new session token (valid 30 days). Send it as `Authorization: Bearer`.")


# ---------------------------------------------------------------- organizations

class OrganizationSerializer(serializers.ModelSerializer):
    class Meta:
        model = Organization
        fields = ["slug", "name", "url", "created_at"]
        read_only_fields = fields


OrganizationListSerializer = page_serializer("OrganizationList", OrganizationSerializer)


class CreateOrganizationRequestSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=255, help_text="Display name; the slug is derived from it.")
    url = serializers.CharField(max_length=500, required=False, allow_null=True, allow_blank=True,
                                help_text="Optional website URL.")

    def validate_url(self, value: str | None) -> str | None:
        return value or None


class OrgMemberSerializer(serializers.ModelSerializer):
    """A membership with its user (`select_related("user")` in the view)."""

    user_uuid = serializers.UUIDField(source="user.uuid")
    email = serializers.EmailField(source="user.email")
    name = serializers.SerializerMethodField()
    role = RoleField(read_only=True)

    class Meta:
        model = Membership
        fields = ["user_uuid", "email", "name", "role"]
        read_only_fields = fields

    def get_name(self, membership: Membership) -> str | None:
        return membership.user.name or None


class OrgMemberListSerializer(serializers.Serializer):
    data = OrgMemberSerializer(many=True)
    next_cursor = serializers.CharField(allow_null=True, help_text="Pass as `cursor` for the next page; null at the end.")


class UpdateMemberRoleRequestSerializer(serializers.Serializer):
    role = RoleField()


# ---------------------------------------------------------------- invites

class InviteSerializer(serializers.ModelSerializer):
    """`token` is the raw invite token right after creation (context `token`), null ever after."""

    role = InviteRoleField(read_only=True)
    token = serializers.SerializerMethodField()

    class Meta:
        model = Invite
        fields = ["id", "email", "role", "expires_at", "token"]
        read_only_fields = fields

    def get_token(self, invite: Invite) -> str | None:
        return self.context.get("token")


class InviteListSerializer(serializers.Serializer):
    data = InviteSerializer(many=True)
    next_cursor = serializers.CharField(allow_null=True, help_text="Pass as `cursor` for the next page; null at the end.")


class CreateInviteRequestSerializer(serializers.Serializer):
    email = serializers.EmailField(max_length=254)
    role = InviteRoleField(help_text="admin or member; owners are made by promoting a member.")


class AcceptInviteRequestSerializer(serializers.Serializer):
    token = serializers.CharField(max_length=256, help_text="The token from the invite.")


class AgentTokenSerializer(serializers.ModelSerializer):
    class Meta:
        model = AgentToken
        fields = ["id", "description", "created_at", "last_used_at", "revoked_at"]
        read_only_fields = fields


class AgentTokenListSerializer(serializers.Serializer):
    data = AgentTokenSerializer(many=True)
    next_cursor = serializers.CharField(allow_null=True, help_text="Pass as `cursor` for the next page; null at the end.")


class AgentTokenCreateRequestSerializer(serializers.Serializer):
    description = serializers.CharField(max_length=255, required=False, allow_blank=True, default="",
                                        help_text="Where the agents using this token run.")


class AgentTokenCreateResponseSerializer(serializers.Serializer):
    token = serializers.CharField(help_text="The raw agent token (hma_...). Shown only here, once.")
    agent_token = AgentTokenSerializer()
