"""Routes of the accounts and organizations API (included at /api/v0/); paths as in the reference."""

from django.urls import path

from organizations import api

urlpatterns = [
    path("user", api.CurrentUserView.as_view(), name="current-user"),
    path("user/api-tokens", api.ApiTokenListView.as_view(), name="api-token-list"),
    path("user/api-tokens/<str:id>", api.ApiTokenDetailView.as_view(), name="api-token-detail"),
    path("auth/logout", api.LogoutView.as_view(), name="logout"),
    path("auth/cli/transfer", api.CliTransferView.as_view(), name="cli-transfer"),
    path("auth/cli/claim", api.CliClaimView.as_view(), name="cli-claim"),
    path("auth/cli/code", api.CliCodeView.as_view(), name="cli-code"),
    path("auth/cli/redeem", api.CliRedeemView.as_view(), name="cli-redeem"),
    path("organizations", api.OrganizationListView.as_view(), name="organization-list"),
    path("organizations/<str:org>", api.OrganizationDetailView.as_view(), name="organization-detail"),
    path("organizations/<str:org>/members", api.MemberListView.as_view(), name="member-list"),
    path("organizations/<str:org>/members/<str:user_id>", api.MemberDetailView.as_view(), name="member-detail"),
    path("organizations/<str:org>/invites", api.InviteListView.as_view(), name="invite-list"),
    path("organizations/<str:org>/invites/<str:id>", api.InviteDetailView.as_view(), name="invite-detail"),
    path("invites/accept", api.AcceptInviteView.as_view(), name="invite-accept"),
    path("organizations/<str:org>/agent-tokens", api.AgentTokenListView.as_view(), name="agent-token-list"),
    path("organizations/<str:org>/agent-tokens/<str:id>", api.AgentTokenDetailView.as_view(),
         name="agent-token-detail"),
]
