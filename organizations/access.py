"""Who may see and do what: the one place API views resolve the caller's organization.

Every org-scoped API view derives from `OrgScopedView`: the organization comes
from the URL and the caller's membership in it, in one query, and
`OrgRolePermission` checks the role the method needs. An organization the caller is not a member of is a 404, never a 403,
so its existence is not revealed.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.views import APIView

from harmont.errors import ApiError
from organizations.models import Membership, Organization, Role, User


def membership_for(user: User, org_slug: str) -> Membership:
    membership = (
        Membership.objects.select_related("organization")
        .filter(user=user, organization__slug=org_slug)
        .first()
    )
    if membership is None:
        raise ApiError("organization_not_found", f"No organization {org_slug!r}.")
    return membership


def require_role(membership: Membership, role: str, *, action: str) -> None:
    if not membership.has_role(role):
        raise ApiError(
            "insufficient_org_role",
            f"Only {role}s{' and owners' if role == Role.ADMIN else ''} may {action}; your role is {membership.role}.",
        )


class OrgScopedMixin:
    """Resolves `self.membership` / `self.org` from the `org` URL kwarg.

    `required_role` maps an HTTP method to the minimum role; methods not listed
    need plain membership. `role_action` words the 403 message. Methods whose
    service checks a role itself (it depends on the target, not only the method)
    are named in `role_checked_in_service`. Both say which operations the OpenAPI
    document lists a 403 for (harmont.openapi).
    """

    required_role: dict[str, str] = {}
    role_checked_in_service: frozenset[str] = frozenset()
    role_action: str = "do this"
    request: Request
    kwargs: dict[str, Any]

    @cached_property
    def membership(self) -> Membership:
        return membership_for(self.request.user, self.kwargs["org"])  # type: ignore[arg-type]

    @property
    def org(self) -> Organization:
        return self.membership.organization

    def credentials_context(self) -> dict[str, bool]:
        """Serializer context: admins and owners see credentials written into URLs, members don't."""
        return {"show_credentials": self.membership.has_role(Role.ADMIN)}


class OrgRolePermission(BasePermission):
    """Member of the URL's organization, with the role the method requires."""

    def has_permission(self, request: Request, view: Any) -> bool:
        membership = view.membership  # raises organization_not_found
        role = view.required_role.get(request.method)
        if role:
            require_role(membership, role, action=view.role_action)
        return True


ORG_PERMISSIONS = [IsAuthenticated, OrgRolePermission]


class OrgScopedView(OrgScopedMixin, APIView):
    """An API view under `/organizations/{org}/`: members only, with the role `required_role` names."""

    permission_classes = ORG_PERMISSIONS
