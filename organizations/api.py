"""Account, API-token, CLI-login, organization, member and invite endpoints.

Thin views: resolve the caller and the organization (`OrgScopedView`), read
the body through a serializer, call a service, render a serializer. Services
raise `ApiError`s; the exception handler renders the envelope.
"""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from harmont.errors import ApiError
from harmont.pagination import paginate, paginate_by_keys
from harmont.serializers import ErrorSerializer, parse_uuid, validated
from harmont.throttling import AddressBudget, CredentialBudget, RateLimitedView
from organizations import services
from organizations.access import OrgScopedView
from organizations.models import AgentToken, ApiToken, Membership, Organization, Role, TokenKind, User
from organizations.serializers import (
    AgentTokenCreateRequestSerializer,
    AgentTokenCreateResponseSerializer,
    AgentTokenListSerializer,
    AgentTokenSerializer,
    AcceptInviteRequestSerializer,
    ApiTokenCreateRequestSerializer,
    ApiTokenCreateResponseSerializer,
    ApiTokenListResponseSerializer,
    ApiTokenSerializer,
    CliClaimRequestSerializer,
    CliCodeResponseSerializer,
    CliRedeemRequestSerializer,
    CliTokenResponseSerializer,
    CliTransferRequestSerializer,
    CreateInviteRequestSerializer,
    CreateOrganizationRequestSerializer,
    CurrentUserResponseSerializer,
    InviteListSerializer,
    InviteSerializer,
    OrganizationListSerializer,
    OrganizationSerializer,
    OrgMemberListSerializer,
    OrgMemberSerializer,
    UpdateMemberRoleRequestSerializer,
    UserUpdateRequestSerializer,
)

PAGE_PARAMS = [
    OpenApiParameter("limit", int, description="Page size (1-100, default 50)."),
    OpenApiParameter("cursor", str, description="Opaque cursor from a previous page's next_cursor."),
]


class WholeBodyPatchSchema(AutoSchema):
    """Documents our PATCH bodies as they are: their one field is required.

    drf-spectacular assumes PATCH means DRF's partial update and documents a
    `Patched...` copy with every field optional (drf-spectacular issue #1246
    has no per-view switch). `PATCH /user {name}` and `PATCH .../members/{id}
    {role}` require their field, like the reference's `UserUpdateRequest` and
    `UpdateMemberRoleRequest`, so the request body is described as for PUT.
    """

    def _get_request_for_media_type(self, serializer: Any, direction: str = "request") -> Any:
        if self.method != "PATCH":
            return super()._get_request_for_media_type(serializer, direction)
        self.method = "PUT"
        try:
            return super()._get_request_for_media_type(serializer, direction)
        finally:
            self.method = "PATCH"


def body_string(request: Request, name: str) -> str:
    """`name` from a JSON-object body if it is a string, else "" (the CLI endpoints' lenient read)."""
    data: Any = request.data
    value = data.get(name) if isinstance(data, dict) else None
    return value if isinstance(value, str) else ""


# ---------------------------------------------------------------- the current user

def current_user_body(user: User) -> dict[str, Any]:
    personal_slug = Organization.objects.filter(personal_for=user).values_list("slug", flat=True).first()
    return CurrentUserResponseSerializer({
        "uuid": user.uuid, "email": user.email, "name": user.name or None, "personal_org_slug": personal_slug,
    }).data


class CurrentUserView(APIView):
    schema = WholeBodyPatchSchema()

    @extend_schema(operation_id="getCurrentUser", tags=["user"],
                   responses={200: CurrentUserResponseSerializer, 401: ErrorSerializer})
    def get(self, request: Request) -> Response:
        return Response(current_user_body(request.user))

    @extend_schema(operation_id="updateCurrentUser", tags=["user"], request=UserUpdateRequestSerializer,
                   responses={200: CurrentUserResponseSerializer, 401: ErrorSerializer, 422: ErrorSerializer})
    def patch(self, request: Request) -> Response:
        body = validated(UserUpdateRequestSerializer, request, code="user_name_invalid")
        user = services.update_user(user=request.user, name=body["name"])
        return Response(current_user_body(user))

    @extend_schema(operation_id="deleteCurrentUser", tags=["user"], request=None,
                   responses={204: None, 401: ErrorSerializer, 409: ErrorSerializer})
    def delete(self, request: Request) -> Response:
        services.delete_user(user=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


def personal_tokens(user: User) -> QuerySet[ApiToken]:
    # Session tokens (web and CLI logins) are not "API keys": they are listed nowhere and
    # end with logout or expiry.
    return ApiToken.objects.filter(user=user, kind=TokenKind.PERSONAL)


class ApiTokenListView(APIView):
    @extend_schema(operation_id="listApiTokens", tags=["user"], parameters=PAGE_PARAMS,
                   responses={200: ApiTokenListResponseSerializer, 400: ErrorSerializer, 401: ErrorSerializer})
    def get(self, request: Request) -> Response:
        """Your personal API tokens that are not revoked, newest first (the reference's `api_tokens`, paged)."""
        page = paginate_by_keys(request, personal_tokens(request.user).filter(revoked_at__isnull=True),
                                keys=("created_at", "pk"), descending=True)
        return Response({"api_tokens": ApiTokenSerializer(page.items, many=True).data,
                         "next_cursor": page.next_cursor})

    @extend_schema(operation_id="createApiToken", tags=["user"], request=ApiTokenCreateRequestSerializer,
                   responses={201: ApiTokenCreateResponseSerializer, 401: ErrorSerializer, 422: ErrorSerializer})
    def post(self, request: Request) -> Response:
        body = validated(ApiTokenCreateRequestSerializer, request)
        issued = services.create_personal_token(user=request.user, description=body["description"],
                                                expires_at=body.get("expires_at"))
        return Response(ApiTokenCreateResponseSerializer({"token": issued.raw, "api_token": issued.token}).data,
                        status=status.HTTP_201_CREATED)


class ApiTokenDetailView(APIView):
    @extend_schema(operation_id="revokeApiToken", tags=["user"], request=None,
                   parameters=[OpenApiParameter("id", str, OpenApiParameter.PATH, description="The API key id.")],
                   responses={204: None, 401: ErrorSerializer, 404: ErrorSerializer})
    def delete(self, request: Request, id: str) -> Response:  # noqa: A002 (the reference's name)
        token_id = parse_uuid(id)
        if token_id is None:
            raise ApiError("api_token_not_found", f"You have no API token {id}.")
        services.revoke_personal_token(user=request.user, token_id=token_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class LogoutView(APIView):
    @extend_schema(operation_id="logout", tags=["auth"], request=None, responses={204: None, 401: ErrorSerializer})
    def post(self, request: Request) -> Response:
        # An already revoked token never gets here: authentication refuses it with a 401.
        services.revoke_api_token(token=request.auth)
        return Response(status=status.HTTP_204_NO_CONTENT)


# ---------------------------------------------------------------- CLI login

class CliTransferView(APIView):
    @extend_schema(operation_id="cliTransfer", tags=["auth"], request=CliTransferRequestSerializer,
                   responses={204: None, 400: ErrorSerializer, 401: ErrorSerializer})
    def post(self, request: Request) -> Response:
        services.park_cli_transfer(user=request.user, nonce=body_string(request, "nonce"))
        return Response(status=status.HTTP_204_NO_CONTENT)


class CliLoginAddressBudget(AddressBudget):
    scope = "cli_login"


class CliLoginCredentialBudget(CredentialBudget):
    scope = "cli_login_credential"


class CliPublicView(RateLimitedView):
    """Claim and redeem: no credentials (the nonce/code is the credential), so they are throttled.

    The CLI polls claim every 750 ms for up to 3 minutes, so one login needs about 80
    requests a minute for as long as it waits: that is what the per-credential budget
    grants. The per-address budget, shared by both routes, leaves room for a few logins
    at once from one address (an office behind one NAT) and keeps floods out.
    """

    authentication_classes: list = []
    permission_classes = [AllowAny]
    throttle_classes = [CliLoginAddressBudget, CliLoginCredentialBudget]
    credential_field = ""

    def throttled_credential(self, request: Request) -> str | None:
        value = request.data.get(self.credential_field) if isinstance(request.data, dict) else None
        return value if isinstance(value, str) else None


class CliClaimView(CliPublicView):
    credential_field = "nonce"

    @extend_schema(operation_id="cliClaim", tags=["auth"], auth=[], request=CliClaimRequestSerializer,
                   responses={200: CliTokenResponseSerializer, 400: ErrorSerializer, 429: ErrorSerializer})
    def post(self, request: Request) -> Response:
        issued = services.claim_cli_transfer(nonce=body_string(request, "nonce"))
        return Response(CliTokenResponseSerializer({"token": issued.raw}).data)


class CliCodeView(APIView):
    @extend_schema(operation_id="cliCode", tags=["auth"], request=None,
                   responses={200: CliCodeResponseSerializer, 401: ErrorSerializer})
    def post(self, request: Request) -> Response:
        return Response(CliCodeResponseSerializer({"code": services.create_cli_code(user=request.user)}).data)


class CliRedeemView(CliPublicView):
    credential_field = "code"

    def throttled_credential(self, request: Request) -> str | None:
        # Spellings of one code (case, dashes, look-alikes) share one budget.
        code = super().throttled_credential(request)
        return services.normalize_cli_code(code) if code else None

    @extend_schema(operation_id="cliRedeem", tags=["auth"], auth=[], request=CliRedeemRequestSerializer,
                   responses={200: CliTokenResponseSerializer, 400: ErrorSerializer, 429: ErrorSerializer})
    def post(self, request: Request) -> Response:
        issued = services.redeem_cli_code(code=body_string(request, "code"))
        return Response(CliTokenResponseSerializer({"token": issued.raw}).data)


# ---------------------------------------------------------------- organizations

class OrganizationListView(APIView):
    @extend_schema(operation_id="listOrganizations", tags=["organizations"], parameters=PAGE_PARAMS,
                   responses={200: OrganizationListSerializer, 400: ErrorSerializer, 401: ErrorSerializer})
    def get(self, request: Request) -> Response:
        page = paginate(request, Organization.objects.for_user(request.user), key="id")
        return Response({"data": OrganizationSerializer(page.items, many=True).data, "next_cursor": page.next_cursor})

    @extend_schema(operation_id="createOrganization", tags=["organizations"],
                   request=CreateOrganizationRequestSerializer,
                   responses={201: OrganizationSerializer, 401: ErrorSerializer, 422: ErrorSerializer})
    def post(self, request: Request) -> Response:
        body = validated(CreateOrganizationRequestSerializer, request, code="organization_invalid")
        org = services.create_organization(name=body["name"], url=body.get("url"), owner=request.user)
        return Response(OrganizationSerializer(org).data, status=status.HTTP_201_CREATED)


class OrganizationDetailView(OrgScopedView):
    @extend_schema(operation_id="getOrganization", tags=["organizations"],
                   responses={200: OrganizationSerializer, 401: ErrorSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str) -> Response:
        return Response(OrganizationSerializer(self.org).data)


class MemberListView(OrgScopedView):
    @extend_schema(operation_id="listOrgMembers", tags=["organizations"], parameters=PAGE_PARAMS,
                   responses={200: OrgMemberListSerializer, 400: ErrorSerializer, 401: ErrorSerializer,
                              404: ErrorSerializer})
    def get(self, request: Request, org: str) -> Response:
        """The organization's members, oldest membership first."""
        page = paginate_by_keys(request, Membership.objects.filter(organization=self.org).select_related("user"),
                                keys=("created_at", "id"))
        return Response({"data": OrgMemberSerializer(page.items, many=True).data, "next_cursor": page.next_cursor})


class MemberDetailView(OrgScopedView):
    schema = WholeBodyPatchSchema()
    # DELETE has no minimum role here: any member may remove themselves; the
    # service decides the rest under the organization lock.
    required_role = {"PATCH": Role.ADMIN}
    role_checked_in_service = frozenset({"DELETE"})
    role_action = "change member roles"

    def target_user(self, user_id: str) -> User:
        """The member named by the path (404 before the body is looked at); the service re-checks under lock."""
        user_uuid = parse_uuid(user_id)
        membership = (Membership.objects.select_related("user").filter(organization=self.org, user__uuid=user_uuid)
                      .first() if user_uuid else None)
        if membership is None:
            raise ApiError("member_not_found", f"No member {user_id} in organization {self.org.slug!r}.")
        return membership.user

    @extend_schema(operation_id="updateOrgMember", tags=["organizations"], request=UpdateMemberRoleRequestSerializer,
                   responses={200: OrgMemberSerializer, 401: ErrorSerializer, 403: ErrorSerializer,
                              404: ErrorSerializer, 409: ErrorSerializer, 422: ErrorSerializer})
    def patch(self, request: Request, org: str, user_id: str) -> Response:
        user = self.target_user(user_id)
        body = validated(UpdateMemberRoleRequestSerializer, request, code="invalid_role")
        membership = services.change_member_role(organization=self.org, actor=request.user, user=user,
                                                 role=body["role"])
        return Response(OrgMemberSerializer(membership).data)

    @extend_schema(operation_id="removeOrgMember", tags=["organizations"], request=None,
                   responses={204: None, 401: ErrorSerializer, 403: ErrorSerializer, 404: ErrorSerializer,
                              409: ErrorSerializer})
    def delete(self, request: Request, org: str, user_id: str) -> Response:
        services.remove_member(organization=self.org, actor=request.user, user=self.target_user(user_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


# ---------------------------------------------------------------- invites

class InviteListView(OrgScopedView):
    required_role = {"GET": Role.ADMIN, "POST": Role.ADMIN}
    role_action = "manage invites"

    @extend_schema(operation_id="listInvites", tags=["organizations"], parameters=PAGE_PARAMS,
                   responses={200: InviteListSerializer, 400: ErrorSerializer, 401: ErrorSerializer,
                              403: ErrorSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str) -> Response:
        """The invites that can still be accepted, oldest first."""
        page = paginate_by_keys(request, services.open_invites(organization=self.org), keys=("created_at", "id"))
        return Response({"data": InviteSerializer(page.items, many=True).data, "next_cursor": page.next_cursor})

    @extend_schema(operation_id="createInvite", tags=["organizations"], request=CreateInviteRequestSerializer,
                   responses={201: InviteSerializer, 401: ErrorSerializer, 403: ErrorSerializer,
                              404: ErrorSerializer, 409: ErrorSerializer, 422: ErrorSerializer})
    def post(self, request: Request, org: str) -> Response:
        body = validated(CreateInviteRequestSerializer, request, field_codes={"role": "invalid_role"})
        issued = services.create_invite(organization=self.org, invited_by=request.user, email=body["email"],
                                        role=body["role"])
        return Response(InviteSerializer(issued.invite, context={"token": issued.raw}).data,
                        status=status.HTTP_201_CREATED)


class InviteDetailView(OrgScopedView):
    required_role = {"DELETE": Role.ADMIN}
    role_action = "manage invites"

    @extend_schema(operation_id="revokeInvite", tags=["organizations"], request=None,
                   parameters=[OpenApiParameter("id", str, OpenApiParameter.PATH, description="The invite id.")],
                   responses={204: None, 401: ErrorSerializer, 403: ErrorSerializer, 404: ErrorSerializer})
    def delete(self, request: Request, org: str, id: str) -> Response:  # noqa: A002 (the reference's name)
        invite_id = parse_uuid(id)
        if invite_id is None:
            raise ApiError("invite_not_found", f"No open invite {id} in organization {self.org.slug!r}.")
        services.revoke_invite(organization=self.org, invite_id=invite_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class AcceptInviteView(APIView):
    @extend_schema(operation_id="acceptInvite", tags=["organizations"], request=AcceptInviteRequestSerializer,
                   responses={200: OrganizationSerializer, 401: ErrorSerializer, 422: ErrorSerializer})
    def post(self, request: Request) -> Response:
        body = validated(AcceptInviteRequestSerializer, request, code="invite_unacceptable")
        return Response(OrganizationSerializer(services.accept_invite(user=request.user, token=body["token"])).data)


class AgentTokenListView(OrgScopedView):
    required_role = {"GET": Role.ADMIN, "POST": Role.ADMIN}
    role_action = "manage agent tokens"

    @extend_schema(operation_id="listAgentTokens", tags=["agents"], parameters=PAGE_PARAMS,
                   responses={200: AgentTokenListSerializer, 400: ErrorSerializer, 403: ErrorSerializer,
                              404: ErrorSerializer})
    def get(self, request: Request, org: str) -> Response:
        """The organization's agent tokens that are not revoked, newest first (never the secret)."""
        page = paginate_by_keys(request, AgentToken.objects.filter(organization=self.org, revoked_at__isnull=True),
                                keys=("created_at", "pk"), descending=True)
        return Response({"data": AgentTokenSerializer(page.items, many=True).data, "next_cursor": page.next_cursor})

    @extend_schema(operation_id="createAgentToken", tags=["agents"], request=AgentTokenCreateRequestSerializer,
                   responses={201: AgentTokenCreateResponseSerializer, 403: ErrorSerializer, 404: ErrorSerializer,
                              422: ErrorSerializer})
    def post(self, request: Request, org: str) -> Response:
        """A new agent token; the raw value is in this answer only."""
        body = validated(AgentTokenCreateRequestSerializer, request)
        issued = services.create_agent_token(organization=self.org, created_by=request.user,
                                             description=body["description"])
        return Response(AgentTokenCreateResponseSerializer({"token": issued.raw, "agent_token": issued.token}).data,
                        status=status.HTTP_201_CREATED)


class AgentTokenDetailView(OrgScopedView):
    required_role = {"DELETE": Role.ADMIN}
    role_action = "manage agent tokens"

    @extend_schema(operation_id="revokeAgentToken", tags=["agents"], request=None,
                   responses={204: None, 403: ErrorSerializer, 404: ErrorSerializer})
    def delete(self, request: Request, org: str, id: str) -> Response:  # noqa: A002 (matches the other routes)
        """Revoke the token; agents using it are refused at their next request."""
        token_id = parse_uuid(id)
        token = AgentToken.objects.filter(organization=self.org, pk=token_id).first() if token_id else None
        if token is None:
            raise ApiError("agent_token_not_found", f"No agent token {id} in this organization.")
        services.revoke_agent_token(token=token)
        return Response(status=status.HTTP_204_NO_CONTENT)
