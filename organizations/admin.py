"""The Django admin for operators (staff only, Django's default).

Secrets never appear here: token and invite hashes are excluded. Rows that
only make sense with a raw secret shown once (API tokens, invites) or with an
owner (organizations) are created through the API or `manage.py createtoken`
/ `createorg`, not here; users created here go through the same service as
everywhere else, so they get their personal organization.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.forms import AdminUserCreationForm, UserChangeForm
from django.db.models import QuerySet
from django.http import HttpRequest

from organizations import services
from organizations.models import (
    AgentToken,
    ApiToken,
    CliLoginGrant,
    IdempotencyKey,
    Invite,
    Membership,
    Organization,
    User,
)


class UserNameFormMixin:
    """The one rule for user names (`services.user_name_errors`); the name stays optional here."""

    cleaned_data: dict[str, Any]

    def clean_name(self) -> str:
        name = self.cleaned_data.get("name") or ""
        errors = services.user_name_errors(name) if name else []
        if errors:
            raise forms.ValidationError(errors)
        return name.strip()


class UserCreateForm(UserNameFormMixin, AdminUserCreationForm):
    class Meta:
        model = User
        fields = ("email", "name")
        field_classes: dict = {}

    def clean_email(self) -> str:
        # Emails are stored lower-case; catch "Ada@x" vs "ada@x" here, not as an IntegrityError.
        email = self.cleaned_data["email"].strip().lower()
        if User.objects.filter(email__iexact=email).exists():
            raise forms.ValidationError("A user with this email already exists.")
        return email


class UserEditForm(UserNameFormMixin, UserChangeForm):
    class Meta:
        model = User
        fields = "__all__"
        field_classes: dict = {}


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    form = UserEditForm
    add_form = UserCreateForm
    list_display = ("email", "name", "is_staff", "is_active", "date_joined")
    list_filter = ("is_staff", "is_superuser", "is_active")
    search_fields = ("email", "name")
    ordering = ("email",)
    readonly_fields = ("uuid", "last_login", "date_joined")
    fieldsets = (
        (None, {"fields": ("email", "password", "uuid")}),
        ("Profile", {"fields": ("name",)}),
        ("Permissions", {"fields": ("is_active", "is_staff", "is_superuser", "groups", "user_permissions")}),
        ("Dates", {"fields": ("last_login", "date_joined")}),
    )
    add_fieldsets = (
        (None, {"classes": ("wide",), "fields": ("email", "name", "usable_password", "password1", "password2")}),
    )

    def save_model(self, request: HttpRequest, obj: User, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        # Through the service, so the user gets a personal organization like every other user.
        created = services.create_user(email=form.cleaned_data["email"], name=form.cleaned_data.get("name") or "",
                                       password=form.cleaned_data.get("password1") or None)
        obj.pk = created.pk
        obj.password = created.password
        obj._state.adding = False


class OrganizationForm(forms.ModelForm):
    """A rename keeps the slug; the name still follows the API's rule."""

    class Meta:
        model = Organization
        fields = "__all__"

    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        errors = services.organization_name_errors(name)
        if errors:
            raise forms.ValidationError(errors)
        return name


@admin.register(Organization)
class OrganizationAdmin(admin.ModelAdmin):
    form = OrganizationForm
    list_display = ("slug", "name", "personal_for", "created_at")
    list_select_related = ("personal_for",)
    # "Empty" personal_for: the shared organizations, without everyone's personal one.
    list_filter = (("personal_for", admin.EmptyFieldListFilter),)
    search_fields = ("slug", "name")
    raw_id_fields = ("personal_for",)
    readonly_fields = ("slug", "personal_for", "created_at")
    ordering = ("slug",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # needs an owner: `manage.py createorg` or POST /api/v0/organizations


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ("organization", "user", "role", "created_at")
    list_select_related = ("organization", "user")
    list_filter = ("role",)
    search_fields = ("organization__slug", "user__email")
    raw_id_fields = ("organization", "user")


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("user", "kind", "description", "created_at", "expires_at", "last_used_at", "revoked_at")
    list_select_related = ("user",)
    list_filter = ("kind", ("revoked_at", admin.EmptyFieldListFilter))
    search_fields = ("user__email", "description")
    exclude = ("token_hash",)
    readonly_fields = ("id", "user", "kind", "description", "created_at", "expires_at", "last_used_at", "revoked_at")
    ordering = ("-created_at",)
    actions = ["revoke_selected"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # a raw token can only be shown once: use the API or `manage.py createtoken`

    @admin.action(description="Revoke selected tokens", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        count = services.revoke_api_tokens(tokens=queryset)
        self.message_user(request, f"Revoked {count} token{'s' if count != 1 else ''}.", messages.SUCCESS)


@admin.register(Invite)
class InviteAdmin(admin.ModelAdmin):
    list_display = ("email", "organization", "role", "created_at", "expires_at", "accepted_at", "revoked_at")
    list_select_related = ("organization",)
    search_fields = ("email", "organization__slug")
    exclude = ("token_hash",)
    raw_id_fields = ("organization", "invited_by", "accepted_by")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # the invite token is generated and shown once by the API


@admin.register(CliLoginGrant)
class CliLoginGrantAdmin(admin.ModelAdmin):
    list_display = ("kind", "user", "created_at", "expires_at", "used_at")
    list_select_related = ("user",)
    list_filter = ("kind",)
    exclude = ("secret_hash",)
    readonly_fields = ("kind", "user", "created_at", "expires_at", "used_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: CliLoginGrant | None = None) -> bool:
        return False


@admin.register(AgentToken)
class AgentTokenAdmin(admin.ModelAdmin):
    list_display = ("organization", "description", "created_by", "created_at", "last_used_at", "revoked_at")
    list_select_related = ("organization", "created_by")
    list_filter = (("revoked_at", admin.EmptyFieldListFilter),)
    search_fields = ("organization__slug", "description")
    fields = ("organization", "description", "created_by", "created_at", "last_used_at", "revoked_at")
    readonly_fields = ("created_by", "created_at", "last_used_at", "revoked_at")
    raw_id_fields = ("organization",)
    ordering = ("-created_at",)
    actions = ["revoke_selected"]

    def get_readonly_fields(self, request: HttpRequest, obj: AgentToken | None = None) -> tuple[str, ...]:
        return self.readonly_fields + (("organization",) if obj else ())

    def save_model(self, request: HttpRequest, obj: AgentToken, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        issued = services.create_agent_token(organization=obj.organization, created_by=request.user,
                                             description=obj.description)
        obj.pk, obj.token_hash, obj.created_at = issued.token.pk, issued.token.token_hash, issued.token.created_at
        obj.created_by = request.user
        obj._state.adding = False
        self.message_user(request, f"Agent token for {obj.organization.slug}: {issued.raw} "
                                   "(copy it now: it is not shown again).", messages.WARNING)

    @admin.action(description="Revoke selected agent tokens", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[AgentToken]) -> None:
        for token in queryset:
            services.revoke_agent_token(token=token)
        self.message_user(request, f"Revoked {queryset.count()} agent token(s).", messages.SUCCESS)


@admin.register(IdempotencyKey)
class IdempotencyKeyAdmin(admin.ModelAdmin):
    """View and delete only: the rows belong to organizations.idempotency (deleting one frees its key)."""

    list_display = ("key", "user", "path", "state", "response_status", "created_at", "expires_at")
    list_select_related = ("user",)
    list_filter = ("state",)
    search_fields = ("key", "user__email", "path")
    fields = ("user", "key", "path", "state", "response_status", "response_body", "created_at", "expires_at")
    ordering = ("-created_at",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: IdempotencyKey | None = None) -> bool:
        return False
