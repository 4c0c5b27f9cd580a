"""HTML pages for people: sign in, sign up, the organization switcher, API tokens, CLI login.

Views stay thin: they resolve the organization through the caller's membership
(another organization's page is a 404, exactly as in the API), validate a
form, call a service, and render. Pages use Django's session authentication;
the REST API keeps its bearer tokens.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.password_validation import validate_password
from django.contrib.auth.views import LoginView
from django.db import IntegrityError
from django.db.models import F
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.functional import SimpleLazyObject
from django.views.decorators.http import require_POST

from harmont.errors import ApiError
from organizations import services
from organizations.api import personal_tokens
from organizations.models import Membership, Organization, Role, User

# ---------------------------------------------------------------- organization of a page


def user_memberships(user: User) -> list[Membership]:
    """The caller's memberships for the switcher: shared organizations first, then the personal one."""
    return list(
        Membership.objects.select_related("organization")
        .filter(user=user)
        .order_by(F("organization__personal_for").asc(nulls_first=True), "organization__name", "organization__id")
    )


@dataclass(frozen=True)
class OrgPage:
    """The organization a page is about, found through the caller's membership."""

    membership: Membership
    memberships: list[Membership]

    @property
    def org(self) -> Organization:
        return self.membership.organization

    @property
    def is_admin(self) -> bool:
        return self.membership.has_role(Role.ADMIN)

    def context(self, **extra: Any) -> dict[str, Any]:
        return {"org": self.org, "membership": self.membership, "memberships": self.memberships,
                "is_org_admin": self.is_admin, **extra}


def org_page(request: HttpRequest, org_slug: str) -> OrgPage:
    """Resolve `org_slug` through the caller's memberships, in the one query the switcher needs anyway.

    Not a member (or no such organization) is a 404, never a 403: a page must not
    reveal that an organization exists.
    """
    memberships = user_memberships(request.user)  # type: ignore[arg-type]
    for membership in memberships:
        if membership.organization.slug == org_slug:
            membership.user = request.user  # the caller, already loaded: no query when a page reads it
            return OrgPage(membership, memberships)
    raise Http404(f"No organization {org_slug!r}.")


def admin_org_page(request: HttpRequest, org_slug: str, *, action: str) -> OrgPage:
    """`org_page` for a page only admins and owners may use; `action` says what they do there ("manage agents")."""
    page = org_page(request, org_slug)
    if not page.is_admin:
        # A member may know the organization: 403 (not 404) with the reason, as the API's insufficient_org_role.
        raise PermissionDenied(f"Only admins and owners of {page.org.name} {action}; your role is "
                               f"{page.membership.role}.")
    return page


def nav_context(request: HttpRequest) -> dict[str, Any]:
    """Template context for every page: the switcher's organizations (lazily) and the sign-up switch.

    Org pages put their own `memberships` in the context, which wins over this
    one, so they pay for the query once; pages that never show the switcher
    (the admin, the error-code docs) never evaluate it.
    """
    user = getattr(request, "user", None)
    lazy = SimpleLazyObject(lambda: user_memberships(user) if user is not None and user.is_authenticated else [])
    return {"memberships": lazy, "signup_enabled": settings.SIGNUP_ENABLED}


# ---------------------------------------------------------------- signing in and up


class EmailAuthenticationForm(AuthenticationForm):
    """Email + password. Emails are stored lower-case, so "Ada@Example.com" signs in too."""

    def clean_username(self) -> str:
        return self.cleaned_data["username"].strip().lower()


def sign_in_username(request: HttpRequest, credentials: dict[str, Any] | None) -> str | None:
    """The account a sign-in attempt counts against (django-axes): as the sign-in form reads it,
    so "Ada@Example.com " and "ada@example.com" share one budget."""
    username = (credentials or {}).get("username") or (request.POST.get("username") if request else None)
    return username.strip().lower() if isinstance(username, str) else None


def sign_in_locked_out(request: HttpRequest, response: HttpResponse | None, credentials: dict[str, Any] | None
                       ) -> HttpResponse:
    """The answer to a sign-in while its account or address is cooling off (django-axes).

    The same words whether or not the account exists, and whichever of the two budgets ran out.
    """
    minutes = int(settings.AXES_COOLOFF_TIME.total_seconds() // 60)
    locked = render(request, "accounts/locked_out.html", {"minutes": minutes}, status=429)
    locked["Retry-After"] = str(minutes * 60)
    return locked


class SignInView(LoginView):
    template_name = "accounts/login.html"
    form_class = EmailAuthenticationForm
    redirect_authenticated_user = True


class SignupForm(forms.Form):
    email = forms.EmailField(max_length=254)
    name = forms.CharField(max_length=255, required=False, help_text="Shown to the people you work with.")
    password = forms.CharField(widget=forms.PasswordInput(render_value=False), strip=False)

    def clean_email(self) -> str:
        email = self.cleaned_data["email"].strip().lower()
        if User.objects.filter(email__iexact=email).exists():
            raise forms.ValidationError("An account with this email already exists. Sign in instead.")
        return email

    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        errors = services.user_name_errors(name) if name else []
        if errors:
            raise forms.ValidationError(errors)
        return name

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        password = data.get("password")
        if password:
            try:
                # The configured validators (length, common passwords), with the account for context.
                validate_password(password, user=User(email=data.get("email", ""), name=data.get("name", "")))
            except forms.ValidationError as exc:
                self.add_error("password", exc)
        return data


def signup(request: HttpRequest) -> HttpResponse:
    if not settings.SIGNUP_ENABLED:
        return render(request, "accounts/signup_disabled.html", status=404)
    if request.user.is_authenticated:
        return redirect("accounts:home")
    form = SignupForm(request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid():
        try:
            user = services.create_user(email=form.cleaned_data["email"], name=form.cleaned_data["name"],
                                        password=form.cleaned_data["password"], self_registered=True)
        except IntegrityError:  # the same email signed up a moment ago
            form.add_error("email", "An account with this email already exists. Sign in instead.")
        else:
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            return redirect("accounts:home")
    return render(request, "accounts/signup.html", {"form": form}, status=422 if form.errors else 200)


@login_required
def home(request: HttpRequest) -> HttpResponse:
    """`/`: the first organization's pipelines (shared organizations before the personal one)."""
    memberships = user_memberships(request.user)  # type: ignore[arg-type]
    if memberships:
        return redirect("pipelines_ui:pipelines", org=memberships[0].organization.slug)
    # `manage.py createsuperuser` makes users without a personal organization.
    return render(request, "accounts/no_orgs.html", {"memberships": memberships})


# ---------------------------------------------------------------- personal API tokens

TOKEN_LIFETIMES = [("", "Never"), ("7", "7 days"), ("30", "30 days"), ("90", "90 days"), ("365", "1 year")]


class ApiTokenForm(forms.Form):
    description = forms.CharField(max_length=255, required=True, help_text="What the token is for, e.g. “laptop CLI”.")
    expires_in_days = forms.ChoiceField(choices=TOKEN_LIFETIMES, required=False, label="Expires")


def _tokens_page(request: HttpRequest, *, form: ApiTokenForm, created: services.IssuedToken | None = None,
                 status: int = 200) -> HttpResponse:
    tokens = personal_tokens(request.user).filter(revoked_at__isnull=True).order_by("-created_at", "-pk")  # type: ignore[arg-type]
    return render(request, "accounts/tokens.html", {"tokens": tokens, "form": form, "created": created},
                  status=status)


@login_required
def api_tokens(request: HttpRequest) -> HttpResponse:
    """List, and create: the raw token is in this one response only (never in a redirect or a cookie)."""
    if request.method != "POST":
        return _tokens_page(request, form=ApiTokenForm())
    form = ApiTokenForm(request.POST)
    if not form.is_valid():
        return _tokens_page(request, form=form, status=422)
    days = form.cleaned_data["expires_in_days"]
    expires_at = timezone.now() + timedelta(days=int(days)) if days else None
    issued = services.create_personal_token(user=request.user, description=form.cleaned_data["description"],  # type: ignore[arg-type]
                                            expires_at=expires_at)
    return _tokens_page(request, form=ApiTokenForm(), created=issued)


@login_required
@require_POST
def revoke_api_token(request: HttpRequest, token_id: uuid.UUID) -> HttpResponse:
    token = personal_tokens(request.user).filter(pk=token_id).first()  # type: ignore[arg-type]
    if token is None:
        raise Http404("No such API token.")
    services.revoke_api_token(token=token)
    messages.success(request, f"Revoked the token “{token.description or token.pk}”. It no longer works.")
    return redirect("accounts:tokens")


# ---------------------------------------------------------------- CLI login (SPEC §2)

CLI_PORTS = range(1024, 65536)


class CliLoginError(Exception):
    """The link the CLI opened is not one we can act on; nothing was parked."""


def _cli_transfer_request(params: Any) -> tuple[int, str]:
    """`port` and `nonce` of a loopback login, checked before anything is stored."""
    raw_port, nonce = params.get("port", ""), params.get("nonce", "")
    if not raw_port or not nonce:
        raise CliLoginError("This page needs the `port` and `nonce` the CLI puts in the link it opens. "
                            "Start the login again from the terminal (hm login).")
    if not (raw_port.isascii() and raw_port.isdigit() and len(raw_port) <= 5 and int(raw_port) in CLI_PORTS):
        raise CliLoginError(f"The port {raw_port[:20]!r} is not a port the CLI can listen on (1024–65535).")
    if len(nonce) > services.CLI_NONCE_MAX_LENGTH or not nonce.isprintable() or not nonce.strip():
        raise CliLoginError("The nonce in this link is not one the CLI generates.")
    return int(raw_port), nonce


def _cli_error(request: HttpRequest, message: str) -> HttpResponse:
    return render(request, "accounts/cli_error.html", {"message": message}, status=400)


@login_required
def cli_login(request: HttpRequest) -> HttpResponse:
    """The browser side of `hm login`: a signed-in user confirms, then the CLI gets a session token.

    `?port=&nonce=`: on confirmation park the transfer under the nonce (the CLI
    polls `POST /api/v0/auth/cli/claim` with it) and send the browser to the
    CLI's loopback listener. `?paste=true`: on confirmation show a code to type
    into the CLI (`/auth/cli/redeem`). Only POSTs with a CSRF token act, so a
    link alone can never log a terminal into someone's account.
    """
    params = request.POST if request.method == "POST" else request.GET
    if params.get("paste") == "true":
        if request.method != "POST":
            return render(request, "accounts/cli_paste.html", {"code": None})
        code = services.create_cli_code(user=request.user)  # type: ignore[arg-type]
        return render(request, "accounts/cli_paste.html",
                      {"code": code, "minutes": int(services.CLI_CODE_TTL.total_seconds() // 60)})
    try:
        port, nonce = _cli_transfer_request(params)
    except CliLoginError as exc:
        return _cli_error(request, str(exc))
    if request.method != "POST":
        return render(request, "accounts/cli_login.html", {"port": port, "nonce": nonce})
    try:
        services.park_cli_transfer(user=request.user, nonce=nonce)  # type: ignore[arg-type]
    except ApiError as exc:  # a nonce parked before: refuse, the CLI must start over
        return _cli_error(request, exc.message)
    # `localhost`, as the CLI's listener expects: it binds the loopback interface only.
    return HttpResponseRedirect(f"http://localhost:{port}/callback")

